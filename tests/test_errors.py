"""The error catalogue: every user mistake raises a typed error naming the user's line and saying what to do.

For each mistake a test checks (a) the exception type, both ours and the builtin base where there is one,
(b) that ``err.loc`` is the offending line of this file, the message shows that line's code and a hint says what to
do, (c) that no hook is left on the model and (d) that the next trace on the same model gives correct results.

The offending line is found with :func:`next_line`, called on the line just before the offending statement.
"""

from __future__ import annotations

import inspect
import linecache
import os
from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, tiny_mlp


# -- helpers ---------------------------------------------------------------------------------------------------------
def next_line() -> int:
    """The line number after the caller's line: call it just before the offending statement."""
    return inspect.currentframe().f_back.f_lineno + 1


def assert_names_line(err: BaseException, lineno: int) -> None:
    """``err`` is ours, located at ``lineno`` of this file, shows that line's code and has a hint."""
    assert isinstance(err, ic.InterventionError), type(err).__mro__
    assert err.loc is not None, f"no source line on: {err}"
    assert os.path.samefile(err.loc.filename, __file__), err.loc
    assert err.loc.lineno == lineno, f"error names line {err.loc.lineno}, expected {lineno}:\n{err}"
    code = linecache.getline(__file__, lineno).strip()
    assert code, lineno
    message = str(err)
    assert code in message, f"the message does not show the line's code {code!r}:\n{message}"
    assert isinstance(err.hint, str) and err.hint.strip(), f"no hint on: {message}"
    assert err.hint in message


def assert_recovers(model: ic.NNsight, module: torch.nn.Module, x: torch.Tensor) -> None:
    """No hook is left, and the next trace on the same model gives the plain forward's values."""
    assert_clean(module)
    with model.trace(x):
        hidden = model.layer1.output.save()
        out = model.output.save()
    torch.testing.assert_close(hidden.value.detach(), module.layer1(x).detach())
    torch.testing.assert_close(out.value.detach(), module(x).detach())
    assert_clean(module)


