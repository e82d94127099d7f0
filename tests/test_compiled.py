"""The compiled backend: parity with the eager backend, compile-once sweeps, fallbacks, an inert model.

Every compiled result is compared with the same trace run by the eager backend (which the other test files check
against plain PyTorch hooks). Inductor compiles are slow on this CPU, so the tier uses the tiny models and one
structure per program; sweeps assert exactly one compile.
"""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, tiny_gpt2, tiny_mlp

pytestmark = pytest.mark.compiled


@pytest.fixture(scope="module")
def mlp():
    model = ic.NNsight(tiny_mlp())
    yield model
    model.clear_compiled()
    assert_clean(model._model)


@pytest.fixture(scope="module")
def gpt():
    model = ic.NNsight(tiny_gpt2(n_layer=2))
    yield model
    model.clear_compiled()
    assert_clean(model._model)


@pytest.fixture(autouse=True)
def _stats():
    ic.reset_compile_stats()
    yield


def _both(model, program, *inputs):
    """Run ``program(model)`` inside an eager and a compiled trace; return both lists of saved values."""
    results = []
    for compile in (False, True):
        with model.trace(*inputs, compile=compile) as tracer:
            saved = program(model, tracer)
        results.append([s.value for s in saved])
    return results


def _programs():
    def save_outputs(m, t):
        return [m.layer1.output.save(), m.layer2.input.save(), m.output.save()]

    def set_output(m, t):
        m.layer1.output = m.layer1.output * 0.5 + 1
        return [m.output.save()]

    def setitems(m, t):
        m.layer1.output[:, 0] = 0
        m.layer1.output[:, -1] = 3
        return [m.layer1.output.save(), m.output.save()]

    def stop_early(m, t):
        h = m.layer1.output.save()
        m.layer1.output.stop()
        return [h]

    def adhoc_module_call(m, t):
        return [m.layer2(m.layer1.output * 2).save()]

    def inputs_and_builtins(m, t):
        items = ic.list().save()
        items.append(m.layer2.input.sum())
        m.layer2.inputs = ((m.layer2.input + 1,), {})
        return [m.output.save(), items]

    return [save_outputs, set_output, setitems, stop_early, adhoc_module_call, inputs_and_builtins]


@pytest.mark.parametrize("program", _programs(), ids=lambda p: p.__name__)
def test_parity_tiny_mlp(mlp, program):
    x = torch.rand(2, 5)
    eager, compiled = _both(mlp, program, x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0, stats["fallback_reasons"]
    assert stats["compiled_calls"] == 1


def test_parity_with_invokes_and_cross_invoke_patch(mlp):
    a, b = torch.rand(1, 5), torch.rand(2, 5)

    def program(m, compile):
        with m.trace(compile=compile) as tracer:
            with tracer.invoke(a):
                h = m.layer1.output
            with tracer.invoke(b):
                m.layer1.output[:, 0] = h[0, 0]
                out = m.output.save()
        return out.value

    torch.testing.assert_close(program(mlp, True), program(mlp, False))
    assert ic.compile_stats()["fallbacks"] == 0


def test_position_sweep_compiles_once(gpt):
    ids = torch.randint(0, 128, (1, 8))
    v = torch.randn(32)
    for pos in range(8):
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile):
                gpt.transformer.h[0].output[:, pos] = v
                outs.append(gpt.lm_head.output[:, -1].save())
        torch.testing.assert_close(outs[0].value, outs[1].value)
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["fallbacks"] == 0
    assert stats["cache_hits"] == 7


