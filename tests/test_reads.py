"""The eager runner's fast paths for plain traces, checked against plain PyTorch hooks.

A trace that only reads sites and saves them (with at most a stop after the last read) runs without the scheduler
(``reads.run_reads``), and a plain run hooks a module by setting a ``forward`` on the instance around the class's
own (``hooks._Wrap``) when nothing else runs around that module. Each test checks the values against hooks, that
the fast path really ran (or really did not, where it must not), and that nothing is left on the model.
"""

from __future__ import annotations

import copy
import gc
import inspect
import types

import pytest
import torch
import torch.nn.modules.module as torch_module
from torch.testing import assert_close

from intervene_compiler import NNsight
from intervene_compiler.backends.eager import hooks, runner
from intervene_compiler.errors import MissedSiteError
from intervene_compiler.testing import assert_clean, tiny_gpt2, tiny_mlp


@pytest.fixture
def paths(monkeypatch):
    """Counts of the runs that took the reads-only path and of the modules wrapped instead of hooked."""
    seen = {"reads": 0, "wraps": 0}
    run_reads, wrap_init = runner.run_reads, hooks._Wrap.__init__

    def reads(*args, **kwargs):
        seen["reads"] += 1
        return run_reads(*args, **kwargs)

    def wrap(self, module, pre, post):
        seen["wraps"] += 1
        wrap_init(self, module, pre, post)

    monkeypatch.setattr(runner, "run_reads", reads)  # the name run_graph calls
    monkeypatch.setattr(hooks._Wrap, "__init__", wrap)
    return seen


def hooked(net: torch.nn.Module, x: torch.Tensor, names: list[str], inputs: bool = False) -> dict[str, list]:
    """Every call's output (or first positional input) of the named submodules, by plain forward hooks."""
    got: dict[str, list] = {n: [] for n in names}
    handles = []
    for n in names:
        mod = net.get_submodule(n)
        if inputs:
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, n=n: got[n].append(o)))
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return got


