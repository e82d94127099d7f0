"""Several threads tracing one model: each thread's block records and runs alone (blocks take turns per model), so
every value is that thread's own, checked against plain PyTorch on the same input and edit."""

from __future__ import annotations

import threading

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, tiny_mlp


def _expected(net, x, value):
    h = net.layer1(x).clone()
    h[:, 0] = value
    return h, net.layer2(h)


def _hammer(model, net, threads: int, traces: int, compile: bool) -> tuple[list, list]:
    errors: list = []
    wrong: list = []
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        g = torch.Generator().manual_seed(k)
        start.wait()
        for i in range(traces):
            x = torch.rand(1, 5, generator=g)
            value = float(k * 1000 + i)
            try:
                with model.trace(x, compile=compile):
                    model.layer1.output[:, 0] = value
                    h = model.layer1.output.save()
                    o = model.output.save()
            except Exception as e:  # collected: an exception in a thread would otherwise vanish
                errors.append(repr(e))
                continue
            ref_h, ref_o = _expected(net, x, value)
            if not (torch.allclose(h, ref_h) and torch.allclose(o, ref_o, atol=1e-5)):
                wrong.append((k, i))

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors, wrong


def test_threads_tracing_one_model_get_their_own_values():
    net = tiny_mlp()
    model = ic.NNsight(net)
    errors, wrong = _hammer(model, net, threads=8, traces=250, compile=False)  # 2,000 traces
    assert errors == [] and wrong == []
    assert_clean(net)


@pytest.mark.compiled
def test_threads_tracing_one_model_compiled_get_their_own_values():
    net = tiny_mlp()
    model = ic.NNsight(net)
    ic.reset_compile_stats()
    errors, wrong = _hammer(model, net, threads=4, traces=150, compile=True)
    assert errors == [] and wrong == []
    assert ic.compile_stats()["fallbacks"] == 0


def test_a_session_and_traces_in_other_threads_take_turns():
    """A session's traces run (at the session's exit) while other threads trace the same model."""
    net = tiny_mlp()
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    results = []

    def session() -> None:
        for _ in range(20):
            with model.session():
                with model.trace(x):
                    h = model.layer1.output.save()
                with model.trace(x):
                    model.layer1.output[:] = h * 2
                    o = model.output.save()
            results.append(o.value)

    other = threading.Thread(target=lambda: _hammer(model, net, threads=1, traces=200, compile=False))
    runner = threading.Thread(target=session)
    other.start()
    runner.start()
    runner.join()
    other.join()
    expected = net.layer2(net.layer1(x) * 2)
    assert len(results) == 20
    for o in results:
        torch.testing.assert_close(o, expected)
