"""Never a silent wrong answer (issue 16): code that would do nothing, options that would be ignored, and edits
that would be lost raise a located error or do what Python would do, eagerly and compiled alike."""

from __future__ import annotations

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.errors import TracingError
from intervene_compiler.testing import assert_clean, save_tiny_lm, tiny_mlp

BOTH = [False, pytest.param(True, marks=pytest.mark.compiled)]


@pytest.fixture
def net():
    return tiny_mlp()


@pytest.mark.parametrize("compile", BOTH)
def test_a_function_applied_for_its_effect_runs(net, compile):
    """``ic.apply(seen.append, h)`` with the result unused runs once, on the real value, as Python would."""
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    seen, sums = [], []

    def note(t):
        sums.append(float(t.sum()))

    with model.trace(x, compile=compile):
        ic.apply(seen.append, model.layer1.output)
        ic.apply(note, model.layer1.output)
    assert len(seen) == 1 and type(seen[0]) is torch.Tensor
    torch.testing.assert_close(seen[0], net.layer1(x))
    assert sums == pytest.approx([float(net.layer1(x).sum())], rel=1e-5)
    model.clear_compiled()  # the compiled backend's dispatcher hooks stay until then
    assert_clean(net)


@pytest.mark.parametrize("kind", ["output", "input"])
def test_setting_a_site_to_none_is_an_error(net, kind):
    model = ic.NNsight(net)
    with pytest.raises(TracingError, match=f"model.layer1.{kind} = None") as info:
        with model.trace(torch.rand(1, 5)):
            setattr(model.layer1, kind, None)
    assert info.value.loc is not None and info.value.loc.filename == __file__
    with model.trace(torch.rand(1, 5)):  # the next trace works
        out = model.output.save()
    assert out.value.shape == (1, 2)
    assert_clean(net)


def test_a_misspelled_site_is_an_error_inside_a_block(net):
    model = ic.NNsight(net)
    with pytest.raises(TracingError, match="did you mean `model.layer1.output`"):
        with model.trace(torch.rand(1, 5)):
            model.layer1.ouptut = torch.zeros(1, 10)
    assert not hasattr(net.layer1, "ouptut")
    model.layer1.scale = 2.0  # outside a block, an attribute of the module, as torch sets it
    assert net.layer1.scale == 2.0


def test_remote_is_never_ignored(net, tmp_path):
    model = ic.NNsight(net)
    for open_block in (
        lambda: model.trace(torch.rand(1, 5), remote=True),
        lambda: model.session(remote=True),
    ):
        with pytest.raises(TracingError, match="remote=True") as info:
            open_block()
        assert info.value.loc is not None and info.value.loc.filename == __file__
    # a model a service can host: the block goes to the service (none listens here), never runs locally
    from intervene_compiler.remote.client import RemoteError

    lm = ic.LanguageModel(save_tiny_lm(tmp_path / "lm"))
    ic.CONFIG.API.HOST, saved = "127.0.0.1:9", ic.CONFIG.API.HOST  # the discard port: nothing answers
    try:
        with pytest.raises(RemoteError, match="cannot reach the intervention service"):
            with lm.generate("Hello", max_new_tokens=2, remote=True):
                lm.generator.output.save()
        with pytest.raises(RemoteError, match="cannot reach the intervention service") as error:
            with lm.trace("Hello", remote=True):
                lm.transformer.h[0].output.save()
        assert error.value.loc is not None and error.value.loc.filename == __file__
    finally:
        ic.CONFIG.API.HOST = saved
    assert not lm.dispatched  # nothing loaded, nothing ran here


def test_a_failing_edit_leaves_no_edit_behind(net):
    """An edit whose body fails when a trace runs it raises once, names its line, and is removed: the next trace
    runs without it (and another, good edit stays)."""
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    with model.edit(inplace=True):
        model.layer1.output[:, 0] = 0.0  # a good edit
    with model.edit(inplace=True):
        model.layer1.output[:, 12] = 7.0  # the dimension has size 10
    with pytest.raises(IndexError) as info:
        with model.trace(x):
            model.output.save()
    assert info.value.loc.lineno == test_a_failing_edit_leaves_no_edit_behind.__code__.co_firstlineno + 8
    assert any("was removed from the model" in note for note in info.value.__notes__)
    with model.trace(x):
        out = model.output.save()
    h = net.layer1(x)
    h[:, 0] = 0.0
    torch.testing.assert_close(out.value, net.layer2(h))  # the good edit still applies
    assert_clean(net)