class Twice(torch.nn.Module):
    """Calls ``inner`` twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.inner(torch.relu(self.inner(x))))


def test_reads_and_inputs_match_hooks(paths):
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(3, 5)
    with model.trace(x):
        h = model.layer1.output.save()
        i = model.layer2.input.save()
        args = model.layer2.inputs.save()
        out = model.output.save()
    ref = hooked(net, x, ["layer1"])
    assert_close(h.value, ref["layer1"][0])
    assert_close(i.value, ref["layer1"][0])
    assert_close(args.value[0][0], ref["layer1"][0])
    assert_close(out.value, net(x))
    assert paths["reads"] == 1 and paths["wraps"] == 3  # layer1, layer2 and the root
    assert_clean(net)


def test_invokes_read_their_rows(paths):
    net = tiny_mlp()
    model = NNsight(net)
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.layer1.output.save()
        with tracer.invoke(b):
            hb = model.layer2.output.save()
    assert_close(ha.value, net.layer1(a))
    assert_close(hb.value, net(b))
    assert paths["reads"] == 1
    assert_clean(net)


def test_later_calls_of_a_module(paths):
    net = Twice()
    model = NNsight(net)
    x = torch.rand(2, 4)
    with model.trace(x):
        first = model.inner.output.save()
        second = model.inner.next().output.save()
        second_in = model.inner.input.save()  # the address moved on: call 1's input
    ref = hooked(net, x, ["inner"])["inner"]
    ref_in = hooked(net, x, ["inner"], inputs=True)["inner"]
    assert_close(first.value, ref[0])
    assert_close(second.value, ref[1])
    assert_close(second_in.value, ref_in[1])
    assert paths["reads"] == 1 and paths["wraps"] == 1  # one wrap: the pre- and post-hook of `inner`
    assert_clean(net)


def test_stop_ends_the_forward_after_the_last_read(paths):
    net = tiny_mlp()
    model = NNsight(net)
    ran = []
    net.layer2.register_forward_pre_hook(
        lambda m, a: ran.append(1)
    )  # layer2 is hooked, layer1 stays wrappable
    x = torch.rand(2, 5)
    with model.trace(x) as tracer:
        h = model.layer1.output.save()
        tracer.stop()
    assert_close(h.value, net.layer1(x))
    assert ran == [] and paths["reads"] == 1 and paths["wraps"] == 1
    net.layer2._forward_pre_hooks.clear()
    assert_clean(net)


def test_a_read_that_never_happens_names_the_calls(paths):
    net = tiny_mlp()
    model = NNsight(net)
    with pytest.raises(MissedSiteError, match=r"model.layer1.call1.output.*ran 1 time\(s\)"):
        with model.trace(torch.rand(1, 5)):
            model.layer1.next().output.save()
    assert paths["reads"] == 1
    assert_clean(net)
    with model.trace(torch.rand(1, 5)):  # the next trace works
        h = model.layer1.output.save()
    assert h.value.shape == (1, 10)


def test_an_error_in_the_forward_leaves_no_wrap(paths):
    net = tiny_mlp()
    model = NNsight(net)
    with pytest.raises(RuntimeError):
        with model.trace(torch.rand(1, 7)):  # wrong width: layer1 raises inside the wrapped forward
            model.layer1.output.save()
    assert paths["wraps"] == 1
    assert_clean(net)


def test_a_users_hook_runs_before_the_read(paths):
    """A module with its own forward hook is hooked, not wrapped: the read sees the hook's edit, as hooks would
    (a wrap would read inside the forward, before the user's hook)."""
    net = tiny_mlp()
    model = NNsight(net)
    handle = net.layer1.register_forward_hook(lambda m, a, o: o * 2)
    try:
        x = torch.rand(2, 5)
        with model.trace(x):
            h = model.layer1.output.save()
            out = model.layer2.output.save()
        assert_close(h.value, net.layer1(x))  # doubled by the user's hook
        assert_close(out.value, net(x))
        assert paths["wraps"] == 1  # layer2 only
    finally:
        handle.remove()
    assert_clean(net)


def test_global_hooks_and_instance_forwards_keep_hooks(paths):
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(2, 5)
    seen = []
    handle = torch_module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        with model.trace(x):
            h = model.layer1.output.save()
    finally:
        handle.remove()
    assert_close(h.value, net.layer1(x))
    assert paths["wraps"] == 0 and "Linear" in seen
    own = net.layer1.forward
    net.layer1.forward = lambda inp: own(inp) + 1  # a patch set on the instance (as accelerate's hooks are)
    try:
        with model.trace(x):
            h = model.layer1.output.save()
        assert_close(h.value, own(x) + 1)
        assert net.layer1.__dict__["forward"] is not None and paths["wraps"] == 0
    finally:
        del net.layer1.forward
    assert_clean(net)


def test_backward_hooks_keep_hooks(paths):
    net = tiny_mlp().requires_grad_(True)
    model = NNsight(net)
    grads = []
    handle = net.layer1.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    try:
        x = torch.rand(2, 5, requires_grad=True)
        with model.trace(x):
            h = model.layer1.output.save()
            out = model.output.save()
        out.value.sum().backward()
        assert paths["wraps"] == 1  # the root only: layer1 has a backward hook
        assert len(grads) == 1
        assert_close(h.value, net.layer1(x))
    finally:
        handle.remove()
    assert_clean(net)


def test_edits_take_the_general_path(paths):
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x):
        model.layer1.output[:, 0] = 0
        out = model.output.save()
    h = net.layer1(x)
    h[:, 0] = 0
    assert_close(out.value, net.layer2(h))
    assert paths["reads"] == 0 and paths["wraps"] == 2
    assert_clean(net)


