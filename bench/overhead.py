"""Trace overhead on the walkthrough's tiny MLP: one trace saving one module output, microseconds per call.

Run ``python -m bench.overhead``. Systems timed interleaved in one process, medians of repeats after warm-up:
raw forward, raw forward with one plain forward hook, ours (eager backend).
"""

from __future__ import annotations

import statistics
import time

import torch

from intervene_compiler import NNsight
from intervene_compiler.testing import tiny_mlp


def _time(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(repeats: int = 7, n: int = 2000) -> dict[str, float]:
    torch.set_num_threads(1)
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(1, 5)

    def raw():
        net(x)

    def hooked():
        box = []
        h = net.layer1.register_forward_hook(lambda m, a, o: box.append(o))
        net(x)
        h.remove()

    def ours():
        with model.trace(x):
            model.layer1.output.save()

    systems = {"raw forward": raw, "plain hook": hooked, "ours eager": ours}
    for fn in systems.values():
        _time(fn, 200)
    samples: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            samples[name].append(_time(fn, n))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["raw forward"]
    for name, us in medians.items():
        print(f"{name:12s} {us:8.1f} us  {us / base:5.2f}x raw")
    return medians


if __name__ == "__main__":
    main()
