"""The pass pipeline and the seam: a failing pass is named, debug levels, memos owned by the model, execute()."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler import debug, pipeline
from intervene_compiler.errors import PassError
from intervene_compiler.execute import RunOptions, execute
from intervene_compiler.ir import ModelFacts
from intervene_compiler.testing import assert_clean, tiny_mlp


def _trace(model, x, value=1.0):
    with model.trace(x) as tracer:
        model.layer1.output[:, 0] = value
        out = model.output.save()
    return tracer, out


def test_a_pass_that_raises_is_named(monkeypatch):
    def broken(graph, facts):
        raise KeyError("boom")

    steps = tuple((name, broken if name == "setitem_fusion" else fn) for name, fn in pipeline.PIPELINE)
    monkeypatch.setattr(pipeline, "PIPELINE", steps)
    net = tiny_mlp()
    model = ic.NNsight(net)
    with pytest.raises(PassError, match="'setitem_fusion'.*KeyError") as info:
        _trace(model, torch.rand(1, 5))
    assert isinstance(info.value.__cause__, KeyError)
    assert_clean(net)
    monkeypatch.undo()
    _, out = _trace(model, torch.rand(1, 5))  # the next trace works
    assert out.value.shape == (1, 2)


def test_every_pass_takes_the_graph_and_the_facts():
    """Passes are listed in one place and called one way: ``run_pass(graph, facts)``; none is special-cased."""
    tracer, _ = _trace(ic.NNsight(tiny_mlp()), torch.rand(1, 5))
    seen = []
    for name, run_pass in pipeline.PIPELINE:
        result = run_pass(tracer.steps[0][1], ModelFacts())
        seen.append((name, type(result).__name__))
    assert [n for n, _ in seen] == ["dead_values", "setitem_fusion", "last_position", "early_stop"]
    assert {t for _, t in seen} == {"PassResult"}


def _debug_output(level: str | None) -> subprocess.CompletedProcess:
    code = (
        "import torch, intervene_compiler as ic\n"
        "from intervene_compiler.testing import tiny_mlp\n"
        "m = ic.NNsight(tiny_mlp())\n"
        "with m.trace(torch.rand(1, 5)):\n"
        "    m.layer1.output[:, 0] = 1.0\n"
        "    o = m.output.save()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "IC_DEBUG"}
    if level is not None:
        env["IC_DEBUG"] = level
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_debug_levels_are_integers_read_once():
    quiet, zero, one, two, ten = (_debug_output(v) for v in (None, "0", "1", "2", "10"))
    assert quiet.stdout == "" and zero.stdout == ""  # IC_DEBUG=0 is off
    assert "graph trace" in one.stdout and "-- after" not in one.stdout  # 1: the optimized graph
    assert "-- after setitem_fusion" in two.stdout and "graph trace" in two.stdout  # 2: after each pass too
    assert "-- after setitem_fusion" in ten.stdout  # any level above 2 includes 2
    bad = _debug_output("verbose")
    assert bad.returncode != 0 and "IC_DEBUG must be an integer" in bad.stderr


def test_debug_level_can_change_at_run_time(monkeypatch, capsys):
    monkeypatch.setattr(debug, "DEBUG", 1)
    _trace(ic.NNsight(tiny_mlp()), torch.rand(1, 5))
    assert "graph trace" in capsys.readouterr().out
    monkeypatch.setattr(debug, "DEBUG", 0)
    _trace(ic.NNsight(tiny_mlp()), torch.rand(1, 5))
    assert capsys.readouterr().out == ""


def test_memos_belong_to_the_model_and_die_with_it():
    """The pass memo and the eager plans live in the model's caches, not in the process: another model starts
    empty, and a model's entries are freed with it."""
    a, b = ic.NNsight(tiny_mlp()), ic.NNsight(tiny_mlp(seed=1))
    x = torch.rand(1, 5)
    _trace(a, x, torch.tensor(1.0))
    caches = a._state.caches
    assert len(caches.optimized) == 1 and len(caches.plans) == 1
    assert len(b._state.caches.optimized) == 0
    for value in (2.0, 3.0):  # new tensors, same structure: no new entries (a float literal is structure)
        _trace(a, x, torch.tensor(value))
    assert len(caches.optimized) == 1 and len(caches.plans) == 1
    ref = weakref.ref(caches)
    del a, caches
    gc.collect()
    assert ref() is None


def test_execute_is_the_seam():
    """``execute(graph, inputs, target, options)`` runs a recorded graph: what a third backend (remote) serves."""
    model = ic.NNsight(tiny_mlp())
    x = torch.rand(1, 5)
    tracer, out = _trace(model, x, 4.0)
    traced = tracer.steps[0][1]
    result = execute(traced, [((x,), {})], model._target(), RunOptions())
    saved = next(iter(result.values.values()))
    torch.testing.assert_close(saved, out.value)
    assert [name for name, _ in result.steps] == [
        "traced",
        "dead_values",
        "setitem_fusion",
        "last_position",
        "early_stop",
    ]
    fake = execute(traced, [((x,), {})], model._target(fake=True), RunOptions(fake=True))
    assert next(iter(fake.values.values())).shape == (1, 2)
