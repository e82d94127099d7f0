"""compile="auto" (issue 20): a structure runs eagerly until it has run AUTO_COMPILE_AFTER - 1 times on the model,
then compiles; a new input shape or grad mode is a new structure. Checked through compile_stats(), against
plain PyTorch hooks."""

from __future__ import annotations

import io

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.execute import AUTO_COMPILE_AFTER
from intervene_compiler.testing import tiny_mlp

pytestmark = pytest.mark.compiled


def _hooked(net, x, value, column=0):
    """The same intervention with a plain forward hook: layer1's output set to ``value`` at ``column``."""

    def hook(module, args, out):
        out = out.clone()
        out[:, column] = value
        return out

    handle = net.layer1.register_forward_hook(hook)
    try:
        return net(x)
    finally:
        handle.remove()


def _run(model, x, value):
    with model.trace(x) as tracer:
        model.layer1.output[:, 0] = value
        out = model.output.save()
    return out, tracer


def test_auto_compiles_a_structure_from_its_third_run():
    assert AUTO_COMPILE_AFTER == 3  # the documented number
    net = tiny_mlp()
    model = ic.NNsight(net, compile="auto")
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(1))
    before = ic.compile_stats()
    for i in range(AUTO_COMPILE_AFTER - 1):  # eager: no compile, no compiled call
        out, tracer = _run(model, x, float(i))
        torch.testing.assert_close(out, _hooked(net, x, float(i)))
        assert "compile='auto' compiles a structure at its run 3" in tracer.explain(file=io.StringIO())
    now = ic.compile_stats()
    assert now["compiles"] == before["compiles"] and now["compiled_calls"] == before["compiled_calls"]
    out, tracer = _run(model, x, 5.0)  # the third run compiles
    torch.testing.assert_close(out, _hooked(net, x, 5.0))
    now = ic.compile_stats()
    assert now["compiles"] == before["compiles"] + 1 and now["compiled_calls"] == before["compiled_calls"] + 1
    out, _ = _run(model, x, 7.0)  # and later runs hit its cache
    torch.testing.assert_close(out, _hooked(net, x, 7.0))
    after = ic.compile_stats()
    assert after["compiles"] == now["compiles"] and after["cache_hits"] == now["cache_hits"] + 1
    wider = torch.rand(3, 5, generator=torch.Generator().manual_seed(2))  # a new shape counts from one again
    out, _ = _run(model, wider, 1.0)
    torch.testing.assert_close(out, _hooked(net, wider, 1.0))
    assert ic.compile_stats()["compiled_calls"] == after["compiled_calls"]
    with torch.no_grad():  # so does another grad mode
        out, _ = _run(model, x, 1.0)
    assert ic.compile_stats()["compiled_calls"] == after["compiled_calls"]


def test_auto_per_trace_and_bad_values():
    net = tiny_mlp()
    model = ic.NNsight(net)
    x = torch.rand(1, 5, generator=torch.Generator().manual_seed(3))
    before = ic.compile_stats()["compiled_calls"]
    for i in range(AUTO_COMPILE_AFTER):
        with model.trace(x, compile="auto"):
            model.layer1.output[:, 1] = float(i)
            out = model.output.save()
        torch.testing.assert_close(out, _hooked(net, x, float(i), column=1))
    assert ic.compile_stats()["compiled_calls"] == before + 1
    with pytest.raises(ValueError, match="True, False, 'auto' or 'reduce-overhead'"):
        ic.NNsight(net, compile="yes")
    with pytest.raises(ValueError, match="True, False, 'auto' or 'reduce-overhead'"):
        with model.trace(x, compile="always"):
            model.output.save()


def test_auto_on_a_repeated_save_only_trace():
    """A save-only trace hands the runtime the same optimized graph every time: once its structure compiles, a
    repeat takes that decision again at once, while a new shape or grad mode still counts from one."""
    net = tiny_mlp()
    model = ic.NNsight(net, compile="auto")
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(4))
    wide = torch.rand(3, 5, generator=torch.Generator().manual_seed(5))
    before = ic.compile_stats()["compiled_calls"]

    def saved(inputs):
        with model.trace(inputs):
            hidden = model.layer1.output.save()
        torch.testing.assert_close(hidden, net.layer1(inputs))

    def compiled_calls() -> int:
        return ic.compile_stats()["compiled_calls"] - before

    for _ in range(AUTO_COMPILE_AFTER + 2):
        saved(x)
    assert compiled_calls() == 3  # runs 3, 4 and 5
    saved(wide)  # a new shape: its first run, eager
    assert compiled_calls() == 3
    saved(x)  # back to the first shape: compiled
    assert compiled_calls() == 4
    with torch.no_grad():  # another grad mode: its first run, eager
        saved(x)
    assert compiled_calls() == 4
    saved(x)
    assert compiled_calls() == 5
