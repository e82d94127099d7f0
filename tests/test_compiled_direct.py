"""The compiled call's fast path (issue 20): a repeated ``compile=True`` trace runs Dynamo's compiled code directly,
after checking Dynamo's own guards for it (``compile_stats()["direct_calls"]`` counts those calls). Anything a
guard covers leaves it (a module's mode, a hook added by the user, a weight's dtype), as does any change of the key
(structure, shape, dtype, grad mode); values always equal the eager backend's and plain PyTorch hooks'."""

from __future__ import annotations

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, tiny_mlp

pytestmark = pytest.mark.compiled


class Moody(torch.nn.Module):
    """A block whose forward depends on ``self.training`` without randomness: train doubles, eval does not."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = torch.nn.Linear(5, 10)
        self.layer2 = torch.nn.Linear(10, 2)

    def forward(self, x):
        h = self.layer1(x)
        if self.training:
            h = h * 2
        return self.layer2(h)


def _hooked(net, x, value):
    """Plain PyTorch: layer1's output column 0 set to ``value``, the model's output and layer1's output."""
    seen = []

    def hook(module, args, out):
        out = out.clone()
        out[:, 0] = value
        seen.append(out)
        return out

    handle = net.layer1.register_forward_hook(hook)
    try:
        return net(x), seen[0]
    finally:
        handle.remove()


def _trace(model, x, value, **options):
    with model.trace(x, **options):
        model.layer1.output[:, 0] = value
        hidden = model.layer1.output.save()
        out = model.output.save()
    return out, hidden


def _direct() -> int:
    return ic.compile_stats()["direct_calls"]


def _check(model, net, x, value, **options):
    out, hidden = _trace(model, x, value, compile=True, **options)
    want_out, want_hidden = _hooked(net, x, value)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(hidden, want_hidden)
    eager_out, eager_hidden = _trace(model, x, value, compile=False, **options)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(hidden, eager_hidden)


def _warm(net=None):
    """``(net, model, x)`` after two compiled traces: the first compiles, the second is direct."""
    net = tiny_mlp() if net is None else net
    model = ic.NNsight(net)
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    ic.reset_compile_stats()
    _check(model, net, x, 1.0)
    _check(model, net, x, 2.0)
    assert _direct() == 1 and ic.compile_stats()["compiles"] == 1
    return net, model, x


def test_a_repeated_trace_takes_the_direct_call():
    net = tiny_mlp()
    model = ic.NNsight(net)
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    ic.reset_compile_stats()
    _check(model, net, x, 1.0)  # compiles: through torch.compile's wrapper
    assert _direct() == 0 and ic.compile_stats()["compiles"] == 1
    for i in range(3):  # a value sweep: one structure, each call direct
        _check(model, net, x, float(i))
        assert _direct() == i + 1
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["compiled_calls"] == 4
    model.clear_compiled()  # the dispatcher's inert hooks stay until then
    assert_clean(net)


def test_a_new_shape_dtype_or_grad_mode_leaves_it():
    net, model, x = _warm()
    _check(model, net, torch.rand(3, 5), 2.0)  # a new shape: a new entry, compiled through the wrapper
    assert _direct() == 1 and ic.compile_stats()["compiles"] == 2
    with torch.no_grad():  # grad mode: another key
        _check(model, net, x, 2.0)
    assert _direct() == 1 and ic.compile_stats()["compiles"] == 3
    with torch.no_grad():
        _check(model, net, x, 3.0)
    assert _direct() == 2
    net.double()  # the weights' dtype: a double input is another key; the float entry's guards now fail
    _check(model, net, x.double(), 2.0)
    assert _direct() == 2 and ic.compile_stats()["compiles"] == 4
    _check(model, net, x.double(), 4.0)
    assert _direct() == 3
    assert ic.compile_stats()["fallbacks"] == 0