def test_picked_vocabulary_columns_compile_once_over_a_token_sweep(gpt):
    """``logits[:, -1, a] - logits[:, -1, b]`` computes two weight rows, not the unembedding; the tokens are
    runtime inputs, so sweeping them does not recompile."""
    ids = torch.randint(0, 128, (2, 6))
    for a, b in [(5, 7), (9, 3), (127, 0)]:
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile) as tracer:
                logits = gpt.lm_head.output
                outs.append((logits[:, -1, a] - logits[:, -1, b]).save())
            if compile:
                code = tracer._entry.graphs[-1].code
        torch.testing.assert_close(outs[0].value, outs[1].value)
        with torch.no_grad():
            ref = gpt._model(ids).logits[:, -1]
        torch.testing.assert_close(outs[0].value, ref[:, a] - ref[:, b])
    assert "h_1" in code and "lm_head" not in code  # the program ends at the unembedding's input
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 2 and stats["fallbacks"] == 0, stats


def test_value_and_scale_sweep_compiles_once(gpt):
    ids = torch.randint(0, 128, (2, 6))
    for step in range(5):
        steer = torch.randn(32)
        scale = 0.5 * step
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile):
                gpt.transformer.h[1].output[:, -1] += steer * scale
                outs.append(gpt.output.logits.save())
        torch.testing.assert_close(outs[0].value, outs[1].value)
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 4 and stats["fallbacks"] == 0, stats


