"""One compile-cost measurement in a fresh process (run by ``bench.workloads.compile_cost``; prints one JSON line).

``python -m bench._compile_child --system ours|ours_program|plain --mode quick [--device cuda]`` builds the sweep
model (on ``--device``; on CUDA every step is synchronized before the clock is read), times the
eager patch step, then the first compiled call (cold or warm depending on ``TORCHINDUCTOR_CACHE_DIR``'s contents), the steady
compiled step over a layer x position sweep, and a compile of the same structure again in this process after
dropping the compiled program (warm in-process caches). ``ours`` traces with the default settings (on GPT-2-small
shapes a patch trace is layered: one compiled decoder-layer forward; replaying unedited layers across traces is
opt-in, ``reuse=True``, and off here); ``ours_program`` with the layered cost model's threshold out of reach, which
compiles the whole model and interventions as one program.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=("ours", "ours_program", "plain"), required=True)
    ap.add_argument("--mode", default="quick")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from . import models
    from .harness import check_device, settings_for, sync, use_device

    imported = time.perf_counter() - _START
    check_device(args.device)
    settings = settings_for(args.mode)
    settings.device = args.device
    device = torch.device(args.device)
    use_device(args.device)  # sync() before every clock read: a step's queued CUDA kernels count in its time

    hf = models.gpt2(settings, settings.sweep_layers)
    clean = models.token_ids(settings, seed=1)
    corrupt = models.token_ids(settings, seed=2)
    blocks = hf.transformer.h
    cache = {}
    handles = [
        blocks[i].register_forward_hook(lambda m, a, o, i=i: cache.__setitem__(i, o))
        for i in range(len(blocks))
    ]
    hf(clean)
    for h in handles:
        h.remove()
    plan = [
        (k % len(blocks), settings.sweep_positions[k % len(settings.sweep_positions)])
        for k in range(max(2, settings.compile_steady_calls) + 1)
    ]
    a, b = 5, 7

    if args.system in ("ours", "ours_program"):
        import intervene_compiler as ic

        model = ic.NNsight(hf)
        if args.system == "ours_program":  # no decoder layer is large enough to compile on its own
            from intervene_compiler.backends.compiled import layered

            layered.MIN_LAYER_PARAMS = 1 << 62

        def step(layer, pos, compile):
            with model.trace(corrupt, compile=compile):
                model.transformer.h[layer].output[:, pos] = cache[layer][:, pos]
                logits = model.lm_head.output
                diff = (logits[0, -1, a] - logits[0, -1, b]).save()
            return diff.value

        def drop():
            model.clear_compiled()

        stats = ic.compile_stats
    else:
        state = {
            "layer": torch.zeros((), dtype=torch.long, device=device),
            "pos": torch.zeros(1, dtype=torch.long, device=device),
        }
        stacked = torch.stack([cache[i] for i in range(len(blocks))])

        def gate(m, args_, o, i):
            rows = torch.arange(o.shape[0], device=o.device)
            patched = o.index_put((rows, state["pos"]), stacked[i][0, state["pos"]])
            return torch.where(state["layer"] == i, patched, o)

        for i in range(len(blocks)):
            blocks[i].register_forward_hook(lambda m, a_, o, i=i: gate(m, a_, o, i))
        compiled = torch.compile(hf)

        def step(layer, pos, compile):
            state["layer"].fill_(layer)
            state["pos"].fill_(pos)
            logits = (compiled if compile else hf)(corrupt).logits
            return logits[0, -1, a] - logits[0, -1, b]

        def drop():
            torch._dynamo.reset()

        def stats():
            from torch._dynamo.utils import counters

            n = counters["stats"].get("unique_graphs", 0)
            return {"compiles": n, "recompiles": max(0, n - 1), "fallbacks": 0}

    eager_times, values = [], []
    step(*plan[0], False)  # warm-up
    for layer, pos in plan:
        sync()
        t = time.perf_counter()
        values.append(float(step(layer, pos, False)))
        sync()
        eager_times.append(time.perf_counter() - t)
    before = stats()
    sync()
    t = time.perf_counter()
    first_value = float(step(*plan[0], True))
    sync()
    first = time.perf_counter() - t
    compiled_times, compiled_values = [], [first_value]
    for layer, pos in plan[1:]:
        sync()
        t = time.perf_counter()
        compiled_values.append(float(step(layer, pos, True)))
        sync()
        compiled_times.append(time.perf_counter() - t)
    after = stats()
    drop()
    sync()
    t = time.perf_counter()
    step(*plan[0], True)
    sync()
    warm_same = time.perf_counter() - t
    print(
        json.dumps(
            {
                "system": args.system,
                "import_s": imported,
                "first_call_s": first,
                "steady_s": statistics.median(compiled_times),
                "eager_s": statistics.median(eager_times),
                "compiled_step_times": compiled_times,
                "eager_step_times": eager_times,
                "warm_same_process_s": warm_same,
                "compiles": after["compiles"] - before["compiles"],
                "recompiles": after["recompiles"] - before["recompiles"],
                "fallbacks": after["fallbacks"] - before["fallbacks"],
                "eager_values": values,
                "compiled_values": compiled_values,
                "plan": plan,
                "process_s": time.perf_counter() - _START,
            }
        )
    )


if __name__ == "__main__":
    main()
