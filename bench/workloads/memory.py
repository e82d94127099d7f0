"""Workload 5 of the issue, memory: peak tensor memory saving one block's output vs caching every module.

Measured with ``torch.profiler`` (``profile_memory=True``): every CPU tensor allocation and free during one call,
summed in time order; the peak is the most bytes alive at once above what was allocated before the call (the
weights), the values the call hands back included. Python objects are not counted. Process RSS is not used: it
never goes down, so it cannot separate systems measured in one process. On a CUDA device (``--device cuda``) the
CUDA caching allocator's own counters are used instead: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus ``memory_allocated`` before the call (block sizes as the allocator rounds them).

Groups: saving one block's output (plain forward + one hook is the baseline; ours, nnsight), and caching every
module's output (plain hooks on every module is the baseline; ours ``tracer.cache()``, nnsight ``tracer.cache()``,
TransformerLens ``run_with_cache``, which caches every hook point).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import models
from ..harness import (
    NOT_INSTALLED,
    Row,
    Settings,
    Target,
    WorkloadResult,
    check_same,
    fmt_ratio,
    guarded,
    log,
    peer,
    peer_attempt,
    ratio,
)

KEY = "memory"
TITLE = "Memory"
MB = "peak MB"
KEPT = "kept MB"
SAVE = "save one block"
CACHE = "cache every module"


@dataclass
class Probe:
    name: str
    group: str
    role: str
    fn: Callable[[], object] | None  # one call; returns everything the user holds afterwards
    pick: Callable[[object], torch.Tensor] | None = None  # that object -> the block's output (for the check)
    status: str = "ok"


def cuda_peak_bytes(fn: Callable[[], object], device: str) -> tuple[int, int, object]:
    """``(peak, kept, result)`` on a CUDA device from the caching allocator's counters: the most bytes allocated at
    once during ``fn()`` above what was allocated before it, and bytes still allocated after (``result`` alive)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    kept = torch.cuda.memory_allocated(device) - base
    return peak, kept, out


def peak_bytes(fn: Callable[[], object]) -> tuple[int, int, object]:
    """``(peak, kept, result)``: most tensor bytes alive at once during ``fn()``, and bytes still alive after."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    allocs.sort(key=lambda a: a[0])
    alive = peak = 0
    for _, size in allocs:
        alive += size
        peak = max(peak, alive)
    return peak, alive, out


def _count(value) -> int:
    """Tensors in what a system hands back (a tensor, containers, cache entries, nnsight's CacheView, TL's cache)."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count(v) for v in value)
    entries = getattr(getattr(value, "_cache", None), "entries", None)  # nnsight's CacheView
    if isinstance(entries, dict):
        return sum(_count(e) for visits in entries.values() for e in visits)
    if hasattr(value, "output") or hasattr(value, "inputs"):  # one cache entry (ours, nnsight's)
        return _count(getattr(value, "output", None)) + _count(getattr(value, "inputs", None))
    if hasattr(value, "keys"):  # TransformerLens' ActivationCache
        return sum(_count(value[k]) for k in value.keys())
    return 0


def _probes(settings: Settings, hf, ids, layer: int) -> list[Probe]:
    import intervene_compiler as ic

    copies = models.copies(hf, 4)
    path = f"transformer.h.{layer}"
    probes = []

    def plain_one():
        box = []
        handle = hf.get_submodule(path).register_forward_hook(lambda m, a, o: box.append(o))
        try:
            hf(ids)
        finally:
            handle.remove()
        return box[0]

    def plain_all():
        cache = {}
        handles = [
            m.register_forward_hook(lambda m, a, o, name=name: cache.__setitem__(name, o))
            for name, m in hf.named_modules()
            if name
        ]
        try:
            hf(ids)
        finally:
            for h in handles:
                h.remove()
        return cache

    ours = ic.NNsight(copies[0])

    def ours_one():
        # reuse=False: after the warm-up the same prompt would replay the blocks before this one instead of
        # running them (backends/eager/reuse.py); this row measures a forward
        with ours.trace(ids, reuse=False):
            out = ours.transformer.h[layer].output.save()
        return out.value

    def ours_all():
        with ours.trace(ids) as tracer:
            cache = tracer.cache()
        return cache.value

    probes += [
        Probe("plain forward + 1 hook", SAVE, "baseline", plain_one, lambda v: v),
        Probe("ours eager", SAVE, "ours", ours_one, lambda v: v),
        Probe("plain hooks on every module", CACHE, "baseline", plain_all, lambda v: v[path]),
        Probe("ours tracer.cache()", CACHE, "ours", ours_all, lambda v: v[f"model.{path}"].output),
    ]
    nnsight, why = peer("nnsight", settings)
    if nnsight is None:
        probes.append(Probe("nnsight", SAVE, "peer", None, status=f"{NOT_INSTALLED}: {why}"))
        probes.append(Probe("nnsight tracer.cache()", CACHE, "peer", None, status=f"{NOT_INSTALLED}: {why}"))
    else:
        nn_model, failed = peer_attempt(settings, "peer", lambda: models.nnsight_model(copies[1]))

        def nn_one():
            with nn_model.trace(ids):
                out = nn_model.transformer.h[layer].output.save()
            return out

        def nn_all():
            with nn_model.trace(ids) as tracer:
                cache = tracer.cache()
            return cache

        ok = failed is None
        probes.append(Probe("nnsight", SAVE, "peer", nn_one if ok else None, lambda v: v, failed or "ok"))
        probes.append(
            Probe(
                "nnsight tracer.cache()",
                CACHE,
                "peer",
                nn_all if ok else None,
                lambda v: v[f"model.{path}"].output,
                failed or "ok",
            )
        )
    tl, why = peer("transformer_lens", settings)
    if tl is None:
        probes.append(
            Probe("TransformerLens run_with_cache", CACHE, "peer", None, status=f"{NOT_INSTALLED}: {why}")
        )
    else:
        bridge, failed = peer_attempt(settings, "peer", lambda: models.tl_bridge(copies[2], settings.device))

        def tl_all():
            return bridge.run_with_cache(ids)  # (logits, cache): what a user holds

        probes.append(
            Probe(
                "TransformerLens run_with_cache",
                CACHE,
                "peer",
                None if failed else tl_all,
                lambda v: v[1][f"blocks.{layer}.hook_out"],
                status=failed or "ok",
            )
        )
    return probes