def test_a_value_written_through_a_tuple_element_sweeps_without_compiling_again(gpt):
    """``attn.output[0][:, :, :4] = v`` (an element of a tuple output, an index of slices only): the value is an
    input of the program, so a sweep compiles once; each value equals eager mode and a plain hook."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    net = gpt._module
    for step in range(4):
        value = 0.5 * step + 1.0
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile):
                gpt.transformer.h[0].attn.output[0][:, :, :4] = value
                outs.append(gpt.output.logits.save())

        def hook(m, args, out, value=value):
            first = out[0].clone()
            first[:, :, :4] = value
            return (first, *out[1:])

        handle = net.transformer.h[0].attn.register_forward_hook(hook)
        try:
            with torch.no_grad():
                plain = net(ids).logits
        finally:
            handle.remove()
        torch.testing.assert_close(outs[0].value, outs[1].value)
        torch.testing.assert_close(outs[1].value, plain)
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 3 and stats["fallbacks"] == 0, stats


def test_truncation_cuts_the_compiled_program(gpt):
    ids = torch.randint(0, 128, (1, 8))
    with gpt.trace(ids, compile=True) as tracer:
        emb = gpt.transformer.wte.output.save()
    with gpt.trace(ids):
        expected = gpt.transformer.wte.output.save()
    torch.testing.assert_close(emb.value, expected.value)
    code = tracer._entry.graphs[-1].code
    assert "h_0" not in code and "lm_head" not in code  # nothing after the embedding was traced
    # a block of a ModuleList is a site family (all blocks run, gated), cut after the last block
    with gpt.trace(ids, compile=True) as tracer:
        gpt.transformer.h[0].output.save()
    code = tracer._entry.graphs[-1].code
    assert "h_1" in code and "ln_f" not in code and "lm_head" not in code
    assert "spliced FX graph" in tracer.explain(file=io.StringIO())


def test_unsupported_structure_falls_back_with_a_reason(mlp):
    """A stop under a condition on a tensor is control flow of the forward itself: eager, with the reason."""

    def program(compile):
        with mlp.trace(torch.ones(1, 5), compile=compile) as tracer:
            h = mlp.layer1.output.save()
            with tracer.cond(mlp.layer1.output.sum() > -1e9):
                tracer.stop()
        return tracer, h.value

    tracer, compiled = program(True)
    torch.testing.assert_close(compiled, program(False)[1])
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 1 and "tracer.stop()" in stats["fallback_reasons"][0], stats
    assert "fell back to eager" in tracer.explain(file=io.StringIO())


def _cond_program(m, tracer, x_scale):
    s = m.layer1.output.sum()
    with tracer.cond(s > 0) as c:
        m.layer1.output[:, 0] = 1  # an in-place write, undone where the condition is false
    with c.else_():
        m.layer1.output = m.layer1.output * -2  # a whole-value set: where(condition, new, old)
    with tracer.cond(s > 0):
        taken = m.layer2.output.save()
    skipped_or_not = ic.list().save()
    with tracer.cond(s * x_scale > 0.25):
        skipped_or_not.append(m.layer2.output.sum())
        tracer.log("branch taken")
    return [m.layer1.output.save(), m.output.save(), skipped_or_not], taken


def test_cond_on_a_tensor_compiles_once_for_both_branches(mlp, capsys):
    """`tracer.cond` on a tensor is predicated: both branches in one program, chosen by `torch.where`."""
    seen = set()
    for sign, scale in [(1.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (-1.0, 2.0)]:
        x = torch.rand(2, 5) * sign
        results, taken, printed = [], [], []
        for compile in (False, True):
            with mlp.trace(x, compile=compile) as tracer:
                saved, t = _cond_program(mlp, tracer, scale)
            results.append([v.value for v in saved])
            printed.append(capsys.readouterr().out)
            try:
                taken.append(t.value)
            except ic.ValueNotReadyError as e:
                assert "condition guarding it" in str(e)
                taken.append(None)
        for e, c in zip(*results):
            torch.testing.assert_close(c, e)
        assert printed[0] == printed[1]
        assert (taken[0] is None) == (taken[1] is None)
        if taken[0] is not None:
            torch.testing.assert_close(taken[1], taken[0])
        seen.add(taken[0] is None)
    assert seen == {True, False}, "both branches ran"
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 3 and stats["fallbacks"] == 0, stats


def test_cond_in_a_layer_and_threshold_sweep(gpt):
    """A patch under a condition, swept over layers and thresholds: one program (the gate and the threshold are
    inputs)."""
    ids = torch.randint(0, 128, (2, 6))
    v = torch.randn(32)
    for layer, threshold in [(0, -1e9), (1, 1e9), (1, -1e9), (0, 1e9)]:
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile) as tracer:
                norm = gpt.transformer.h[layer].output[:, -1].norm()
                with tracer.cond(norm > threshold):
                    gpt.transformer.h[layer].output[:, 2] = v
                logits = gpt.lm_head.output[:, -1].save()
            outs.append(logits.value)
        torch.testing.assert_close(outs[0], outs[1])
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 3 and stats["fallbacks"] == 0, stats


def test_cond_saves_in_a_layer_sweep(gpt):
    """Values saved under a condition inside a site family (the layer is an input): each is kept or reported
    skipped exactly as in eager mode, and a 0-d value keeps its shape through the member gating."""
    ids = torch.randint(0, 128, (2, 6))
    v = torch.randn(32)
    seen = set()
    for layer, threshold in [(0, -1e9), (1, 1e9), (1, -1e9), (0, 1e9)]:
        results = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile) as tracer:
                h = gpt.transformer.h[layer].output
                with tracer.cond(h[:, -1].norm() > threshold) as c:
                    h[:, 1] = v
                    inside = h.sum(-1).save()
                with c.else_():
                    other = (h * 2).mean().save()  # 0-d
                logits = gpt.lm_head.output[:, -1].save()
            got = []
            for saved in (inside, other, logits):
                try:
                    got.append(saved.value)
                except ic.ValueNotReadyError:
                    got.append(None)
            results.append(got)
        for c_value, e_value in zip(*results):
            assert (c_value is None) == (e_value is None)
            if e_value is not None:
                torch.testing.assert_close(c_value, e_value)
        seen.add(results[1][0] is None)
    assert seen == {True, False}
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 3 and stats["fallbacks"] == 0, stats


def test_cond_on_python_values_is_fixed_per_structure(mlp, capsys):
    """A condition on a Python value is known when the trace is recorded: its false branch is not compiled."""
    x = torch.rand(2, 5)
    for n in (8, 3):
        for compile in (False, True):
            with mlp.trace(x, compile=compile) as tracer:
                with tracer.cond(n % 2 == 0):
                    tracer.log("even")
                    even = mlp.layer1.output.save()
                with tracer.cond(n % 2 == 1):
                    tracer.log("odd")
            assert capsys.readouterr().out == ("even\n" if n == 8 else "odd\n")
            if n == 8:
                torch.testing.assert_close(even.value, mlp._model.layer1(x))
            else:
                with pytest.raises(ic.ValueNotReadyError, match="condition guarding it"):
                    _ = even.value
    assert ic.compile_stats()["fallbacks"] == 0


def _assert_caches_equal(compiled: dict, eager: dict) -> None:
    assert list(compiled) == list(eager)
    for name, entry in eager.items():
        assert isinstance(compiled[name], ic.CacheEntry)
        for field in ("output", "inputs"):
            want, got = getattr(entry, field), getattr(compiled[name], field)
            want_leaves, got_leaves = (
                torch.utils._pytree.tree_leaves(want),
                torch.utils._pytree.tree_leaves(got),
            )
            assert len(got_leaves) == len(want_leaves), (name, field)
            for g, w in zip(got_leaves, want_leaves):
                if isinstance(w, torch.Tensor):
                    torch.testing.assert_close(g, w, msg=lambda m, where=f"{name}.{field}": f"{where}: {m}")


def test_cache_compiles_with_invokes_inputs_and_selected_modules(mlp):
    x = torch.rand(3, 5)
    results = []
    for compile in (False, True):
        with mlp.trace(compile=compile) as tracer:
            with tracer.invoke(x[:1]):
                every = tracer.cache()
                mlp.layer1.output[:] = 0  # in place: the cached layer1 output reads zeros
            with tracer.invoke(x[1:]):
                with_inputs = tracer.cache(include_inputs=True)
                some = tracer.cache(modules=[mlp.layer2])
                mlp.layer2.output = mlp.layer2.output * 2  # replaced: the cache keeps the original
        results.append([every.value, with_inputs.value, some.value])
    for compiled, eager in zip(results[1], results[0]):
        _assert_caches_equal(compiled, eager)
    assert list(results[1][2]) == ["model.layer2"]
    stats = ic.compile_stats()
    assert stats["compiled_calls"] == 1 and stats["fallbacks"] == 0, stats


def test_cache_of_every_module_in_a_layer_sweep(gpt):
    """Caching a GPT-2's every module while patching block L in place, L swept: one program."""
    ids = torch.randint(0, 128, (2, 6))
    for layer in (0, 1):
        caches = []
        for compile in (False, True):
            with gpt.trace(ids, compile=compile) as tracer:
                cache = tracer.cache()
                gpt.transformer.h[layer].output[:, 1] = 0
            caches.append(cache.value)
        _assert_caches_equal(caches[1], caches[0])
        assert len(caches[0]) > 20
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 1 and stats["fallbacks"] == 0, stats


