"""Workload 4 of the issue, training a steering vector: Adam steps through an intervention.

A vector (width of the model, starts at zero) is added to one block's output at the last position; the loss is
the cross-entropy of the last-position logits against fixed target tokens (batch ``train_batch`` x ``tokens``).
Systems: plain forward hooks eager (the baseline) and with the model ``torch.compile``'d (the floor), ours eager and
``compile=True``, nnsight when installed. Before timing, every system computes the first step's loss and the
vector's gradient (this also compiles), and they must agree. Then all systems train from zero with their steps
interleaved (one step of each in turn); steps/s comes from the median step time after the first two steps, and the
trained vectors must agree at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import models
from ..harness import (
    NOT_INSTALLED,
    Row,
    Settings,
    Target,
    WorkloadResult,
    add_compile_stats,
    check_same,
    compile_note,
    fmt_ratio,
    guarded,
    log,
    median,
    peer,
    peer_attempt,
    ratio,
    sync,
)

KEY = "training"
TITLE = "Steering-vector training"
MS = "ms/step"
RATE = "steps/s"
LR = 1e-2


@dataclass
class Trainer:
    name: str
    role: str
    make: (
        Callable[[torch.Tensor], Callable[[], torch.Tensor]] | None
    )  # vector -> one forward+backward -> loss
    status: str = "ok"
    compiled_ours: bool = False
    stats: dict = field(default_factory=dict)


def _plain(hf, ids, target, layer, compile):
    state = {"vec": None}

    def add(m, a, out):
        out = out.clone()
        out[:, -1] += state["vec"]
        return out

    hf.transformer.h[layer].register_forward_hook(add)
    forward = torch.compile(hf) if compile else hf

    def make(vec):
        state["vec"] = vec

        def step():
            loss = F.cross_entropy(forward(ids).logits[:, -1], target)
            loss.backward()
            return loss.detach()

        return step

    return make


def _ours(hf, ids, target, layer, compile):
    import intervene_compiler as ic

    model = ic.NNsight(hf)

    def make(vec):
        def step():
            with model.trace(ids, compile=compile):
                model.transformer.h[layer].output[:, -1] += vec
                loss = F.cross_entropy(model.lm_head.output[:, -1], target).save()
                loss.backward()
            return loss.value.detach()

        return step

    return make


def _nnsight(hf, ids, target, layer):
    model = models.nnsight_model(hf)

    def make(vec):
        def step():
            with model.trace(ids):
                model.transformer.h[layer].output[:, -1] += vec
                loss = F.cross_entropy(model.lm_head.output[:, -1], target).save()
            loss.backward()
            return loss.detach()

        return step

    return make


def run(settings: Settings) -> WorkloadResult:
    result = WorkloadResult(
        KEY,
        TITLE,
        measures="Adam steps training a steering vector added at one block (loss through the model's logits): "
        "milliseconds per step (forward + backward + optimizer); ratios are time / plain hooks eager's and / "
        "the torch.compile'd plain hooks' (the floor)",
        primary=MS,
        mode=settings.mode,
    )
    result.plots = [
        {
            "metric": RATE,
            "title": "steering-vector training (steps/s, higher is better)",
            "log": False,
            "higher": True,
        }
    ]

    def body():
        import intervene_compiler as ic

        n_layer = settings.sweep_layers
        hf = models.gpt2(settings, n_layer)
        ids = models.token_ids(settings, batch=settings.train_batch, seed=5)
        target = torch.randint(
            0, settings.vocab, (settings.train_batch,), generator=torch.Generator().manual_seed(6)
        ).to(settings.device)
        layer = n_layer // 2
        result.notes.append(
            f"{settings.train_steps} Adam steps (lr {LR}), batch {settings.train_batch} x {settings.tokens} tokens, "
            f"vector at block {layer} of {n_layer} (width {settings.width}, vocab {settings.vocab})"
            + (
                ""
                if settings.full_shapes
                else f"; {settings.mode} mode: fewer blocks/steps than the issue's 12/50"
            )
        )
        copies = models.copies(hf, 5)
        systems = [
            Trainer("plain hooks eager", "baseline", _plain(copies[0], ids, target, layer, False)),
        ]
        if settings.floors:
            systems.append(
                Trainer("plain hooks, torch.compile", "floor", _plain(copies[1], ids, target, layer, True))
            )
        systems.append(Trainer("ours eager", "ours", _ours(copies[2], ids, target, layer, False)))
        systems.append(
            Trainer(
                "ours compile=True", "ours", _ours(copies[3], ids, target, layer, True), compiled_ours=True
            )
        )
        nnsight, why = peer("nnsight", settings)
        if nnsight is None:
            systems.append(Trainer("nnsight", "peer", None, status=f"{NOT_INSTALLED}: {why}"))
        else:
            make, failed = peer_attempt(settings, "peer", lambda: _nnsight(copies[4], ids, target, layer))
            systems.append(Trainer("nnsight", "peer", make, status=failed or "ok"))
        live = [s for s in systems if s.make is not None]

        # check before timing: first step's loss and gradient (also the compiles)
        firsts = {}
        for s in live:
            log(f"{TITLE}: first step + check, {s.name}")
            vec = torch.zeros(settings.width, requires_grad=True, device=settings.device)
            before = ic.compile_stats()
            loss, failed = peer_attempt(settings, s.role, lambda s=s, vec=vec: s.make(vec)())
            if failed:  # a peer that cannot run on this device (CUDA only): its row says why
                s.make, s.status = None, failed
                continue
            add_compile_stats(s, before, ic.compile_stats())
            firsts[s.name] = (loss, vec.grad.clone())
        live = [s for s in live if s.make is not None]
        result.checks.append(
            check_same(
                "first step (loss, vector gradient)", firsts, "plain hooks eager", rtol=1e-3, atol=1e-5
            )
        )

        # training, steps interleaved across systems
        vecs, opts, steps = {}, {}, {}
        for s in live:
            vec = torch.zeros(settings.width, requires_grad=True, device=settings.device)
            vecs[s.name], opts[s.name] = vec, torch.optim.Adam([vec], lr=LR)
            steps[s.name] = s.make(vec)
        times: dict[str, list[float]] = {s.name: [] for s in live}
        log(f"{TITLE}: {settings.train_steps} steps x {len(live)} systems, interleaved")
        for _ in range(settings.train_steps):
            for s in live:
                before = ic.compile_stats()
                sync()  # CUDA: the queued kernels of the previous step are not this one's (no-op on CPU)
                start = time.perf_counter()
                opts[s.name].zero_grad()
                steps[s.name]()
                opts[s.name].step()
                sync()
                times[s.name].append(time.perf_counter() - start)
                add_compile_stats(s, before, ic.compile_stats())
        trained = {k: v.detach() for k, v in vecs.items()}
        result.checks.append(
            check_same(
                f"trained vectors after {settings.train_steps} steps",
                trained,
                "plain hooks eager",
                rtol=1e-3,
                atol=1e-4,
            )
        )
        for s in systems:
            metrics: dict[str, float | None] = {}
            note = ""
            if s.make is not None and settings.time_it:
                warm = times[s.name][2:] or times[s.name]
                ms = median(warm) * 1e3
                metrics = {MS: ms, RATE: 1e3 / ms}
            if s.compiled_ours:
                st = s.stats
                note = compile_note(st)
            result.rows.append(Row(s.name, "", metrics, status=s.status, note=note, role=s.role))
        _targets(result, settings, systems)

    return guarded(result, body)


def _targets(result: WorkloadResult, settings: Settings, systems: list[Trainer]) -> None:
    for s in systems:
        if s.compiled_ours:
            st = s.stats
            result.targets.append(
                Target(
                    "ours compile=True: one compile, no recompiles or fallbacks over the training loop",
                    f"compiles {st.get('compiles', 0)}, recompiles {st.get('recompiles', 0)}, fallbacks {st.get('fallbacks', 0)}",
                    st.get("compiles", 0) <= 1
                    and st.get("recompiles", 0) == 0
                    and st.get("fallbacks", 0) == 0,
                )
            )
    if not settings.time_it:
        result.summary = f"{TITLE}: checks passed (not timed)"
        return
    plain = result.value("plain hooks eager", RATE)
    comp = result.value("ours compile=True", RATE)
    eager = result.value("ours eager", RATE)
    floor = result.value("plain hooks, torch.compile", RATE)
    nn = result.value("nnsight", RATE)
    r = ratio(comp, plain)
    result.targets.append(
        Target(
            "ours compiled >= 1.3x the steps/s of plain eager hooks",
            fmt_ratio(r),
            None if r is None else r >= 1.3,
        )
    )
    parts = [f"plain hooks {plain:.2f} steps/s"]
    if floor is not None:
        parts.append(f"plain + torch.compile {floor:.2f}")
    parts.append(f"ours eager {eager:.2f}" if eager is not None else "ours eager n/a")
    parts.append(
        f"ours compiled {comp:.2f} ({fmt_ratio(r)} plain)" if comp is not None else "ours compiled n/a"
    )
    parts.append(f"nnsight {nn:.2f}" if nn is not None else "nnsight n/a")
    result.summary = f"{TITLE}: " + ", ".join(parts)