# -- index bounds: a compiled program must never wrap an index eager indexing rejects ----------------------------
def _raises_same(run, eager_line: int):
    """``run(compile)`` raises the same IndexError subclass at the same line eagerly and compiled."""
    seen = []
    for compile in (False, True):
        with pytest.raises(IndexError) as info:
            run(compile)
        seen.append((type(info.value).__name__, info.value.loc.lineno, str(info.value).splitlines()[0]))
    assert seen[0] == seen[1], seen
    assert seen[0][1] == eager_line


def _line_of(fn, marker: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


@pytest.mark.compiled
def test_compiled_indexing_checks_bounds_like_eager(net):
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    ic.reset_compile_stats()

    def write(compile):
        with model.trace(x, compile=compile):
            model.layer1.output[:, 12] = 7.0  # write
            model.layer1.output.save()

    def read(compile):
        with model.trace(x, compile=compile):
            model.layer1.output[:, -11].save()  # read

    def in_place(compile):
        with model.trace(x, compile=compile):
            model.layer1.output[:, 10] += 1.0  # in place
            model.output.save()

    for run, marker in ((write, "# write"), (read, "# read"), (in_place, "# in place")):
        _raises_same(run, _line_of(run, marker))
    for compile in (False, True):  # in range, both ends: the same values
        with model.trace(x, compile=compile):
            model.layer1.output[:, -10] = 3.0
            model.layer1.output[:, 9] = 4.0
            h = model.layer1.output.save()
        assert h.value[0, 0] == 3.0 and h.value[0, 9] == 4.0
    stats = (
        ic.compile_stats()
    )  # the compiled runs compiled: the error came from the bounds check, not a fallback
    assert stats["fallbacks"] == 0 and stats["compiles"] >= 1
    model.clear_compiled()
    assert_clean(net)


@pytest.mark.compiled
def test_compiled_bounds_in_edits_and_sessions(net):
    x = torch.rand(1, 5)
    for compile in (False, True):
        model = ic.NNsight(net)
        with model.edit(inplace=True):
            model.layer1.output[:, 11] = 1.0  # edit
        with pytest.raises(IndexError) as info:
            with model.trace(x, compile=compile):
                model.output.save()
        assert info.value.loc.lineno == _line_of(test_compiled_bounds_in_edits_and_sessions, "# edit")
        with model.trace(x, compile=compile):  # the failed edit was removed: nothing wraps into the run
            out = model.output.save()
        torch.testing.assert_close(out.value, net(x))
        with pytest.raises(IndexError) as info:
            with model.session():
                with model.trace(x, compile=compile):
                    model.layer1.output[:, 20] = 0.0  # session
        assert info.value.loc.lineno == _line_of(test_compiled_bounds_in_edits_and_sessions, "# session")
        model.clear_compiled()
    assert_clean(net)


@pytest.mark.compiled
def test_compiled_token_columns_and_generation_check_bounds(lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    vocab = lm.config.vocab_size
    ic.reset_compile_stats()

    def columns(compile):
        with lm.trace("Hello world", compile=compile):
            (lm.lm_head.output[:, -1, vocab + 3] - lm.lm_head.output[:, -1, 0]).save()  # tokens

    _raises_same(columns, _line_of(columns, "# tokens"))
    width = lm.config.n_embd
    for compile in (False, True):
        with pytest.raises(IndexError) as info:
            with lm.generate("Hello", max_new_tokens=3, compile=compile) as tracer:
                with tracer.all():
                    lm.transformer.h[0].output[:, :, width + 1] = 0.0  # step
        assert info.value.loc.lineno == _line_of(
            test_compiled_token_columns_and_generation_check_bounds, "# step"
        )
    assert (
        ic.compile_stats()["fallbacks"] == 0
    )  # both checks came from compiled programs, not eager fallbacks


@pytest.mark.parametrize("compile", BOTH)
def test_a_session_that_fails_keeps_what_completed(net, compile):
    """The session raises at its second trace; the first trace's saved value is kept (never lose a completed
    result), and values the failed trace would have made say why they are missing."""
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    with pytest.raises(IndexError):
        with model.session():
            with model.trace(x, compile=compile):
                h = model.layer1.output.save()
            with model.trace(x, compile=compile):
                model.layer1.output[:, 30] = 1.0
                o = model.output.save()
    torch.testing.assert_close(h.value, net.layer1(x))
    with pytest.raises(ic.ValueNotReadyError, match="the session raised IndexError"):
        o.value  # noqa: B018
    model.clear_compiled()
    assert_clean(net)


@pytest.mark.parametrize("compile", BOTH)
@pytest.mark.parametrize("saved", [False, True])
def test_an_edit_from_a_later_module_is_an_error(net, compile, saved):
    """``layer1.output[:, :2] = layer2.output``: layer2 runs after layer1, so the model could never see the edit.
    Eager and compiled raise at that line (before: lost silently in compiled mode, and in eager mode once the edited
    value was also saved, which then showed an edit the model never saw)."""
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    with pytest.raises(ic.InterventionError, match="model.layer1") as info:
        with model.trace(x, compile=compile):
            model.layer1.output[:, :2] = model.layer2.output  # late
            if saved:
                model.layer1.output.save()
            model.output.save()
    assert info.value.loc.lineno == _line_of(test_an_edit_from_a_later_module_is_an_error, "# late")
    with model.trace(x):  # the next trace works
        out = model.output.save()
    torch.testing.assert_close(out.value, net(x))
    model.clear_compiled()
    assert_clean(net)


# -- the dtype rule of a set (item 5) ------------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_a_set_of_another_float_precision_is_cast_like_setitem(net, compile):
    """A float64 value set into a float32 site is cast to float32 (as ``out[...] = v`` casts), eager and compiled
    alike; the model keeps computing in float32. Checked against plain hooks doing the same cast."""
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    new = torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(2, 10)
    with model.trace(x, compile=compile):
        model.layer1.output = new
        hidden = model.layer1.output.save()
        out = model.output.save()
    handle = net.layer1.register_forward_hook(lambda mod, args, output: new.to(output.dtype))
    try:
        expected = net(x)
    finally:
        handle.remove()
    assert hidden.value.dtype == out.value.dtype == torch.float32
    torch.testing.assert_close(hidden.value, new.float())
    torch.testing.assert_close(out.value, expected)
    model.clear_compiled()
    assert_clean(net)


# -- valid code that was rejected or broken -------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_setting_a_gradient_that_is_never_read(compile):
    """``.grad = g`` then ``loss.backward()`` replaces the activation's gradient, as a tensor hook returning ``g``
    would; without a backward, or on a value that needs no grad, both modes raise the same GradientError."""
    x = torch.rand(2, 5)
    net = tiny_mlp().requires_grad_(True)
    model = ic.NNsight(net)
    g = torch.linspace(0, 1, 20).reshape(2, 10)
    with model.trace(x, compile=compile):
        model.layer1.output.grad = g
        model.output.sum().backward()
    got = net.layer1.weight.grad.clone()
    net.zero_grad()
    handle = net.layer1.register_forward_hook(
        lambda mod, args, output: output.register_hook(lambda grad: g) and None
    )
    try:
        net(x).sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(got, net.layer1.weight.grad)

    with pytest.raises(ic.GradientError, match="was set, but no backward pass") as info:
        with model.trace(x, compile=compile):
            model.layer1.output.grad = g  # no backward
            model.output.save()
    assert info.value.loc.lineno == _line_of(test_setting_a_gradient_that_is_never_read, "# no backward")
    frozen = ic.NNsight(tiny_mlp())  # parameters that need no grad: nothing upstream has a gradient
    for read in (False, True):
        with pytest.raises(ic.GradientError, match="does not require grad") as info:
            with frozen.trace(x, compile=compile):
                if read:
                    frozen.layer1.output.grad.save()  # read
                else:
                    frozen.layer1.output.grad = g  # set
                frozen.output.sum().backward()
        marker = "# read" if read else "# set"
        assert info.value.loc.lineno == _line_of(test_setting_a_gradient_that_is_never_read, marker)
    model.clear_compiled()
    frozen.clear_compiled()


@pytest.mark.compiled
def test_a_users_mistake_does_not_stop_a_structure_compiling():
    """A compiled trace that fails for the user's mistake runs (and reports) eagerly, but once fixed, the same
    structure compiles: the mistake is not taken for something the compiler cannot do."""
    x = torch.rand(2, 5)
    net = tiny_mlp()
    model = ic.NNsight(net)
    ic.reset_compile_stats()
    for fixed in (False, True):
        net.requires_grad_(fixed)
        try:
            with model.trace(x, compile=True):
                grad = model.layer1.output.grad.save()
                model.output.sum().backward()
        except ic.GradientError:
            assert not fixed
        else:
            assert fixed
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0 and stats["compiled_calls"] == 1, stats
    net.zero_grad()
    torch.testing.assert_close(grad.value, net.layer2.weight.detach().sum(0, keepdim=True).expand(2, 10))
    model.clear_compiled()


class _SitesByName(torch.nn.Module):
    """Submodules named like the sites: ``model.input`` / ``model.output`` are the root's sites."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.input = torch.nn.Linear(4, 6)
        self.output = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.output(self.input(x).relu())


@pytest.mark.parametrize("compile", BOTH)
def test_submodules_named_output_and_input_are_reachable(compile):
    net = _SitesByName().requires_grad_(False)
    with pytest.warns(UserWarning, match="named 'input'"):
        model = ic.NNsight(net)
    x = torch.rand(3, 4)
    with model.trace(x, compile=compile):
        first = model.get("input").output.save()
        model["output"].input[:, 0] = 0.0
        head = model.get("model.output").output.save()
        out = model.output.save()
    edited = net.input(x).relu()
    edited[:, 0] = 0
    torch.testing.assert_close(first.value, net.input(x))
    torch.testing.assert_close(head.value, net.output(edited))
    torch.testing.assert_close(out.value, head.value)
    with pytest.warns(UserWarning):
        renamed = ic.NNsight(net, rename={"output": "head"})
    with renamed.trace(x, compile=compile):
        out = renamed.head.output.save()
    torch.testing.assert_close(out.value, net(x))
    model.clear_compiled()
    renamed.clear_compiled()
    assert_clean(net)


@pytest.mark.compiled
def test_a_model_pickles_after_compiled_traces(net, tmp_path):
    """The compiled backend's hooks stay on the model between traces: a pickled or copied model gets inert ones,
    and the wrapper pickles with its module (its compiled programs stay in this process)."""
    import copy
    import pickle

    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x, compile=True):
        model.layer1.output[:, 0] = 1.0
        out = model.output.save()
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    copied = copy.deepcopy(net)
    for module in (loaded, copied):
        torch.testing.assert_close(module(x), net(x))
    again = pickle.loads(pickle.dumps(model))
    for compile in (False, True):
        with again.trace(x, compile=compile):
            again.layer1.output[:, 0] = 1.0
            out2 = again.output.save()
        torch.testing.assert_close(out2.value, out.value)
    model.clear_compiled()
    again.clear_compiled()
    assert_clean(net)
    assert_clean(again._module)


@pytest.mark.compiled
def test_an_interrupt_while_compiling_is_raised_and_forgotten(net, monkeypatch):
    """Ctrl-C while Dynamo traces a program reaches the user (Dynamo would turn it into a compile failure, and the
    run would quietly go on eagerly), and the structure compiles on the next trace."""
    from intervene_compiler.backends.compiled import program

    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    interrupt = [True]  # read while Dynamo traces; changed only outside it
    on_event = program.Program.on_event

    def interrupted(self, key, value):
        if interrupt[0]:
            raise KeyboardInterrupt
        return on_event(self, key, value)

    monkeypatch.setattr(program.Program, "on_event", interrupted)
    ic.reset_compile_stats()
    with pytest.raises(KeyboardInterrupt):
        with model.trace(x, compile=True):
            hidden = model.layer1.output.save()
    interrupt[0] = False
    with model.trace(x, compile=True):
        hidden = model.layer1.output.save()
    torch.testing.assert_close(hidden.value, net.layer1(x))
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0 and stats["compiled_calls"] == 1, stats
    model.clear_compiled()