def test_a_module_mode_the_forward_reads_fails_a_guard_and_recompiles():
    net, model, x = _warm(Moody().eval())
    net.train()  # Dynamo guards on `self.training`: the direct call's check fails, the wrapper recompiles
    _check(model, net, x, 1.0)
    stats = ic.compile_stats()
    assert _direct() == 1 and stats["recompiles"] == 1
    _check(model, net, x, 1.0)  # both compiled versions are direct from now on
    net.eval()
    _check(model, net, x, 1.0)
    assert _direct() == 3 and ic.compile_stats()["recompiles"] == 1


def test_a_hook_the_user_adds_is_honoured():
    net, model, x = _warm()
    before = _direct()
    handle = net.layer2.register_forward_hook(lambda m, a, out: out + 100.0)
    try:
        out, _ = _trace(model, x, 1.0, compile=True)
        want, _ = _hooked(net, x, 1.0)  # the user's hook runs in plain PyTorch too
        torch.testing.assert_close(out, want)
        assert float(out.min()) > 50  # the hook's +100 is there
        assert _direct() == before  # the hook dicts' guard failed: recompiled through the wrapper
    finally:
        handle.remove()
    out, _ = _trace(model, x, 1.0, compile=True)
    torch.testing.assert_close(out, _hooked(net, x, 1.0)[0])


def test_a_hook_the_user_adds_on_a_site_shows_in_it_as_in_eager():
    """A hook the user registers after the first compile on a module the trace reads: ``.input`` and ``.output``
    are the values after the user's hooks, in both backends (the eager backend's hooks, registered at each trace,
    come after the user's; the compiled backend's persistent ones are moved back behind them), as a plain hook
    registered after the user's sees them."""
    net = tiny_mlp()
    model = ic.NNsight(net)
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))

    def saved(compile):
        with model.trace(x, compile=compile):
            seen_in = model.layer1.input.save()
            seen_out = model.layer1.output.save()
            out = model.output.save()
        return seen_in, seen_out, out

    ic.reset_compile_stats()
    for _ in range(2):
        saved(True)
    handles = [
        net.layer1.register_forward_pre_hook(lambda m, args: (args[0] + 1.0,)),
        net.layer1.register_forward_hook(lambda m, args, out: out * 2.0),
    ]
    try:
        seen: dict = {}
        after = [
            net.layer1.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0])),
            net.layer1.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out)),
        ]
        want_out = net(x)
        for h in after:
            h.remove()
        for compile in (True, True, False):
            got_in, got_out, out = saved(compile)
            torch.testing.assert_close(got_in, seen["in"])
            torch.testing.assert_close(got_out, seen["out"])
            torch.testing.assert_close(out, want_out)
    finally:
        for h in handles:
            h.remove()
    got_in, got_out, out = saved(True)
    torch.testing.assert_close(got_in, x)
    torch.testing.assert_close(got_out, net.layer1(x))
    torch.testing.assert_close(out, net(x))
    stats = ic.compile_stats()
    assert stats["compiled_calls"] == 5 and stats["fallbacks"] == 0, stats


def test_weights_changed_between_calls_are_read():
    net, model, x = _warm()
    with torch.no_grad():
        net.layer2.weight.mul_(3.0)  # in place: the same tensor, read by the compiled code at each call
    _check(model, net, x, 1.0)
    assert _direct() == 2 and ic.compile_stats()["recompiles"] == 0
    net.layer2.weight = torch.nn.Parameter(torch.randn(2, 10))  # a new tensor: Dynamo decides, values equal
    _check(model, net, x, 1.0)
    _check(model, net, x, 1.0)


def test_dynamo_reset_drops_the_direct_call_too():
    """After ``torch._dynamo.reset()`` Dynamo's caches are gone: the next call compiles again, as plain
    ``torch.compile`` would (a user resets to recompile with other settings), instead of running the old code."""
    net, model, x = _warm()
    torch._dynamo.reset()
    _check(model, net, x, 3.0)
    stats = ic.compile_stats()
    assert stats["compiles"] == 2 and _direct() == 1
    _check(model, net, x, 4.0)
    assert _direct() == 2