def test_model_default_and_inert_dispatcher():
    net = tiny_mlp()
    model = ic.NNsight(net, compile=True)
    x = torch.rand(3, 5)
    plain = net(x)
    with model.trace(x):
        model.layer1.output[:] = 0
        out = model.output.save()
    torch.testing.assert_close(out.value, net.layer2(torch.zeros(3, 10)))
    assert ic.compile_stats()["compiled_calls"] == 1
    torch.testing.assert_close(
        net(x), plain
    )  # dispatcher hooks stay installed but do nothing outside a trace
    model.clear_compiled()
    assert_clean(net)


def test_activation_gradients_compile_with_probes(mlp):
    x = torch.rand(2, 5)
    results = []
    for compile in (False, True):
        with mlp.trace(x, compile=compile):
            mlp.layer1.output.requires_grad = True
            g1 = mlp.layer1.output.grad.save()
            g2 = (mlp.layer2.output.grad * 2).save()
            mlp.output.sum().backward()
        results.append((g1.value, g2.value))
    torch.testing.assert_close(results[1], results[0])
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0 and stats["compiled_calls"] == 1, stats["fallback_reasons"]
    torch.testing.assert_close(results[1][1], torch.full((2, 2), 2.0))


def test_backward_block_compiles(gpt):
    ids = torch.randint(0, 128, (2, 6))
    results = []
    for compile in (False, True):
        with gpt.trace(ids, compile=compile):
            hidden = gpt.transformer.h[0].output
            logits = gpt.lm_head.output
            with logits.sum().backward():
                grad = hidden.grad.save()
        results.append(grad.value)
        gpt._model.zero_grad()
    torch.testing.assert_close(results[1], results[0])
    assert ic.compile_stats()["fallbacks"] == 0