class CallsForward(torch.nn.Module):
    """Calls ``child.forward`` directly (no hooks run), then ``child(...)`` (hooks run)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.child = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.child(self.child.forward(x) * 2)


def test_a_direct_forward_call_is_not_a_hooked_call(paths):
    """Hooks see only calls through ``module(...)``; a wrap, set as the instance's ``forward``, also receives
    ``child.forward(x)`` and must pass it through, or `.output` would address the wrong call."""
    net = CallsForward()
    model = NNsight(net)
    x = torch.rand(2, 3)
    with model.trace(x):
        out = model.child.output.save()
        inp = model.child.input.save()
    assert_close(out.value, hooked(net, x, ["child"])["child"][0])
    assert_close(inp.value, hooked(net, x, ["child"], inputs=True)["child"][0])
    assert paths["wraps"] == 1 and paths["reads"] == 1
    with pytest.raises(MissedSiteError, match="ran 1 time"):
        with model.trace(x):
            model.child.next().output.save()
    assert_clean(net)


class ReadsItsSignature(torch.nn.Module):
    """Reads its child's forward signature while running (as transformers' generate does with its own)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.child = torch.nn.Linear(3, 3)
        self.seen: list = []

    def forward(self, x):
        self.seen.append(list(inspect.signature(self.child.forward).parameters))
        return self.child(x)


def test_a_wrapped_forward_keeps_its_signature(paths):
    net = ReadsItsSignature()
    model = NNsight(net)
    with model.trace(torch.rand(1, 3)):
        model.child.output.save()
    assert net.seen == [["input"]] and paths["wraps"] == 1
    assert_clean(net)


@pytest.mark.compiled  # Module.compile() calls torch.compile
def test_a_module_compiled_in_place_is_hooked(paths):
    net = tiny_mlp()
    net.layer2.compile()  # Dynamo runs layer2's calls: it keeps the hooks it had (none), not a wrap
    model = NNsight(net)
    assert not hooks.wrappable(net.layer2) and hooks.wrappable(net.layer1)
    x = torch.rand(2, 5)
    with model.trace(x):
        h = model.layer1.output.save()
    assert_close(h.value, net.layer1(x))
    assert paths["wraps"] == 1
    assert_clean(net)


class HooksItsChild(torch.nn.Module):
    """Registers hooks while it runs: a forward hook on its child at the first call (as transformers' output
    capture does) and a global forward hook around the child's call (as a profiler does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.child = torch.nn.Linear(4, 4)
        self.seen: list = []

    def forward(self, x):
        if not self.child._forward_hooks:
            self.child.register_forward_hook(lambda m, a, o: self.seen.append(o.clone()))
        handle = torch_module.register_module_forward_hook(lambda m, a, o: None)
        try:
            return self.child(x) + 1
        finally:
            handle.remove()


def test_hooks_registered_during_the_run(paths):
    """With any hook registered, torch calls ``forward`` from ``_call_impl``'s nested ``inner``: a wrap put on
    before the hooks came still runs, and an edit is what hooks registered later see."""
    x = torch.rand(2, 4)
    net = HooksItsChild()
    model = NNsight(net)
    with model.trace(x):
        h = model.child.output.save()
    assert_close(h.value, net.child(x))
    net = HooksItsChild()  # no hook yet: the one the edit run registers runs after the wrap, as after a hook
    model = NNsight(net)
    with model.trace(x):
        model.child.output[:, 0] = 0
        out = model.output.save()
    seen = net.seen[-1]
    expected = net.child(x)
    expected[:, 0] = 0
    assert_close(out.value, expected + 1)
    assert_close(seen, expected)  # the model's own hook, registered after the wrap, runs after it
    assert paths["wraps"] == 3 and paths["reads"] == 1
    net.child._forward_hooks.clear()
    assert_clean(net)


def test_output_hidden_states_on_a_fresh_transformers_model(paths):
    """transformers registers its output-capturing hooks on the blocks during the first such forward."""
    net = tiny_gpt2()
    ids = torch.randint(0, 128, (1, 6))
    expected = hooked(net, ids, ["transformer.h.1"])["transformer.h.1"][0]
    net = tiny_gpt2()  # fresh: no capture hooks yet
    model = NNsight(net)
    with torch.no_grad(), model.trace(ids, output_hidden_states=True):
        h = model.transformer.h[1].output.save()
        out = model.output.save()
    assert_close(h.value, expected)
    assert len(out.value.hidden_states) == 3 and paths["wraps"] >= 1
    assert not any("forward" in m.__dict__ for m in net.modules())


@pytest.mark.parametrize(
    "register",
    [torch_module.register_module_full_backward_hook, torch_module.register_module_full_backward_pre_hook],
)
def test_global_backward_hooks_keep_hooks(paths, register):
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(2, 5)
    handle = register(lambda *args: None)
    try:
        with model.trace(x):
            h = model.layer1.output.save()
        with model.trace(x):
            model.layer1.output[:] = 0
            out = model.output.save()
    finally:
        handle.remove()
    assert_close(h.value, net.layer1(x))
    assert_close(out.value, net.layer2(torch.zeros(2, 10)))
    assert paths["wraps"] == 0
    assert_clean(net)


class SharedChild(torch.nn.Module):
    """One Linear registered under two names, called once through each."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        lin = torch.nn.Linear(3, 3)
        self.p = torch.nn.Sequential(lin)
        self.q = torch.nn.Sequential(lin)

    def forward(self, x):
        return self.q(self.p(x))