def test_reduce_overhead_off_a_gpu_runs_as_compile_true_and_says_so():
    """compile="reduce-overhead" asks for CUDA graphs; on the CPU they cannot be used: the trace compiles as
    compile=True does, with a warning at the user's line (once per model) and a line in explain()."""
    import io
    import warnings

    net = tiny_mlp()
    model = ic.NNsight(net, compile="reduce-overhead")
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    ic.reset_compile_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in (1.0, 2.0, 3.0):
            out, hidden = _trace(model, x, value)
            want_out, want_hidden = _hooked(net, x, value)
            torch.testing.assert_close(out, want_out)
            torch.testing.assert_close(hidden, want_hidden)
    said = [w for w in caught if "CUDA graphs need a CUDA device" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__  # the trace's line, not ours
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["direct_calls"] == 2 and stats["fallbacks"] == 0
    with model.trace(x) as tracer:
        model.layer1.output.save()
    text = tracer.explain(file=io.StringIO())
    assert "CUDA graphs: not used: the model is on cpu" in text
    with pytest.raises(ValueError, match="'reduce-overhead'"):
        ic.NNsight(net, compile="max-autotune")


def test_the_guard_filter_drops_only_guards_on_our_own_objects():
    """What the direct call checks is Dynamo's guards minus those on objects of ours that never change once an
    entry is built (the program, our module-level enums and functions); every guard on the model, the inputs,
    torch and the global state stays."""
    from intervene_compiler.backends.compiled.entry import _keeps

    layer = "program.target.forward.__self__._module._modules['layer1']"
    assert _keeps(layer + "._forward_hooks", "DICT_KEYS_MATCH")
    assert _keeps(layer + "._parameters['weight']", "TENSOR_MATCH")
    assert _keeps(layer, "TYPE_MATCH")
    assert _keeps("args[0]", "TENSOR_MATCH")
    assert _keeps(
        "G['__import_torch_dot_nn_dot_modules_dot_module']._global_forward_hooks", "DICT_KEYS_MATCH"
    )
    assert _keeps("G['__import_intervene_compiler_dot_debug'].DEBUG", "CONSTANT_MATCH")  # a flag of ours
    assert _keeps("G['__import_intervene_compiler_dot_grad_edits'].GradEdits.active", "SEQUENCE_LENGTH")
    assert not _keeps("program.events", "DICT_KEYS_MATCH")
    assert not _keeps("list(dict.keys(program.events))[0]", "SEQUENCE_LENGTH")
    assert not _keeps("type(program).__mro__[1].evaluate", "CLOSURE_MATCH")
    assert not _keeps(layer + "._forward_hooks[list(dict.keys(x))[0]].dispatcher.program", "DUPLICATE_INPUT")
    assert not _keeps("G['__import_intervene_compiler_dot_ir_dot_nodes']._OUTPUT", "DUPLICATE_INPUT")
    assert not _keeps(
        "G['__import_intervene_compiler_dot_backends_dot_compiled_dot_program'].Op.COND", "ID_MATCH"
    )


def test_the_guard_filter_on_a_real_compile(monkeypatch):
    """The names Dynamo gives its guards are the ones the filter expects: on a real compile it drops the
    program's guards and keeps the model's weights, hooks and the input's."""
    from intervene_compiler.backends.compiled import entry as entry_module

    seen: list = []
    original = entry_module._guard_filter

    def recording(entries):
        keep = original(entries)
        seen.extend(zip(entries, keep))
        return keep

    monkeypatch.setattr(entry_module, "_guard_filter", recording)
    net = tiny_mlp()
    model = ic.NNsight(net)
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    ic.reset_compile_stats()
    _check(model, net, x, 1.0)
    kept = {(e.guard_type, e.name) for e, k in seen if k}
    dropped = {e.name for e, k in seen if not k}
    assert any(name.startswith("program.events") for name in dropped)
    assert ("TENSOR_MATCH", "args[0]") in kept
    assert any(
        kind == "TENSOR_MATCH" and name.endswith("['layer1']._parameters['weight']") for kind, name in kept
    )
    assert any(name.endswith("['layer1']._forward_hooks") for _, name in kept)
    assert not any(name.startswith("program.") and not name.startswith("program.target") for _, name in kept)
    _check(model, net, x, 2.0)  # and the filtered guards still pass on a repeat: the direct call
    assert _direct() == 1


def test_a_repeated_save_only_trace_rechecks_what_its_shortcut_assumes():
    """A trace that only saves hands the compiled call the same optimized graph every time: the call keeps its
    last plan and entry (``run.Hot``) and runs that entry's compiled code directly while Dynamo's guards for it
    pass (``repeat_calls`` counts those calls). A new shape, grad mode, weights' dtype or hook fails a guard:
    that call goes back to the full lookup (and its mixed-precision check), and its entry is the next shortcut.
    Another structure is another graph: never the shortcut's."""
    net = tiny_mlp()
    model = ic.NNsight(net)

    def saved(x):
        with model.trace(x, compile=True):
            hidden = model.layer1.output.save()
        return hidden

    def repeats():
        return ic.compile_stats()["repeat_calls"]

    ic.reset_compile_stats()
    for seed in range(3):  # new values, one signature: compiled once, then direct through the shortcut
        x = torch.rand(2, 5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(saved(x), net.layer1(x))
    assert ic.compile_stats()["compiles"] == 1 and _direct() == 2 and repeats() == 2
    with model.trace(x, compile=True):  # another structure: its own entry, found in full
        other = model.layer2.output.save()
    torch.testing.assert_close(other, net(x))
    assert repeats() == 2 and ic.compile_stats()["compiles"] == 2
    torch.testing.assert_close(saved(x), net.layer1(x))  # back: found in full, then the shortcut again
    torch.testing.assert_close(saved(x), net.layer1(x))
    assert repeats() == 3 and ic.compile_stats()["compiles"] == 2
    wide = torch.rand(3, 5)
    torch.testing.assert_close(saved(wide), net.layer1(wide))  # a new shape
    assert repeats() == 3
    torch.testing.assert_close(saved(wide), net.layer1(wide))  # its entry is the shortcut now
    assert repeats() == 4
    with torch.no_grad():  # a new grad mode
        torch.testing.assert_close(saved(x), net.layer1(x))
    assert ic.compile_stats()["compiles"] == 4 and repeats() == 4
    torch.testing.assert_close(saved(x), net.layer1(x))  # back to the first entry, found in full
    assert repeats() == 4 and ic.compile_stats()["compiles"] == 4
    plain = torch.nn.functional.linear(x, net.layer1.weight, net.layer1.bias)
    handle = net.layer1.register_forward_hook(lambda m, a, o: o * 2)  # a hook: a guard fails, it recompiles
    try:
        torch.testing.assert_close(saved(x), plain * 2)
        assert repeats() == 4 and ic.compile_stats()["recompiles"] == 1
        torch.testing.assert_close(saved(x), plain * 2)
        assert repeats() == 5
    finally:
        handle.remove()
    torch.testing.assert_close(saved(x), net.layer1(x))  # and again without it
    net.double()  # the weights' dtype: a float input is now a mixed-precision call, which eager mode decides
    repeated = repeats()
    with pytest.raises(Exception) as compiled:
        saved(x)
    assert repeats() == repeated
    with pytest.raises(type(compiled.value)) as eager:
        with model.trace(x):
            model.layer1.output.save()
    assert (
        str(compiled.value).splitlines()[0] == str(eager.value).splitlines()[0]
    )  # (each names its own line)
    assert "same dtype" in str(compiled.value.__cause__)
    torch.testing.assert_close(saved(x.double()), net.layer1(x.double()))


def test_our_dynamo_settings_hold_only_while_dynamo_may_trace():
    """Our compiles turn hook guards on and Dynamo's profiler region around its pre-graph code off (two calls in
    every call of the code it generates); both settings are the user's again after the trace."""
    config = torch._dynamo.config
    before = (config.skip_nnmodule_hook_guards, config.record_runtime_overhead)
    net, model, x = _warm()
    assert (config.skip_nnmodule_hook_guards, config.record_runtime_overhead) == before
    entry = model._state.caches.compiled.last
    names = {name for _, code in entry.direct for name in code.__code__.co_names}
    assert "record_pregraph_bytecode_enter" not in names and any(n.startswith("__compiled_fn") for n in names)