def assert_gpt2_recovers(model: ic.NNsight, module: torch.nn.Module, ids: torch.Tensor) -> None:
    assert_clean(module)
    with model.trace(ids):
        mlp = model.transformer.h[0].mlp.output.save()
        logits = model.output.logits.save()
    expected_mlp = []
    handle = module.transformer.h[0].mlp.register_forward_hook(lambda m, a, out: expected_mlp.append(out))
    try:
        with torch.no_grad():
            expected = module(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(mlp.value, expected_mlp[0])
    torch.testing.assert_close(logits.value, expected)
    assert_clean(module)


@contextmanager
def count_forwards(module: torch.nn.Module):
    """Count the module's forward calls on real tensors (``counts["real"]``) and on fake ones (``counts["fake"]``)."""
    counts = {"real": 0, "fake": 0}

    def hook(mod, args, output):
        fake = any(isinstance(a, FakeTensor) for a in args)
        counts["fake" if fake else "real"] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


# -- unknown modules -------------------------------------------------------------------------------------------------
def test_unknown_module_suggests_close_names(tiny, net, x):
    with pytest.raises(AttributeError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer3.output.save()
    err = info.value
    assert isinstance(err, ic.UnknownModuleError)
    assert_names_line(err, line)
    assert "'layer3'" in str(err)
    assert "'layer1'" in err.hint
    assert_recovers(tiny, net, x)


# -- Python control flow on a proxy ----------------------------------------------------------------------------------
def _control_flow_error(info) -> ic.ProxyControlFlowError:
    err = info.value
    assert isinstance(err, ic.ProxyControlFlowError)
    assert isinstance(err, TypeError)
    return err


def test_if_on_proxy(tiny, net, x):
    with pytest.raises(TypeError) as info:
        with tiny.trace(x):
            hidden = tiny.layer1.output
            line = next_line()
            if hidden.sum() > 0:
                tiny.layer2.output[:] = 0
    err = _control_flow_error(info)
    assert_names_line(err, line)
    assert "tracer.cond" in err.hint and "torch.where" in err.hint
    assert_recovers(tiny, net, x)


def test_int_of_proxy(tiny, net, x):
    with pytest.raises(TypeError) as info:
        with tiny.trace(x):
            line = next_line()
            int(tiny.layer1.output.argmax())
    err = _control_flow_error(info)
    assert_names_line(err, line)
    assert "ic.apply" in err.hint
    assert_recovers(tiny, net, x)


def test_float_of_proxy(tiny, net, x):
    with pytest.raises(TypeError) as info:
        with tiny.trace(x):
            line = next_line()
            float(tiny.layer1.output.sum())
    err = _control_flow_error(info)
    assert_names_line(err, line)
    assert "ic.apply" in err.hint
    assert_recovers(tiny, net, x)


def test_for_loop_over_proxy(tiny, net, x):
    with pytest.raises(TypeError) as info:
        with tiny.trace(x):
            line = next_line()
            for row in tiny.layer1.output:
                row.save()
    err = _control_flow_error(info)
    assert_names_line(err, line)
    assert "ic.apply" in err.hint
    assert_recovers(tiny, net, x)


def test_len_of_proxy(tiny, net, x):
    with pytest.raises(TypeError) as info:
        with tiny.trace(x):
            line = next_line()
            len(tiny.layer1.output)
    err = _control_flow_error(info)
    assert_names_line(err, line)
    assert ".shape" in err.hint and "ic.apply" in err.hint
    assert_recovers(tiny, net, x)


def test_proxy_as_python_list_index(tiny, net, x):
    names = ["a", "b", "c"]
    with pytest.raises(TypeError) as info:
        with tiny.trace(x):
            best = tiny.layer2.output.argmax()
            line = next_line()
            names[best]
    err = _control_flow_error(info)
    assert_names_line(err, line)
    assert "ic.apply" in err.hint
    assert_recovers(tiny, net, x)


# -- .value ----------------------------------------------------------------------------------------------------------
def test_value_read_inside_block(tiny, net, x):
    with pytest.raises(ValueError) as info:
        with tiny.trace(x):
            hidden = tiny.layer1.output.save()
            line = next_line()
            print(hidden.value)
    err = info.value
    assert isinstance(err, ic.ValueNotReadyError)
    assert_names_line(err, line)
    assert_recovers(tiny, net, x)


def test_value_of_unsaved_after_block(tiny, net, x):
    with tiny.trace(x):
        made = next_line()
        hidden = tiny.layer1.output
    with pytest.raises(ValueError) as info:
        line = next_line()
        print(hidden.value)
    err = info.value
    assert isinstance(err, ic.ValueNotReadyError)
    assert_names_line(err, line)
    assert f"{err.loc.filename}:{made}" in str(err), "the message names where the value was recorded"
    assert ".save()" in err.hint
    assert_recovers(tiny, net, x)


def test_value_of_saved_value_after_a_failed_trace(tiny, net, x):
    with pytest.raises(IndexError):
        with tiny.trace(x):
            hidden = tiny.layer1.output.save()
            tiny.layer1.output[:, 10] = 0
    with pytest.raises(ValueError) as info:
        line = next_line()
        print(hidden.value)
    err = info.value
    assert isinstance(err, ic.ValueNotReadyError)
    assert_names_line(err, line)
    assert "IndexError" in str(err)
    assert_recovers(tiny, net, x)


# -- setting a value of the wrong shape ------------------------------------------------------------------------------
def test_set_wrong_shape_at_run_time(tiny, net, x):
    with pytest.raises(ValueError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer1.output = torch.zeros(3, 3)
    err = info.value
    assert isinstance(err, ic.SetShapeError)
    assert_names_line(err, line)
    assert "(3, 3)" in str(err) and "(1, 10)" in str(err)
    assert_recovers(tiny, net, x)


def test_set_wrong_shape_with_validate_fails_before_the_model_runs(tiny, net, x):
    reached = False
    with count_forwards(net) as counts:
        with pytest.raises(ValueError) as info:
            with tiny.trace(x, scan=True, validate=True):
                line = next_line()
                tiny.layer1.output = torch.zeros(3, 3)
                reached = True
    err = info.value
    assert isinstance(err, ic.SetShapeError)
    assert_names_line(err, line)
    assert not reached, "validation raises at the line itself, while recording"
    assert counts["fake"] >= 1, "validation ran the model on fake tensors"
    assert counts["real"] == 0, "the real model never ran"
    assert_recovers(tiny, net, x)


# -- index out of bounds ---------------------------------------------------------------------------------------------
def test_index_out_of_bounds_at_run_time(tiny, net, x):
    with pytest.raises(IndexError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer1.output[:, 10] = 0
    err = info.value
    assert_names_line(err, line)
    assert "out of bounds" in str(err)
    assert isinstance(err.__cause__, IndexError) and not isinstance(err.__cause__, ic.InterventionError)
    assert_recovers(tiny, net, x)


def test_index_out_of_bounds_with_validate_fails_before_the_model_runs(tiny, net, x):
    reached = False
    with count_forwards(net) as counts:
        with pytest.raises(IndexError) as info:
            with tiny.trace(x, scan=True, validate=True):
                tiny.layer1.output.clone().save()
                line = next_line()
                tiny.layer1.output[:, 10] = 0
                reached = True
    err = info.value
    assert_names_line(err, line)
    assert not reached
    assert counts["fake"] >= 1 and counts["real"] == 0
    assert_recovers(tiny, net, x)


# -- gradients -------------------------------------------------------------------------------------------------------
def test_grad_without_backward(tiny, net, x):
    with pytest.raises(RuntimeError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer1.output.grad.save()
    err = info.value
    assert isinstance(err, ic.GradientError)
    assert_names_line(err, line)
    assert "backward" in str(err) and "backward()" in err.hint
    assert_recovers(tiny, net, x)


def test_grad_without_backward_on_a_value_that_requires_grad(x):
    net = tiny_mlp().requires_grad_(True)
    model = ic.NNsight(net)
    with pytest.raises(RuntimeError) as info:
        with model.trace(x):
            line = next_line()
            model.layer1.output.grad.save()
    err = info.value
    assert isinstance(err, ic.GradientError)
    assert_names_line(err, line)
    assert "backward()" in err.hint
    assert_recovers(model, net, x)
    with model.trace(x):  # and a correct gradient read works on the same model
        grad = model.layer1.output.grad.save()
        model.output.sum().backward()
    torch.testing.assert_close(grad.value, net.layer2.weight.detach().sum(0, keepdim=True))
    assert_clean(net)


def test_grad_of_value_that_does_not_require_grad(tiny, net, x):
    with pytest.raises(RuntimeError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer1.output.grad.save()
            tiny.output.sum().backward()
    err = info.value
    assert isinstance(err, ic.GradientError)
    assert_names_line(err, line)
    assert "requires_grad" in err.hint
    assert_recovers(tiny, net, x)


# -- invokes and barriers --------------------------------------------------------------------------------------------
def test_invoke_without_input(tiny, net, x):
    """``tracer.invoke()`` without an input acts on the other invokes' rows: with no other invoke, the trace has
    no input, and the error names the promptless invoke."""
    with pytest.raises(ValueError) as info:
        with tiny.trace() as tracer:
            line = next_line()
            with tracer.invoke():
                tiny.layer1.output.save()
    err = info.value
    assert isinstance(err, ic.InvokeError)
    assert_names_line(err, line)
    assert "without an input" in str(err)
    assert_recovers(tiny, net, x)


def test_invoke_inside_trace_with_input(tiny, net, x):
    with pytest.raises(ValueError) as info:
        with tiny.trace(x) as tracer:
            line = next_line()
            with tracer.invoke(x):
                tiny.layer1.output.save()
    err = info.value
    assert isinstance(err, ic.InvokeError)
    assert_names_line(err, line)
    assert "tracer.invoke" in err.hint
    assert_recovers(tiny, net, x)


def test_barrier_reached_by_one_invoke(tiny, net, x):
    with pytest.raises(RuntimeError) as info:
        with tiny.trace() as tracer:
            line = next_line()
            barrier = tracer.barrier(2)
            with tracer.invoke(x):
                tiny.layer1.output.save()
                barrier()
            with tracer.invoke(x):
                tiny.layer2.output.save()
    err = info.value
    assert isinstance(err, ic.BarrierError)
    assert_names_line(err, line)
    assert "barrier(2)" in str(err)
    assert_recovers(tiny, net, x)


# -- values the forward pass never produces --------------------------------------------------------------------------
def test_module_call_that_never_happens(tiny, net, x):
    with pytest.raises(RuntimeError) as info:
        with tiny.trace(x) as tracer:
            tiny.layer2.output.save()
            tracer.next()
            line = next_line()
            tiny.layer2.output.save()
    err = info.value
    assert isinstance(err, ic.MissedSiteError)
    assert_names_line(err, line)
    assert "layer2" in str(err) and ".next()" in err.hint
    assert_recovers(tiny, net, x)


def test_envoy_next_call_that_never_happens(tiny, net, x):
    with pytest.raises(RuntimeError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer2.next().output.save()
    err = info.value
    assert isinstance(err, ic.MissedSiteError)
    assert_names_line(err, line)
    assert_recovers(tiny, net, x)


def test_module_call_that_never_happens_with_validate(tiny, net, x):
    with count_forwards(net) as counts:
        with pytest.raises(RuntimeError) as info:
            with tiny.trace(x, scan=True, validate=True):
                line = next_line()
                tiny.layer2.next().output.save()
    err = info.value
    assert isinstance(err, ic.MissedSiteError)
    assert_names_line(err, line)
    assert counts["real"] == 0
    assert_recovers(tiny, net, x)


def test_value_after_stop_is_not_ready(tiny, net, x):
    with tiny.trace(x):
        hidden = tiny.layer1.output.save()
        stop = next_line()
        tiny.layer1.output.stop()
        made = next_line()
        late = tiny.layer2.output.save()
    # the trace itself succeeds, and what was computed before the stop is there
    torch.testing.assert_close(hidden.value, net.layer1(x))
    with pytest.raises(ValueError) as info:
        line = next_line()
        print(late.value)
    err = info.value
    assert isinstance(err, ic.ValueNotReadyError)
    assert_names_line(err, line)
    message = str(err)
    assert "stop" in message
    assert f"{err.loc.filename}:{stop}" in message, "the message names the stop"
    assert f"{err.loc.filename}:{made}" in message, "the message names where the value was recorded"
    assert_recovers(tiny, net, x)


def test_set_from_a_value_computed_later_in_the_forward(tiny, net, x):
    with pytest.raises(ic.InterventionError) as info:
        with tiny.trace(x):
            line = next_line()
            tiny.layer1.output = tiny.layer2.output
    err = info.value
    assert_names_line(err, line)
    assert "layer2" in str(err)
    assert_recovers(tiny, net, x)


# -- a user function that raises -------------------------------------------------------------------------------------
class UserFunctionError(Exception):
    pass


class UserErrorWithArgs(Exception):
    """An exception type whose ``__init__`` needs more than a message."""

    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("missing key"),
        ZeroDivisionError("division by zero"),
        UserFunctionError("custom"),
        UserErrorWithArgs(7, "two required arguments"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_exception_inside_applied_function_keeps_its_type(tiny, net, x, exc):
    def user_fn(t):
        raise exc

    with pytest.raises(type(exc)) as info:
        with tiny.trace(x):
            line = next_line()
            ic.apply(user_fn, tiny.layer1.output).save()
    err = info.value
    assert_names_line(err, line)
    assert err.__cause__ is exc
    # the message reads as ours (KeyError's own __str__ would show the repr of the whole message)
    assert str(err).startswith(f"{type(exc).__name__}: ") and "\n" in str(err)
    assert "user_fn" in str(err)
    assert_recovers(tiny, net, x)


# -- outside any trace -----------------------------------------------------------------------------------------------
def test_output_outside_trace(tiny, net, x):
    with pytest.raises(ic.TracingError) as info:
        line = next_line()
        tiny.layer1.output.save()
    err = info.value
    assert_names_line(err, line)
    assert "model.trace" in err.hint
    assert_recovers(tiny, net, x)


def test_set_output_outside_trace(tiny, net, x):
    with pytest.raises(ic.TracingError) as info:
        line = next_line()
        tiny.layer1.output = torch.zeros(1, 10)
    err = info.value
    assert_names_line(err, line)
    assert_recovers(tiny, net, x)


# -- tiny GPT-2 ------------------------------------------------------------------------------------------------------
def test_gpt2_set_wrong_shape(gpt2, gpt2_module, ids):
    with pytest.raises(ValueError) as info:
        with gpt2.trace(ids):
            line = next_line()
            gpt2.transformer.h[0].mlp.output = torch.zeros(3, 3)
    err = info.value
    assert isinstance(err, ic.SetShapeError)
    assert_names_line(err, line)
    assert "(2, 7, 32)" in str(err)
    assert_gpt2_recovers(gpt2, gpt2_module, ids)


def test_gpt2_set_wrong_shape_with_validate(gpt2, gpt2_module, ids):
    with count_forwards(gpt2_module) as counts:
        with pytest.raises(ValueError) as info:
            with gpt2.trace(ids, scan=True, validate=True):
                line = next_line()
                gpt2.transformer.h[0].mlp.output = torch.zeros(3, 3)
    err = info.value
    assert isinstance(err, ic.SetShapeError)
    assert_names_line(err, line)
    assert counts["fake"] >= 1 and counts["real"] == 0
    assert_gpt2_recovers(gpt2, gpt2_module, ids)


def test_gpt2_index_out_of_bounds(gpt2, gpt2_module, ids):
    with pytest.raises(IndexError) as info:
        with gpt2.trace(ids):
            line = next_line()
            gpt2.transformer.h[1].mlp.output[:, :, 32] = 0
    err = info.value
    assert_names_line(err, line)
    assert_gpt2_recovers(gpt2, gpt2_module, ids)


def test_gpt2_index_out_of_bounds_with_validate(gpt2, gpt2_module, ids):
    with count_forwards(gpt2_module) as counts:
        with pytest.raises(IndexError) as info:
            with gpt2.trace(ids, scan=True, validate=True):
                line = next_line()
                gpt2.transformer.h[1].mlp.output[:, :, 32] = 0
    err = info.value
    assert_names_line(err, line)
    assert counts["real"] == 0
    assert_gpt2_recovers(gpt2, gpt2_module, ids)


def test_gpt2_unknown_module(gpt2, gpt2_module, ids):
    with pytest.raises(AttributeError) as info:
        with gpt2.trace(ids):
            line = next_line()
            gpt2.transformer.hh[0].output.save()
    err = info.value
    assert isinstance(err, ic.UnknownModuleError)
    assert_names_line(err, line)
    assert "'h'" in err.hint
    assert_gpt2_recovers(gpt2, gpt2_module, ids)


# -- the errors that used to come out raw (issue 16): the same type at the same line, eager and compiled ----------
BOTH = [False, pytest.param(True, marks=pytest.mark.compiled)]


@pytest.mark.parametrize("compile", BOTH)
@pytest.mark.parametrize(
    "value, words",
    [
        (lambda: torch.zeros(1, 10, dtype=torch.long), "has dtype int64"),
        (lambda: torch.zeros(1, 10, dtype=torch.bool), "has dtype bool"),
        (lambda: "hello", "is a str"),
        (lambda: [1.0] * 10, "is a list"),
        (lambda: None, "= None"),
        (lambda: torch.zeros(1, 10, device="meta"), "meta device"),
    ],
    ids=["int", "bool", "str", "list", "none", "meta"],
)
def test_a_set_value_that_cannot_replace_the_tensor(tiny, net, x, compile, value, words):
    new = value()
    with pytest.raises(ic.TracingError if new is None else ic.SetValueError) as info:
        with tiny.trace(x, compile=compile):
            line = next_line()
            tiny.layer1.output = new
            tiny.output.save()
    err = info.value
    assert_names_line(err, line)
    assert words in str(err)
    tiny.clear_compiled()
    assert_recovers(tiny, net, x)


@pytest.mark.parametrize("compile", BOTH)
def test_invokes_that_cannot_be_batched_name_the_invoke(tiny, net, x, compile):
    with pytest.raises(ValueError) as info:
        with tiny.trace(compile=compile) as tracer:
            with tracer.invoke(torch.rand(1, 5)):
                tiny.output.save()
            line = next_line()
            with tracer.invoke(torch.rand(2, 6)):
                tiny.output.save()
    err = info.value
    assert isinstance(err, ic.InvokeError)
    assert_names_line(err, line)
    assert "(2, 6)" in str(err) and "(1, 5)" in str(err)
    with pytest.raises(
        ic.InvokeError, match="dtype torch.float64"
    ):  # a dtype would silently promote the batch
        with tiny.trace(compile=compile) as tracer:
            with tracer.invoke(torch.rand(1, 5)):
                pass
            with tracer.invoke(torch.rand(1, 5, dtype=torch.float64)):
                pass
    tiny.clear_compiled()
    assert_recovers(tiny, net, x)


@pytest.mark.parametrize("compile", BOTH)
@pytest.mark.parametrize(
    "bad, base, words",
    [
        (lambda: "hello", TypeError, "must be Tensor, not str"),
        (lambda: torch.rand(1, 7), RuntimeError, "cannot be multiplied"),
        (lambda: torch.rand(1, 5, dtype=torch.float64), RuntimeError, "same dtype"),
    ],
    ids=["type", "features", "dtype"],
)
def test_an_input_the_model_cannot_run_names_the_trace(tiny, net, x, compile, bad, base, words):
    """The model's own error, located at the ``with`` whose input it ran on; compiled agrees (a float64 input into
    a float32 model runs eagerly instead of compiling to float64)."""
    ic.reset_compile_stats()
    with pytest.raises(base) as info:
        line = next_line()
        with tiny.trace(bad(), compile=compile):
            tiny.output.save()
    err = info.value
    assert_names_line(err, line)
    assert words in str(err)
    assert isinstance(err.__cause__, base) and not isinstance(err.__cause__, ic.InterventionError)
    tiny.clear_compiled()
    assert_recovers(tiny, net, x)


@pytest.mark.parametrize("compile", BOTH)
def test_a_model_without_weights_says_so(x, compile):
    with torch.device("meta"):
        net = tiny_mlp()
    model = ic.NNsight(net)
    with pytest.raises(RuntimeError) as info:
        line = next_line()
        with model.trace(x, compile=compile):
            model.output.save()
    err = info.value
    assert_names_line(err, line)
    assert "meta device" in str(err) and "load" in err.hint
    model.clear_compiled()
    assert_clean(net)


@pytest.mark.parametrize("compile", BOTH)
@pytest.mark.parametrize(
    "ids, words",
    [
        (lambda: torch.randint(0, 128, (1, 129)), "needs 129 positions, but the model has 128"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), "no tokens"),
        (lambda: torch.tensor([[1, 2, 128]]), "token id 128 is outside"),
        (lambda: torch.tensor([[1, -1, 2]]), "token id -1 is outside"),
    ],
    ids=["too-long", "empty", "past-vocab", "negative"],
)
def test_token_ids_the_model_cannot_embed(gpt2, gpt2_module, ids, compile, words):
    """Checked before the model runs: eager PyTorch would raise deep in the model, and a compiled kernel's
    bounds check aborts the whole process."""
    with pytest.raises(ValueError) as info:
        line = next_line()
        with gpt2.trace(ids(), compile=compile):
            gpt2.output.save()
    err = info.value
    assert isinstance(err, ic.InputError)
    assert_names_line(err, line)
    assert words in str(err)
    with pytest.raises(ic.InputError) as info:  # in an invoke, at the invoke's line
        with gpt2.trace(compile=compile) as tracer:
            line = next_line()
            with tracer.invoke(ids()):
                pass
    assert_names_line(info.value, line)
    assert_gpt2_recovers(gpt2, gpt2_module, torch.randint(0, 128, (2, 7)))


@pytest.fixture(scope="module")
def lm(lm_dirs):
    return ic.LanguageModel(lm_dirs["gpt2"])


@pytest.mark.parametrize("compile", BOTH)
def test_language_model_inputs_that_cannot_run(lm, compile):
    with pytest.raises(ic.InputError) as info:
        line = next_line()
        with lm.trace("", compile=compile):
            lm.output.save()
    assert_names_line(info.value, line)
    assert "no tokens" in str(info.value)
    with pytest.raises(ic.InputError) as info:
        line = next_line()
        with lm.generate("Hello", max_new_tokens=0, compile=compile):
            lm.generator.output.save()
    assert_names_line(info.value, line)
    assert "max_new_tokens=0" in str(info.value)
    positions = lm._module.config.n_positions
    with pytest.raises(ic.InputError) as info:
        line = next_line()
        with lm.generate("Hello world", max_new_tokens=positions, compile=compile):
            lm.generator.output.save()
    assert_names_line(info.value, line)
    assert f"but the model has {positions}" in str(info.value) and "to generate" in str(info.value)
    with lm.generate("Hello world", max_new_tokens=2, compile=compile):  # the next block works
        out = lm.generator.output.save()
    assert out.value.shape[-1] == 2 + len(lm.tokenizer("Hello world")["input_ids"])


def test_pickling_a_live_value(tiny, net, x):
    import pickle

    with pytest.raises(ic.TracingError) as info:
        with tiny.trace(x):
            hidden = tiny.layer1.output.save()
            line = next_line()
            pickle.dumps(hidden)
    assert_names_line(info.value, line)
    assert "after the block" in info.value.hint
    with tiny.trace(x):
        hidden = tiny.layer1.output.save()
    torch.testing.assert_close(pickle.loads(pickle.dumps(hidden)), net.layer1(x))  # afterwards: its value
    assert_recovers(tiny, net, x)