def test_gradient_edits_compile(mlp):
    """`.grad = ...` and `.grad[...] = v` change the gradient flowing further back, compiled as in eager mode."""
    x = torch.rand(2, 5)

    def edits(m, t):
        m.layer1.output.requires_grad = True
        m.layer1.output.grad[:, 0] = 0  # in place on the gradient
        m.layer2.output.grad = m.layer2.output.grad * 2
        saved = [m.layer1.output.grad.save(), m.layer2.output.grad.save()]
        m.output.sum().backward()
        return saved

    def doubled_in_backward_block(m, t):
        hidden = m.layer1.output
        hidden.requires_grad = True
        logits = m.output
        with (logits * logits).sum().backward():
            logits.grad = logits.grad * 2
            hidden_grad = hidden.grad.save()
        return [hidden_grad]

    eager, compiled = _both(mlp, edits, x)
    eager_block, compiled_block = _both(mlp, doubled_in_backward_block, x)
    results = [eager + eager_block, compiled + compiled_block]
    for c, e in zip(results[1], results[0]):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(results[1][1], torch.full((2, 2), 2.0))
    expected = 2 * mlp._model.layer2.weight.sum(0).expand(2, -1).clone()
    expected[:, 0] = 0
    torch.testing.assert_close(results[1][0], expected)
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0 and stats["compiled_calls"] == 2, stats


def test_a_wrong_gradient_edit_names_the_line_and_the_next_trace_works(mlp):
    x = torch.rand(2, 5)
    with pytest.raises(ic.SetShapeError) as info:
        with mlp.trace(x, compile=True):
            mlp.layer1.output.requires_grad = True
            line = inspect.currentframe().f_lineno + 1
            mlp.layer2.output.grad = torch.zeros(3)
            mlp.output.sum().backward()
    assert info.value.loc is not None and info.value.loc.lineno == line, info.value
    assert "the gradient" in str(info.value)
    for compile in (True, False):  # the backward's edits are gone; the model runs as before
        with mlp.trace(x, compile=compile):
            out = mlp.output.save()
        torch.testing.assert_close(out.value, mlp._model(x))
    with torch.enable_grad():
        y = mlp._model(x.requires_grad_())
        y.sum().backward()  # a plain backward after the failed one: no edit applies
    assert x.grad is not None


def test_gradient_edit_reaches_a_trainable_parameter(gpt):
    """A steering vector before a block whose gradient is edited (one invoke's rows): its `.grad` is what eager
    mode computes, and the structure compiles once."""
    ids = torch.randint(0, 128, (3, 6))
    grads = {}
    for compile in (False, True, True):
        steer = torch.zeros(32, requires_grad=True)
        with gpt.trace(compile=compile) as tracer:
            with tracer.invoke(ids[:1]):
                gpt.transformer.h[0].output = gpt.transformer.h[0].output + steer
            with tracer.invoke(ids[1:]):
                gpt.transformer.h[0].output = gpt.transformer.h[0].output + steer
                gpt.transformer.h[1].mlp.output.grad[:, 3:] = 0  # the last positions: the loss reads them
            gpt.lm_head.output[:, -1, 5].sum().backward()
        grads.setdefault(compile, []).append(steer.grad)
        gpt._model.zero_grad()
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][0])
    steer = torch.zeros(32, requires_grad=True)
    with gpt.trace(ids):  # no edit: a different gradient
        gpt.transformer.h[0].output = gpt.transformer.h[0].output + steer
        gpt.lm_head.output[:, -1, 5].sum().backward()
    gpt._model.zero_grad()
    assert not torch.allclose(steer.grad, grads[False][0])
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 1 and stats["fallbacks"] == 0, stats


