"""Workload 3 of the issue, steered generation: greedy tokens with a vector added at one block every step.

Systems: plain HF ``generate`` without steering (the baseline the compiled target is set against), HF
``generate`` with a forward hook adding the vector (plain steering), ours ``LanguageModel.generate`` with
``tracer.all()`` eager and ``compile=True``, nnsight's ``generate`` with ``tracer.all()``. Every steered system
must produce the same token ids. A row is reported "not available yet" when the library cannot run it (no
``ic.LanguageModel``/``generate``, or ``compile=True`` generation that does not actually compile): never faked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import models
from ..harness import (
    NOT_AVAILABLE,
    NOT_INSTALLED,
    Row,
    Settings,
    Target,
    WorkloadResult,
    add_compile_stats,
    check_same,
    compile_note,
    error_line,
    fmt_ratio,
    guarded,
    interleaved,
    log,
    median,
    peer,
    peer_attempt,
    ratio,
)

KEY = "generation"
TITLE = "Steered generation"
MS = "ms/token"
RATE = "tokens/s"
LAYER_FRACTION = 0.5  # steer at the middle block
COMPILED = "ours compile=True"


@dataclass
class Gen:
    name: str
    role: str
    fn: Callable[[], torch.Tensor] | None  # returns the generated ids (prompt included)
    steered: bool = True
    status: str = "ok"
    note: str = ""
    stats: dict = field(default_factory=dict)  # compile_stats() differences (the compiled row of ours)


def _hf_generate(hf, ids, n, pad, block=None, steer=None):
    def run():
        handle = None
        if block is not None:

            def add(m, a, out):
                out = out.clone()
                out[:, -1] += steer
                return out

            handle = hf.get_submodule(block).register_forward_hook(add)
        try:
            with torch.no_grad():
                return hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                )
        finally:
            if handle is not None:
                handle.remove()

    return run


def _ours(hf, ids, n, layer, steer, compile):
    import intervene_compiler as ic

    model = ic.LanguageModel(hf, tokenizer=models.tokenizer())

    def run():
        with model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, compile=compile
        ) as tracer:
            with tracer.all():
                model.transformer.h[layer].output[:, -1] += steer
            out = model.generator.output.save()
        return out.value

    return run


def _nnsight(hf, ids, n, layer, steer, pad):
    lm = models.nnsight_model(hf, language=True)

    def run():
        with lm.generate(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad) as tracer:
            with tracer.invoke(ids):
                with tracer.all():  # nnsight runs nothing after an unbounded iteration in the same invoke
                    lm.transformer.h[layer].output[:, -1] += steer
            with tracer.invoke():
                out = lm.generator.output.save()
        return out

    return run


def run(settings: Settings) -> WorkloadResult:
    result = WorkloadResult(
        KEY,
        TITLE,
        measures="greedy generation with a steering vector added at one block's last position every step: "
        "milliseconds per generated token (prompt included in the time); ratios are time / plain HF generate "
        "without steering",
        primary=MS,
        mode=settings.mode,
    )
    result.plots = [{"metric": MS, "title": "steered generation (ms/token)", "log": False}]

    def body():
        import intervene_compiler as ic

        n_layer = settings.sweep_layers
        hf = models.gpt2(settings, n_layer)
        ids = models.token_ids(settings, seed=3)
        n = settings.gen_tokens
        layer = int(n_layer * LAYER_FRACTION)
        steer = (torch.randn(settings.width, generator=torch.Generator().manual_seed(4)) * 8).to(
            settings.device
        )
        pad = models.pad_id()
        block = f"transformer.h.{layer}"
        result.notes.append(
            f"{n} new tokens after a {settings.tokens}-token prompt, steering block {layer} of {n_layer} "
            f"(width {settings.width}, vocab {settings.vocab})"
        )
        copies = models.copies(hf, 5)
        systems = [
            Gen("HF generate (no steering)", "baseline", _hf_generate(copies[0], ids, n, pad), steered=False),
            Gen("HF generate + hook", "baseline-steer", _hf_generate(copies[1], ids, n, pad, block, steer)),
        ]
        why_not = _library_generation()
        if why_not is None:
            try:
                systems.append(Gen("ours eager", "ours", _ours(copies[2], ids, n, layer, steer, False)))
                systems.append(Gen(COMPILED, "ours", _ours(copies[3], ids, n, layer, steer, True)))
            except Exception as e:  # noqa: BLE001 - LanguageModel is being built: report, do not fake
                why_not = f"LanguageModel(module, tokenizer=...) failed: {error_line(e)}"
                systems = systems[:2]
        if why_not is not None:
            systems.append(Gen("ours eager", "ours", None, status=f"{NOT_AVAILABLE}: {why_not}"))
            systems.append(Gen("ours compile=True", "ours", None, status=f"{NOT_AVAILABLE}: {why_not}"))
        nnsight, why = peer("nnsight", settings)
        if nnsight is None:
            systems.append(Gen("nnsight", "peer", None, status=f"{NOT_INSTALLED}: {why}"))
        else:
            fn, failed = peer_attempt(
                settings, "peer", lambda: _nnsight(copies[4], ids, n, layer, steer, pad)
            )
            systems.append(Gen("nnsight", "peer", fn, status=failed or "ok"))

        outs = {}
        for s in systems:
            if s.fn is None:
                continue
            log(f"{TITLE}: first run + check, {s.name}")
            before = ic.compile_stats()
            try:
                out, failed = peer_attempt(settings, s.role, s.fn)
            except Exception as e:  # noqa: BLE001
                if s.role == "ours":  # generation is being built: say what failed, do not fake a row
                    s.status, s.fn = f"{NOT_AVAILABLE}: {error_line(e)}", None
                    continue
                raise
            if failed:  # a peer that cannot run on this device (CUDA only): its row says why
                s.status, s.fn = failed, None
                continue
            outs[s.name] = out
            if s.name == COMPILED:
                after = ic.compile_stats()
                add_compile_stats(s, before, after)
                if after["compiled_calls"] == before["compiled_calls"]:
                    why = (s.stats.get("reasons") or ["no compiled calls"])[0]
                    s.status = f"{NOT_AVAILABLE}: generate(compile=True) ran on the eager backend ({why})"
                    s.fn = None
        steered = {s.name: outs[s.name] for s in systems if s.fn is not None and s.steered}
        result.checks.append(check_same("steered token ids", steered, "HF generate + hook", exact=True))
        unsteered = outs.get("HF generate (no steering)")
        if unsteered is not None and torch.equal(unsteered, outs["HF generate + hook"]):
            result.notes.append("the steering vector did not change the greedy tokens at these shapes")

        live = {s.name: s.fn for s in systems if s.fn is not None}
        medians: dict[str, float] = {}
        if settings.time_it:
            before = ic.compile_stats()  # only the compiled row of ours compiles: the difference is its own
            samples = interleaved(live, settings.gen_repeats, dict.fromkeys(live, 1))
            medians = {k: median(v) * 1e3 / n for k, v in samples.items()}
            for s in systems:
                if s.name == COMPILED and s.fn is not None:
                    add_compile_stats(s, before, ic.compile_stats())
        for s in systems:
            ms = medians.get(s.name)
            metrics = {MS: ms, RATE: None if ms is None else 1e3 / ms}
            note = s.note
            if s.name == COMPILED and s.fn is not None:
                note = (note + "; " if note else "") + compile_note(s.stats)
            result.rows.append(Row(s.name, "", metrics, status=s.status, note=note, role=s.role))
        _targets(result, settings)

    return guarded(result, body)


def _library_generation() -> str | None:
    """Why ours cannot generate (``None`` when ``ic.LanguageModel`` with ``generate`` exists)."""
    import intervene_compiler as ic

    lm = getattr(ic, "LanguageModel", None)
    if lm is None:
        return "ic.LanguageModel does not exist"
    if not callable(getattr(lm, "generate", None)):
        return "ic.LanguageModel has no generate()"
    return None


def _targets(result: WorkloadResult, settings: Settings) -> None:
    if not settings.time_it:
        result.summary = f"{TITLE}: checks passed (not timed)"
        return
    raw = result.value("HF generate (no steering)")
    hook = result.value("HF generate + hook")
    eager = result.value("ours eager")
    comp = result.value("ours compile=True")
    nn = result.value("nnsight")
    r = ratio(comp, raw)
    row = result.row("ours compile=True")
    result.targets.append(
        Target(
            f"ours compiled steered generation within 5% of raw HF generate ({'CUDA' if settings.cuda else 'CPU'})",
            fmt_ratio(r) if r is not None else (row.status if row else "n/a"),
            None if r is None else r <= 1.05,
        )
    )
    parts = [f"HF generate {raw:.1f} ms/token", f"HF + hook {hook:.1f}"]
    parts.append(
        f"ours eager {eager:.1f} ({fmt_ratio(ratio(eager, raw))})" if eager is not None else "ours eager n/a"
    )
    parts.append(f"ours compiled {comp:.1f}" if comp is not None else "ours compiled: not available yet")
    parts.append(f"nnsight {nn:.1f}" if nn is not None else "nnsight n/a")
    result.summary = f"{TITLE}: " + ", ".join(parts)