def test_a_module_under_two_names_is_hooked_at_both(paths):
    net = SharedChild()
    model = NNsight(net)
    x = torch.rand(2, 3)
    calls = hooked(net, x, ["p.0"])["p.0"]
    with model.trace(x):
        a = model.p[0].output.save()
        b = model.q[0].next().output.save()
    assert_close(a.value, calls[0])
    assert_close(b.value, calls[1])  # the module's second call, whichever name reads it
    with model.trace(x):
        model.p[0].output[:] = 0
        out = model.output.save()
    assert_close(out.value, net.q(torch.zeros(2, 3)))  # call 0 edited, call 1 not
    assert_clean(net)


class TracesItsChild(torch.nn.Module):
    """Runs a trace of its submodule (on ``x * 10``) inside its forward, then calls the submodule on ``x``."""

    def __init__(self, edit: bool):
        super().__init__()
        self.sub = tiny_mlp()
        object.__setattr__(self, "nested", NNsight(self.sub))  # not a registered child
        self.edit = edit

    def forward(self, x):
        with self.nested.trace(x * 10):
            if self.edit:  # the general path for the nested run
                self.nested.layer2.output[:] = self.nested.layer2.output * 1
            self.nested.layer1.output.save()
        return self.sub(x)


@pytest.mark.parametrize("edit", [False, True])
def test_a_trace_nested_in_the_forward(paths, edit):
    """The outer read's call 0 is the nested trace's call, as with hooks, and the outer run's early stop (its
    last read is there) passes through the nested run instead of ending it as its own."""
    net = TracesItsChild(edit)
    model = NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x):
        h = model.sub.layer1.output.save()
    assert_close(h.value, net.sub.layer1(x * 10))
    with model.trace(x):
        h = model.sub.layer1.next().output.save()
        out = model.output.save()
    assert_close(h.value, net.sub.layer1(x))
    assert_close(out.value, net.sub(x))
    assert_clean(net)