def _train_steering(gpt, ids, steps, compile):
    torch.manual_seed(0)
    steer = torch.zeros(32, requires_grad=True)
    opt = torch.optim.Adam([steer], lr=0.05)
    for _ in range(steps):
        with gpt.trace(ids, compile=compile):
            gpt.transformer.h[0].output[:, -1] += steer
            loss = -gpt.lm_head.output[:, -1, 5].mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
    return steer.detach()


def _train_steering_with_hooks(module, ids, steps):
    torch.manual_seed(0)
    steer = torch.zeros(32, requires_grad=True)
    opt = torch.optim.Adam([steer], lr=0.05)

    def add(mod, args, out):
        out = out.clone()
        out[:, -1] += steer
        return out

    handle = module.transformer.h[0].register_forward_hook(add)
    try:
        for _ in range(steps):
            loss = -module(ids).logits[:, -1, 5].mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        handle.remove()
    return steer.detach()


def test_steering_vector_training_loop_compiles_once(gpt):
    ids = torch.randint(0, 128, (4, 6))
    expected = _train_steering_with_hooks(gpt._model, ids, 5)
    eager = _train_steering(gpt, ids, 5, compile=False)
    ic.reset_compile_stats()
    compiled = _train_steering(gpt, ids, 5, compile=True)
    gpt._model.zero_grad()
    torch.testing.assert_close(eager, expected)
    torch.testing.assert_close(compiled, expected)
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 4 and stats["fallbacks"] == 0, stats


def test_lora_on_an_mlp_trains_compiled(mlp):
    x = torch.rand(8, 5)
    target = torch.rand(8, 2)
    trained = []
    for compile in (False, True):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(5, 2) * 0.1)
        b = torch.nn.Parameter(torch.zeros(2, 10))
        opt = torch.optim.SGD([a, b], lr=0.5)
        for _ in range(4):
            with mlp.trace(x, compile=compile):
                mlp.layer1.output = mlp.layer1.output + mlp.layer1.input @ a @ b
                loss = ((mlp.output - target) ** 2).mean()
                loss.backward()
            opt.step()
            opt.zero_grad()
        trained.append((a.detach(), b.detach()))
    torch.testing.assert_close(trained[1], trained[0])
    assert trained[1][1].abs().sum() > 0
    assert ic.compile_stats()["fallbacks"] == 0


def test_layer_sweep_compiles_once(gpt):
    """`h[L]` for L in a Python loop: the ModuleList index is a runtime input gating every block."""
    ids = torch.randint(0, 128, (2, 6))
    v = torch.randn(32)
    for layer in [1, 0, 1, 0]:
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile):
                gpt.transformer.h[layer].output[:, 2] = v
                mlp = gpt.transformer.h[layer].mlp.output.save()
                logits = gpt.lm_head.output[:, -1].save()
            outs.append((mlp.value, logits.value))
        torch.testing.assert_close(outs[0], outs[1])
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 3 and stats["fallbacks"] == 0, stats


def test_layer_sweep_of_reads_with_truncation(gpt):
    ids = torch.randint(0, 128, (1, 5))
    for layer in range(2):
        outs = []
        for compile in (True, False):
            with gpt.trace(ids, compile=compile):
                outs.append(gpt.transformer.h[layer].output.save())
        torch.testing.assert_close(outs[0].value, outs[1].value)
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 1, stats


