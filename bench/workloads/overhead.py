"""Workload 1, trace overhead: one trace saving one module's output, microseconds per call.

Two models: the walkthrough's tiny 2-layer MLP (input ``(1, 5)``, saves ``layer1``) and a small transformer (the
test suite's tiny GPT-2: 2 blocks, width 32, 8 tokens; saves block 0's output); ``--full`` adds GPT-2 small (12
blocks, random weights, 16 tokens; saves block 5's output). Systems: the raw forward (plain
PyTorch eager, the baseline), the raw forward compiled with ``torch.compile`` (the floor), the raw forward with one
forward hook registered and removed around the call (what a user saving one value writes), ours eager and
``compile=True``, nnsight and TransformerLens ``run_with_hooks`` when installed.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import models
from ..harness import (
    NOT_INSTALLED,
    Row,
    Settings,
    Target,
    WorkloadResult,
    calibrate,
    check_same,
    compile_note,
    fmt_ratio,
    guarded,
    interleaved,
    log,
    median,
    peer,
    peer_attempt,
    ratio,
)

KEY = "overhead"
TITLE = "Trace overhead"
METRIC = "us/call"


@dataclass
class System:
    name: str
    role: str
    fn: Callable[[], Any] | None  # one call; returns what is compared (the saved value, or the model output)
    kind: str = "saved"  # "saved": the saved module output; "output": the model's output
    status: str = "ok"


def _systems(
    settings: Settings,
    module: torch.nn.Module,
    inputs: torch.Tensor,
    site: str,
    output: Callable[[Any], Any],
    tl_model: Callable[[torch.nn.Module], Any],
    tl_hook: str,
) -> list[System]:
    """Every system on its own copy of ``module`` (already on ``settings.device``, as ``inputs`` are), reading the
    output of the submodule at ``site``; ``output`` turns the model's return value into what is compared;
    TransformerLens wraps a copy with ``tl_model`` and reads hook point ``tl_hook``."""
    import intervene_compiler as ic

    copies = [copy.deepcopy(module) for _ in range(10)]
    systems = [System("raw forward", "baseline", lambda: output(copies[0](inputs)), "output")]
    if settings.floors:
        compiled = torch.compile(copies[1])
        systems.append(
            System("raw forward, torch.compile", "floor", lambda: output(compiled(inputs)), "output")
        )

    def hooked():
        box = []
        handle = copies[2].get_submodule(site).register_forward_hook(lambda m, a, o: box.append(o))
        try:
            copies[2](inputs)
        finally:
            handle.remove()
        return box[0]

    systems.append(System("raw forward + hook", "baseline-save", hooked))
    if (
        settings.floors
    ):  # what compile=True is held to (issue 20): torch.compile of the model with the same hook
        box: list = []
        copies[8].get_submodule(site).register_forward_hook(lambda m, a, o: box.append(o))

        def call(x):
            return copies[8](x)

        # its own code object: Dynamo caches per code object and (by default) does not guard on hooks, so
        # compiling the hooked copy itself would reuse the hook-less graph compiled above and skip the hook
        compiled_hooked = torch.compile(
            types.FunctionType(call.__code__.replace(), globals(), "call", None, call.__closure__)
        )

        def raw_compiled_hook():
            box.clear()
            compiled_hooked(inputs)
            return box[0]

        systems.append(System("raw torch.compile + hook", "floor", raw_compiled_hook))
    for i, compile in ((3, False), (4, True), (9, "auto")):
        model = ic.NNsight(copies[i])
        envoy = model.get(site)  # looked up once, as the nnsight row's is

        def ours(model=model, envoy=envoy, compile=compile):
            # reuse=False: with the same input every call, the GPT-2 trace would replay the block from the last
            # call (backends/eager/reuse.py) instead of running it; this row measures the trace around a forward.
            with model.trace(inputs, compile=compile, reuse=False):
                out = envoy.output.save()
            return out.value

        name = {False: "ours eager", True: "ours compile=True", "auto": "ours compile='auto'"}[compile]
        if (
            compile == "auto"
        ):  # its first runs (eager, then the compile) before calibration, as the other rows'
            from intervene_compiler.execute import AUTO_COMPILE_AFTER

            for _ in range(AUTO_COMPILE_AFTER):
                ours()
        systems.append(System(name, "ours", ours))
    nnsight, why = peer("nnsight", settings)
    if nnsight is not None:

        def nn_build():
            envoy = nn_model = models.nnsight_model(copies[5])
            for part in site.split("."):
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)

            def nn_trace():
                with nn_model.trace(inputs):
                    out = envoy.output.save()
                return out

            return nn_trace

        nn_trace, failed = peer_attempt(settings, "peer", nn_build)
        systems.append(System("nnsight", "peer", nn_trace, status=failed or "ok"))
    else:
        systems.append(System("nnsight", "peer", None, status=f"{NOT_INSTALLED}: {why}"))
    tl, why = peer("transformer_lens", settings)
    if tl is not None:
        hooked_model, failed = peer_attempt(settings, "peer", lambda: tl_model(copies[6]))

        def tl_hooks():
            box = []
            hooked_model.run_with_hooks(inputs, fwd_hooks=[(tl_hook, lambda act, hook: box.append(act))])
            return box[0]

        systems.append(
            System(
                "TransformerLens run_with_hooks",
                "peer",
                None if failed else tl_hooks,
                status=failed or "ok",
            )
        )
    else:
        systems.append(
            System("TransformerLens run_with_hooks", "peer", None, status=f"{NOT_INSTALLED}: {why}")
        )
    return systems


def _mlp_systems(settings: Settings) -> tuple[list[System], str]:
    from intervene_compiler.testing import tiny_mlp

    x = torch.rand(1, 5, generator=torch.Generator().manual_seed(0)).to(settings.device)
    net = tiny_mlp().to(settings.device)
    systems = _systems(settings, net, x, "layer1", lambda out: out, models.tl_mlp, "hook_layer1")
    return systems, "tiny MLP (1x5 -> 10 -> 2), saves layer1"


def _transformer_systems(settings: Settings) -> tuple[list[System], str]:
    from intervene_compiler.testing import tiny_gpt2

    hf = tiny_gpt2(n_layer=2).requires_grad_(False).to(settings.device)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0)).to(settings.device)
    systems = _systems(
        settings,
        hf,
        ids,
        "transformer.h.0",
        lambda out: out.logits,
        lambda module: models.tl_bridge(module, settings.device),
        "blocks.0.hook_out",
    )
    return systems, "tiny GPT-2 (2 blocks, width 32, vocab 128, 8 tokens), saves block 0's output"


def _gpt2_small_systems(settings: Settings) -> tuple[list[System], str]:
    """GPT-2 small (``--full``: 12 blocks, random weights, 16 tokens), saving block 5's output: where the forward
    is compute-bound and each system's per-call cost is a small share of it."""
    hf = models.gpt2(settings, settings.sweep_layers)
    ids = models.token_ids(settings)
    block = min(5, settings.sweep_layers - 1)
    systems = _systems(
        settings,
        hf,
        ids,
        f"transformer.h.{block}",
        lambda out: out.logits,
        lambda module: models.tl_bridge(module, settings.device),
        f"blocks.{block}.hook_out",
    )
    return (
        systems,
        f"GPT-2 small ({settings.sweep_layers} blocks, {settings.tokens} tokens), saves block {block}'s output",
    )