def run(settings: Settings) -> WorkloadResult:
    if settings.cuda:
        measures = (
            f"peak CUDA allocator memory of one call on {settings.device} above what was allocated before it "
            "(the weights): torch.cuda.max_memory_allocated after reset_peak_memory_stats, values handed back "
            "included; ratios are peak / the plain-PyTorch baseline of the group"
        )
        title = "peak CUDA allocator memory of one call (MB)"
    else:
        measures = (
            "peak tensor memory of one call above the weights (torch.profiler allocation events), values "
            "handed back included; ratios are peak / the plain-PyTorch baseline of the group"
        )
        title = "peak tensor memory of one call (MB)"
    result = WorkloadResult(KEY, TITLE, measures=measures, primary=MB, mode=settings.mode)
    result.plots = [{"metric": MB, "title": title, "log": False}]

    def body():
        n_layer = settings.memory_layers
        hf = models.gpt2(settings, n_layer)
        ids = models.token_ids(settings, seed=7)
        layer = n_layer // 2
        result.notes.append(
            f"model: {n_layer} blocks, width {settings.width}, vocab {settings.vocab}, {settings.tokens}-token prompt; "
            f"one block = block {layer}; eager backend (tracer.cache() is not compiled)"
        )
        probes = _probes(settings, hf, ids, layer)
        values: dict[str, dict[str, torch.Tensor]] = {SAVE: {}, CACHE: {}}
        for p in probes:
            if p.fn is not None:  # warm-up (first-call allocations, nnsight's source cache)
                failed = peer_attempt(settings, p.role, p.fn)[1]  # the warm-up's result is not kept
                if failed:  # a peer that cannot run on this device (CUDA only): its row says why
                    p.fn, p.status = None, failed
        measured = {}
        for p in probes:
            if p.fn is None:
                continue
            log(f"{TITLE}: {p.name}")
            gc.collect()
            if settings.cuda:
                peak, kept, held = cuda_peak_bytes(p.fn, settings.device)
            else:
                peak, kept, held = peak_bytes(p.fn)
            values[p.group][p.name] = p.pick(held)
            measured[p.name] = (peak, kept, _count(held))
            del held
        reference_of = {SAVE: "plain forward + 1 hook", CACHE: "plain hooks on every module"}
        for group in (SAVE, CACHE):
            result.checks.append(
                check_same(f"{group}: block {layer} output", values[group], reference_of[group])
            )
        for p in probes:
            metrics: dict[str, float | None] = {}
            note = ""
            if p.name in measured:
                peak, kept, count = measured[p.name]
                metrics = {MB: peak / 2**20, KEPT: kept / 2**20}
                note = f"{count} tensors kept"
            result.rows.append(Row(p.name, p.group, metrics, status=p.status, note=note, role=p.role))
        _targets(result)

    return guarded(result, body)


def _targets(result: WorkloadResult) -> None:
    plain_one = result.value("plain forward + 1 hook", group=SAVE)
    ours_one = result.value("ours eager", group=SAVE)
    ours_all = result.value("ours tracer.cache()", group=CACHE)
    plain_all = result.value("plain hooks on every module", group=CACHE)
    tl_all = result.value("TransformerLens run_with_cache", group=CACHE)
    r = ratio(ours_one, plain_one)
    result.targets.append(
        Target("saving one block: ours <= plain PyTorch with one hook", fmt_ratio(r), r <= 1.0)
    )
    r2 = ratio(ours_all, tl_all)
    result.targets.append(
        Target(
            "caching every module: ours <= TransformerLens run_with_cache",
            fmt_ratio(r2),
            None if r2 is None else r2 <= 1.0,
        )
    )
    text = (
        f"{TITLE}: save one block ours {ours_one:.1f} MB vs plain hook {plain_one:.1f} MB ({fmt_ratio(r)}); "
    )
    text += f"cache every module ours {ours_all:.1f} MB vs plain hooks {plain_all:.1f} MB"
    text += f", TL run_with_cache {tl_all:.1f} MB" if tl_all is not None else ", TL n/a"
    result.summary = text