def test_log_compiles_and_prints_after_the_forward(mlp, capsys):
    """`tracer.log` is a host effect: the graph compiles, the values print after the compiled forward."""
    x = torch.rand(2, 5)
    printed = []
    for compile in (False, True, True):
        with mlp.trace(x, compile=compile) as tracer:
            tracer.log("layer1 sum:", mlp.layer1.output.sum())
            out = mlp.output.save()
        printed.append(capsys.readouterr().out)
        torch.testing.assert_close(out.value, mlp._model(x))
    assert printed[0] == printed[1] == printed[2] and printed[0].startswith("layer1 sum: tensor(")
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0 and stats["compiles"] == 1 and stats["cache_hits"] == 1, stats


def _hooked(module: torch.nn.Module) -> set[str]:
    return {name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks}


def test_dispatcher_hooks_only_the_modules_programs_use():
    """Hooks go on the modules a program has events at (and stay); other modules run their plain forward, a
    second structure on another module adds its hook and still compiles, and eager runs are unaffected."""
    net = tiny_gpt2(n_layer=2).requires_grad_(False)
    model = ic.NNsight(net)
    ids = torch.randint(0, 128, (1, 6))
    plain = net(ids).logits
    with model.trace(ids, compile=True):
        model.transformer.h[1].mlp.output[:, 2] = 0
        a = model.lm_head.output.save()
    with model.trace(ids):
        model.transformer.h[1].mlp.output[:, 2] = 0
        a_eager = model.lm_head.output.save()
    torch.testing.assert_close(a.value, a_eager.value)
    # one block's module is a site family: every block's counterpart is hooked
    assert _hooked(net) == {"transformer.h.0.mlp", "transformer.h.1.mlp", "lm_head"}
    with model.trace(ids, compile=True):
        model.transformer.ln_f.input[:, 0] = 1.0
        b = model.output.save()
    with model.trace(ids):
        model.transformer.ln_f.input[:, 0] = 1.0
        b_eager = model.output.save()
    torch.testing.assert_close(b.value.logits, b_eager.value.logits)
    assert _hooked(net) == {"transformer.h.0.mlp", "transformer.h.1.mlp", "lm_head", "transformer.ln_f", ""}
    stats = ic.compile_stats()
    assert stats["compiles"] == 2 and stats["fallbacks"] == 0, stats
    torch.testing.assert_close(net(ids).logits, plain)  # the hooks stay, inert outside a compiled call
    with model.trace(ids):
        c = model.lm_head.output.save()
    torch.testing.assert_close(c.value, plain)
    model.clear_compiled()
    assert_clean(net)


def test_repeated_blocks_compile_as_regions_outside_the_program(monkeypatch):
    """Opt-in (``cache.REGIONAL``): blocks no program looks inside compile as nested regions, set only during the
    compiled call; a block with an event inside it is traced inline; members with trainable parameters under
    grad mode are no regions."""
    from intervene_compiler.backends.compiled import entry as cache

    monkeypatch.setattr(cache, "REGIONAL", True)
    net = tiny_gpt2(n_layer=2).requires_grad_(False)
    model = ic.NNsight(net)
    ids = torch.randint(0, 128, (1, 6))
    blocks = list(net.transformer.h)
    for layer in (0, 1):  # a site family on the blocks' outputs (hooks outside the blocks' forward)
        outs = []
        for compile in (True, False):
            with model.trace(ids, compile=compile):
                model.transformer.h[layer].output[:, 1] = 0
                outs.append(model.lm_head.output.save())
        torch.testing.assert_close(outs[0].value, outs[1].value)
    dispatcher = model._state.caches.compiled.dispatcher
    assert [m for m, _, _ in dispatcher.usable_regions()] == blocks
    assert all("forward" not in b.__dict__ for b in blocks)  # set only during a compiled call
    outs = []
    for compile in (True, False):  # an event inside block 0 (two blocks: no family): block 0 is traced inline
        with model.trace(ids, compile=compile):
            model.transformer.h[0].attn.output[0][:] = 0
            model.transformer.h[1].output[:, 0] = 1.0
            outs.append(model.lm_head.output.save())
    torch.testing.assert_close(outs[0].value, outs[1].value)
    assert [m for m, _, _ in dispatcher.usable_regions()] == blocks[1:]
    blocks[1].mlp.c_fc.weight.requires_grad_(True)
    assert dispatcher.usable_regions() == ()  # torch computes wrong gradients through such regions
    with torch.no_grad():
        assert [m for m, _, _ in dispatcher.usable_regions()] == blocks[1:]
    blocks[1].mlp.c_fc.weight.requires_grad_(False)
    stats = ic.compile_stats()
    assert stats["compiles"] == 2 and stats["fallbacks"] == 0, stats
    model.clear_compiled()
    assert_clean(net)