def run(settings: Settings) -> WorkloadResult:
    result = WorkloadResult(
        KEY,
        TITLE,
        measures="one trace saving one module output: microseconds per call (lower is better); ratios are time "
        "divided by the raw forward's (plain PyTorch eager) and by the compiled raw forward's (the floor)",
        primary=METRIC,
        mode=settings.mode,
    )
    result.plots = [{"metric": METRIC, "title": "trace overhead (us/call, log scale)", "log": True}]

    def body():
        import intervene_compiler as ic

        builds = [_mlp_systems, _transformer_systems]
        if settings.full_shapes:  # GPT-2 small: a compile of about 15 s per compiled system
            builds.append(_gpt2_small_systems)
        for build in builds:
            systems, group = build(settings)
            log(f"{TITLE}: {group}")
            live = [s for s in systems if s.fn is not None]
            before = ic.compile_stats()  # only "ours compile=True" runs our compiled backend in a group
            # 1. correctness before timing (this first call also compiles the compiled systems)
            outs = {}
            for s in live:
                outs[s.name], failed = peer_attempt(settings, s.role, s.fn)
                if failed:  # a peer that cannot run on this device (CUDA only): its row says why
                    s.fn, s.status = None, failed
                    del outs[s.name]
            live = [s for s in live if s.fn is not None]
            saved = {s.name: outs[s.name] for s in live if s.kind == "saved"}
            output = {s.name: outs[s.name] for s in live if s.kind == "output"}
            result.checks.append(check_same(f"{group}: saved value", saved, "raw forward + hook"))
            if len(output) > 1:
                result.checks.append(check_same(f"{group}: model output", output, "raw forward"))
            # 2. timing, interleaved
            medians: dict[str, float] = {}
            if settings.time_it:
                calls = {s.name: calibrate(s.fn, settings.overhead_sample_s) for s in live}
                samples = interleaved({s.name: s.fn for s in live}, settings.overhead_repeats, calls)
                medians = {k: median(v) * 1e6 for k, v in samples.items()}
            after = ic.compile_stats()
            stats = {k: after[k] - before[k] for k in ("compiles", "recompiles", "fallbacks")}
            stats["reasons"] = after["fallback_reasons"][len(before["fallback_reasons"]) :]
            for s in systems:
                note = compile_note(stats) if s.name == "ours compile=True" else ""
                if s.name == "ours compile='auto'":
                    note = "steady state: compiled from a structure's 3rd run (the runs before are eager)"
                result.rows.append(
                    Row(s.name, group, {METRIC: medians.get(s.name)}, status=s.status, role=s.role, note=note)
                )
        _targets(result, settings)

    return guarded(result, body)