@pytest.mark.compiled  # torch.compile (Dynamo; backend="eager": no Inductor)
@pytest.mark.parametrize("how", ["output", "stop", "user stop", "edit"])
def test_a_compiled_model_is_traced_by_dynamo_through_the_wrap(paths, how):
    """Dynamo inlines ``_call_impl`` and cannot trace ``sys._getframe``: under compilation the wrap runs its
    hooks without looking at its caller. Nor can an exception leave a fullgraph: a stop (the one ``early_stop``
    adds after the last read, or the user's) lets the forward run to its end there."""
    net = tiny_mlp()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    model = NNsight(compiled)
    x = torch.rand(2, 5)
    try:
        with model.trace(x) as tracer:
            if how == "edit":
                model._orig_mod.layer1.output[:, 0] = 0
            h = model._orig_mod.layer1.output.save()
            if how == "output":
                out = model.output.save()
            if how == "user stop":
                tracer.stop()
    finally:
        torch._dynamo.reset()
    expected = net.layer1(x)
    if how == "edit":
        expected[:, 0] = 0
    assert_close(h.value, expected)
    if how == "output":
        assert_close(out.value, net(x))
    assert paths["wraps"] == 1  # layer1; the root, an OptimizedModule, has its forward set on the instance
    assert_clean(net)


@pytest.mark.parametrize("edit", [False, True])
def test_an_install_that_fails_part_way_leaves_nothing(paths, edit):
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(2, 5)
    layer2 = net.layer2
    with pytest.raises(Exception, match="layer2"):
        with model.trace(x):
            if edit:
                model.layer1.output[:] = 0
            model.layer1.output.save()
            model.layer2.output.save()
            net.layer2 = None  # the tree changes before the run: hooking layer1 works, layer2 fails
    net.layer2 = layer2
    assert_clean(net)
    assert_close(net(x), layer2(net.layer1(x)))  # no wrap left editing layer1


class CopiesItsChild(torch.nn.Module):
    """Snapshots its child at every call (an EMA or teacher copy)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.child = torch.nn.Linear(3, 3)
        self.snapshot = None

    def forward(self, x):
        self.snapshot = copy.deepcopy(self.child)
        return self.child(x)


def test_a_copy_made_during_the_run_is_its_own_module(paths):
    net = CopiesItsChild()
    model = NNsight(net)
    x = torch.rand(2, 3)
    with model.trace(x):
        model.child.output[:] = 0
        out = model.output.save()
    assert_close(out.value, torch.zeros(2, 3))
    snapshot = net.snapshot
    with torch.no_grad():
        snapshot.weight.mul_(2)
    assert "forward" in snapshot.__dict__  # the wrap, bound to the copy
    # its own weights, and no edit
    assert_close(snapshot(x), torch.nn.functional.linear(x, snapshot.weight, snapshot.bias))
    assert "forward" not in snapshot.__dict__  # dropped at its first call
    assert paths["wraps"] >= 1
    assert_clean(net)


@pytest.mark.parametrize("edit", [False, True])
def test_a_loop_of_traces_leaves_no_reference_cycles(paths, edit):
    """A run's hooks and wraps hold what it read; they are freed when the run returns, not left in reference
    cycles for the cycle collector (a big model's activations would stay in memory until it ran). A wrap's
    forward finds its copy's by a mark, not by referring to itself."""
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.rand(2, 5)

    def trace():
        with model.trace(x):
            if edit:  # the general interpreter
                model.layer1.output[:, 0] = 0
            hidden = model.layer2.output.save()
        return hidden

    trace()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage, to be looked at
    try:
        got = [trace() for _ in range(5)]
        gc.collect()
        # (other threads of the test process may leave garbage of their own meanwhile: only this package's
        # functions, the hooks and wraps a run makes and the closures holding what they read, are looked for)
        ours = [
            o
            for o in gc.garbage
            if isinstance(o, types.FunctionType) and (o.__module__ or "").startswith("intervene_compiler")
        ]
        assert not ours, [o.__qualname__ for o in ours[:5]]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    for value in got:  # (after: torch.testing leaves garbage of its own)
        assert_close(value, net(x) if not edit else _edited(net, x))
    assert paths["wraps"] >= 1 and paths["reads"] >= (0 if edit else 5)
    assert_clean(net)


def _edited(net, x):
    hidden = net.layer1(x).clone()
    hidden[:, 0] = 0
    return net.layer2(hidden)