def test_a_kv_cache_passed_in_compiles_and_is_updated_like_eager(gpt):
    """`trace(next_token, past_key_values=cache, compile=True)`: recording the schedule works on a copy (it once
    wrote fake tensors into the user's cache, and the compiled call then crashed); the call updates the cache
    as the eager backend and plain forward hooks do."""
    prompt = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        prefix = gpt._model(prompt, use_cache=True).past_key_values
    caches, saved = [], []
    steer, token = torch.randn(32), torch.randint(0, 128, (1, 1))
    for compile in (False, True, True):
        cache = copy.deepcopy(prefix)
        with gpt.trace(token, past_key_values=cache, compile=compile):
            gpt.transformer.h[0].output[:, -1] += steer
            out = gpt.transformer.h[1].output.save()
        caches.append(cache)
        saved.append(out.value)
    # plain PyTorch: the same edit as forward hooks, on another copy of the cache
    plain_cache, plain_out = copy.deepcopy(prefix), []
    net = gpt._model

    def add(m, a, o):
        o = o.clone()
        o[:, -1] += steer
        return o

    handles = [
        net.transformer.h[0].register_forward_hook(add),
        net.transformer.h[1].register_forward_hook(lambda m, a, o: plain_out.append(o)),
    ]
    try:
        with torch.no_grad():
            net(token, past_key_values=plain_cache)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(saved[0], plain_out[0])
    torch.testing.assert_close(saved[1], saved[0])
    torch.testing.assert_close(saved[2], saved[0])
    for cache in caches + [plain_cache]:
        assert cache.get_seq_length() == 7
        for layer, want in zip(cache.layers, caches[0].layers):
            torch.testing.assert_close(layer.keys, want.keys)
            torch.testing.assert_close(layer.values, want.values)
        assert all(not isinstance(layer.keys, torch._subclasses.FakeTensor) for layer in cache.layers)
    stats = ic.compile_stats()
    assert stats["compiled_calls"] == 2 and stats["fallbacks"] == 0, stats
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["cache_hits"] == 1, stats


def test_lifted_inputs_are_made_on_the_models_device(gpt):
    """Indices, thresholds, the member index and the gates go where the model computes (a CPU index cannot index
    a CUDA activation). Checked with the meta device, since CI has no GPU."""
    from intervene_compiler.backends.compiled.lowering import lift_family, lift_values
    from intervene_compiler.backends.compiled.program import family_gates

    with gpt.trace(torch.randint(0, 128, (1, 6))) as tracer:
        gpt.transformer.h[1].output[:, 2] = gpt.transformer.h[1].output[:, 3] * 0.5
    graph = tracer.graph
    meta = torch.device("meta")
    lowered = lift_values(graph, meta)
    added = lowered.params[len(graph.params) :]
    assert added and all(p.device == meta for p in added)
    keyed, family = lift_family(lowered, gpt._module, meta)
    assert family is not None and keyed.params[family.param].device == meta
    assert all(g.device == meta for g in family_gates(family.size, family.member, meta))
    assert all(p.device.type == "cpu" for p in lift_values(graph).params[len(graph.params) :])