def _targets(result: WorkloadResult, settings: Settings) -> None:
    if not settings.time_it:
        result.summary = f"{TITLE}: checks passed (not timed)"
        return
    parts = []
    for group in dict.fromkeys(r.group for r in result.rows):
        raw = result.value("raw forward", group=group)
        ours = result.value("ours eager", group=group)
        comp = result.value("ours compile=True", group=group)
        nn = result.value("nnsight", group=group)
        tl = result.value("TransformerLens run_with_hooks", group=group)
        short = group.split(" (")[0]
        text = f"{short}: raw {raw:.1f} us, ours eager {ours:.1f} us ({fmt_ratio(ratio(ours, raw))} raw)"
        text += f", ours compiled {comp:.1f} us" if comp is not None else ""
        text += f", nnsight {nn:.1f} us" if nn is not None else ", nnsight n/a"
        text += f", TL {tl:.1f} us" if tl is not None else ", TL n/a"
        parts.append(text)
        floor = result.value("raw torch.compile + hook", group=group)
        if comp is not None and floor is not None:
            r = ratio(comp, floor)
            result.targets.append(
                Target(f"{short}: ours compile=True <= 1.3x raw torch.compile + hook", fmt_ratio(r), r <= 1.3)
            )
        if comp is not None and ours is not None:
            r = ratio(comp, ours)
            result.targets.append(Target(f"{short}: ours compile=True <= ours eager", fmt_ratio(r), r <= 1))
        if short == "tiny MLP":
            r = ratio(ours, raw)
            result.targets.append(
                Target("tiny MLP: ours eager <= 2.5x the raw forward", fmt_ratio(r), r <= 2.5)
            )
            r = ratio(ours, tl)
            result.targets.append(
                Target(
                    "tiny MLP: ours eager ahead of TransformerLens run_with_hooks",
                    f"ours/TL {fmt_ratio(r)}",
                    None if r is None else r < 1,
                )
            )
            r = ratio(nn, ours)
            result.targets.append(
                Target(
                    "tiny MLP: 3x ahead of nnsight",
                    f"nnsight/ours {fmt_ratio(r)}",
                    None if r is None else r >= 3,
                )
            )
    result.summary = f"{TITLE}: " + "; ".join(parts)
