"""nnsight code as people write it since 0.5 (issue 17): saved names hold real values, ``.save()`` on plain
Python containers, and the rest of the modern API. Values are checked against plain PyTorch hooks."""

from __future__ import annotations

import io
import pickle
import threading

import numpy as np
import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, tiny_mlp

BOTH = [False, pytest.param(True, marks=pytest.mark.compiled)]


@pytest.fixture
def net():
    return tiny_mlp()


def _layer1(net, x):
    return net.layer1(x).detach()


# -- saved values are values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_saved_names_hold_values(net, compile):
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x, compile=compile):
        hidden = model.layer1.output.save()
        pair = ic.save((model.layer1.output, model.layer2.output))
        out = model.output.save()
    expected = _layer1(net, x)
    assert isinstance(hidden, torch.Tensor) and not isinstance(hidden, ic.Proxy)
    torch.testing.assert_close(hidden, expected)
    assert hidden.value is hidden  # graph-era code reads .value
    assert type(hidden + 1) is torch.Tensor and type(torch.relu(hidden)) is torch.Tensor
    assert repr(hidden) == repr(expected)
    np.testing.assert_allclose(np.asarray(hidden), expected.numpy())
    buffer = io.BytesIO()
    torch.save({"h": hidden}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only: a plain tensor, nothing of this package needed
    assert type(loaded["h"]) is torch.Tensor
    torch.testing.assert_close(loaded["h"], expected)
    assert type(pickle.loads(pickle.dumps(hidden))) is torch.Tensor
    assert type(pair) is tuple and len(pair) == 2  # ic.save of a container: the plain container
    torch.testing.assert_close(pair[0], expected)
    torch.testing.assert_close(out, net(x))
    model.clear_compiled()
    assert_clean(net)


@pytest.mark.parametrize("compile", BOTH)
def test_tensors_others_hold_keep_their_class(net, compile):
    """A saved activation only the block's results hold becomes the saved tensor itself; a tensor that the user,
    the model or anything else also holds is saved as an alias, so that their object is left as it was."""
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    kept: list = []
    with model.trace(x, compile=compile):
        seen = model.layer1.input.save()
        hidden = model.layer1.output.save()
        weight = model.layer1.weight.save()
        kept.append(model.layer2.output.save())
        also = kept[-1]
    assert type(x) is torch.Tensor and type(net.layer1.weight) is torch.nn.Parameter
    for value in (seen, hidden, weight, also):
        assert isinstance(value, torch.Tensor) and value.value is value
    torch.testing.assert_close(seen, x)
    torch.testing.assert_close(hidden, _layer1(net, x))
    assert weight.data_ptr() == net.layer1.weight.data_ptr()
    assert also is kept[-1]  # one saved object for one proxy, wherever it is held
    torch.testing.assert_close(also, net(x))


def _traced_in_a_function(model, x, n):
    """Names local to a function, appended to a list, stored in a dict, in a loop of traces."""
    outs, by_step = [], {}
    for step in range(n):
        with model.trace(x + step):
            last = model.output.save()
            outs.append(model.layer1.output.save())
            by_step[step] = model.layer2.output.save()
    return last, outs, by_step


def test_saved_values_in_function_locals_lists_and_dicts(net):
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    last, outs, by_step = _traced_in_a_function(model, x, 3)
    assert type(last) is not ic.Proxy and isinstance(last, torch.Tensor)
    torch.testing.assert_close(last, net(x + 2))
    assert all(isinstance(o, torch.Tensor) and not isinstance(o, ic.Proxy) for o in outs)
    torch.testing.assert_close(torch.stack(outs), torch.stack([_layer1(net, x + s) for s in range(3)]))
    assert all(isinstance(v, torch.Tensor) and not isinstance(v, ic.Proxy) for v in by_step.values())
    torch.testing.assert_close(by_step[1], net(x + 1))


def test_saved_values_at_module_level(net):
    """A script's or notebook's names (a module's namespace)."""
    namespace = {"model": ic.NNsight(net), "x": torch.rand(1, 5), "ic": ic}
    code = "with model.trace(x):\n    hidden = model.layer1.output.save()\n"
    exec(compile(code, "<notebook cell>", "exec"), namespace)
    assert isinstance(namespace["hidden"], torch.Tensor) and not isinstance(namespace["hidden"], ic.Proxy)
    torch.testing.assert_close(namespace["hidden"], _layer1(net, namespace["x"]))


def test_values_without_a_value_attribute_keep_their_proxy(net, lm_dirs):
    """A saved bool, or an object of another class (an HF model output), stays a proxy that behaves as the value
    (``.value`` is the object of its own class)."""
    model = ic.NNsight(net)
    x = torch.rand(1, 5)
    with model.trace(x):
        positive = ic.bool(model.output.sum() > 0).save()
    assert isinstance(positive, ic.Proxy) and bool(positive) == bool(net(x).sum() > 0)
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.trace("Hello world"):
        out = lm.output.save()
    assert out.value.__class__.__name__.endswith("Output") or "Output" in type(out.value).__name__
    assert isinstance(out.logits, torch.Tensor)


def test_a_trained_tensor_keeps_its_identity(net):
    """A leaf tensor that requires grad (or a Parameter) saved in a session is the object itself afterwards:
    optimizers hold it, and its .grad is its own."""
    model = ic.NNsight(net)
    with model.session():
        vector = torch.nn.Parameter(torch.zeros(10)).save()
        delta = ic.save(torch.zeros(10, requires_grad=True))  # a real tensor: returned as it is
    assert isinstance(vector, torch.nn.Parameter) and vector.value is vector
    assert isinstance(delta, torch.Tensor) and delta.is_leaf and delta.requires_grad
    optimizer = torch.optim.SGD([vector, delta], lr=1.0)
    x = torch.rand(3, 5)
    with model.trace(x):
        model.layer1.output[:] = model.layer1.output + vector + delta
        model.output.sum().backward()
    assert vector.grad is not None and delta.grad is not None
    optimizer.step()
    assert float(vector.detach().abs().sum()) > 0


# -- .save() on plain Python containers ------------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_list_dict_and_set_save_in_a_trace(net, compile):
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x, compile=compile):
        hiddens = list().save()
        hiddens.append(model.layer1.output)
        hiddens.append(model.layer2.output)
        named = dict().save()
        named["out"] = model.output
        prefilled = ic.save([model.layer1.output])
        seen = set().save()
        seen.add(3)
    assert type(hiddens) is list and len(hiddens) == 2  # a plain list, as modern code expects
    torch.testing.assert_close(hiddens[0], _layer1(net, x))
    torch.testing.assert_close(hiddens[1], net(x))
    assert type(named) is dict and list(named) == ["out"]
    torch.testing.assert_close(named["out"], net(x))
    assert isinstance(prefilled, list) and len(prefilled) == 1
    assert seen == {3}
    assert not hasattr([], "save") and not hasattr({}, "save") and not hasattr(set(), "save")
    with pytest.raises(AttributeError):
        [].save()
    model.clear_compiled()
    assert_clean(net)


def test_save_exists_only_inside_a_block_and_only_in_its_thread(net):
    model = ic.NNsight(net)
    seen: dict = {}
    inside = threading.Event()
    done = threading.Event()

    def other():
        inside.wait(10)
        try:
            [].save()
        except AttributeError as e:
            seen["error"] = e
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with model.trace(torch.rand(1, 5)):
        inside.set()
        done.wait(10)
        assert hasattr([], "save")  # this thread's block is open
    thread.join()
    assert isinstance(seen.get("error"), AttributeError)
    assert not hasattr([], "save")
    with pytest.raises(ValueError):  # a failing block takes it away too
        with model.trace(torch.rand(1, 5)):
            raise ValueError("boom")
    assert not hasattr([], "save")


@pytest.mark.parametrize("compile", BOTH)
def test_generation_appends_every_step(lm_dirs, compile):
    """The seed's pattern: ``hidden = list().save()`` and an append at every step of ``tracer.all()``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = ic.LanguageModel(lm_dirs["gpt2"])
    steps = 4
    with lm.generate("Hello world", max_new_tokens=steps, compile=compile) as tracer:
        hidden = list().save()
        with tracer.all():
            hidden.append(lm.transformer.h[-1].output)
        tokens = lm.generator.output.save()
    assert type(hidden) is list and len(hidden) == steps
    assert all(type(h) is torch.Tensor for h in hidden)
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["gpt2"])
    tok = AutoTokenizer.from_pretrained(lm_dirs["gpt2"])
    plain: list = []
    handle = hf.transformer.h[-1].register_forward_hook(lambda m, a, o: plain.append(o.detach()))
    try:
        ids = tok("Hello world", return_tensors="pt")
        reference = hf.generate(**ids, max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert torch.equal(tokens, reference)
    for got, want in zip(hidden, plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lm.clear_compiled()


@pytest.mark.parametrize("compile", BOTH)
def test_generator_streamer(lm_dirs, compile):
    """``model.generator.streamer.output``: what ``generate`` streams, the prompt's ids at its first call and each
    step's new token after it (as a ``transformers`` streamer receives them). Compiled, the block runs eagerly
    and says why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.generate("Hello world", max_new_tokens=4, compile=compile) as tracer:
        streamed = list().save()
        hidden = list().save()
        for _step in tracer.iter[1:4]:
            streamed.append(lm.generator.streamer.output)
            hidden.append(lm.transformer.h[-1].output)
        first = lm.generator.streamer.output.save()
        tokens = lm.generator.output.save()
    prompt = len(lm.tokenizer("Hello world")["input_ids"])
    assert len(streamed) == 3 and len(hidden) == 3
    assert torch.equal(first.reshape(-1), tokens[0, :prompt])  # the first put: the prompt
    for k, got in enumerate(streamed):  # call k + 1: the token generated at step k
        assert torch.equal(got.reshape(-1), tokens[:, prompt + k])
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["gpt2"])
    tok = AutoTokenizer.from_pretrained(lm_dirs["gpt2"])
    ids = tok("Hello world", return_tensors="pt")
    reference = hf.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(tokens, reference)
    if compile:
        assert any("streamer" in r for r in ic.compile_stats()["fallback_reasons"])
    # a streamer of the caller's own gets the tokens instead (and the model's does not fire)
    own = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, timeout=30.0)
    with lm.generate("Hello world", max_new_tokens=3, streamer=own) as tracer:
        logits = list().save()
        for _step in tracer.iter[:]:
            logits.append(lm.lm_head.output[0, -1].argmax(-1))
    assert len(logits) == 3 and "".join(own)
    lm.clear_compiled()
    assert_clean(lm._module)


@pytest.mark.parametrize("compile", BOTH)
def test_cache_holds_one_entry_per_call(lm_dirs, compile):
    """``tracer.cache()`` in ``generate``: one entry per step for every module, as nnsight's cache (a list when a
    module ran more than once). In a trace, a module called twice gets two entries too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.generate("Hello world", max_new_tokens=3, compile=compile) as tracer:
        cache = tracer.cache(modules=[lm.transformer.h[0]])
        tokens = lm.generator.output.save()
    entries = cache["model.transformer.h.0"]
    assert isinstance(entries, list) and len(entries) == 3
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["gpt2"])
    tok = AutoTokenizer.from_pretrained(lm_dirs["gpt2"])
    plain: list = []
    handle = hf.transformer.h[0].register_forward_hook(lambda m, a, o: plain.append(o.detach()))
    try:
        ids = tok("Hello world", return_tensors="pt")
        reference = hf.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert torch.equal(tokens, reference)
    for entry, want in zip(entries, plain):
        torch.testing.assert_close(entry.output, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(AttributeError, match=r"one entry per call"):
        cache.model.transformer.h[0].output  # noqa: B018 - the attribute read raises

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    torch.manual_seed(0)
    net = Twice()
    model = ic.NNsight(net)
    x = torch.rand(2, 4)
    with model.trace(x, compile=compile) as tracer:
        cache = tracer.cache(include_inputs=True)
    first, second = cache["model.shared"]
    torch.testing.assert_close(first.output, net.shared(x))
    torch.testing.assert_close(second.input, torch.relu(net.shared(x)))
    torch.testing.assert_close(second.output, net(x))
    torch.testing.assert_close(cache.model.output, net(x))
    if compile:
        assert any("more than once" in r for r in ic.compile_stats()["fallback_reasons"])
    lm.clear_compiled()
    model.clear_compiled()
    assert_clean(net)


# -- `for step in tracer.iter[...]` runs its body once per step --------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_a_for_loop_over_steps_runs_its_body_once_per_step(lm_dirs, compile):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    seen, per_step = [], []
    with lm.generate("Hello world", max_new_tokens=4, compile=compile) as tracer:
        for step in tracer.iter[1:3]:
            seen.append(step)  # a plain Python list: one item per step, as in a Python loop
            per_step.append(lm.lm_head.output[:, -1].save())
            if step == 2:
                last = lm.lm_head.output[:, -1].argmax(-1).save()
        everything = list().save()
        for step in tracer.all():
            everything.append(step)
        tokens = lm.generator.output.save()
    assert seen == [1, 2] and len(per_step) == 2
    assert everything == [0, 1, 2, 3]
    assert all(isinstance(p, torch.Tensor) for p in per_step)
    assert int(last[0]) == int(tokens[0, -2])  # step 2's greedy pick is the token generated at step 2
    with pytest.raises(ic.TracingError, match="max_new_tokens"):
        with lm.generate("Hello", compile=compile) as tracer:
            for _step in tracer.all():
                pass
    lm.clear_compiled()


# -- bugs found by nnsight's own tests -------------------------------------------------------------------------
def test_generate_and_invokes_validate_on_fakes(lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.generate("Hello world", max_new_tokens=3, validate=True):
        assert lm.generator.output.shape[-1] == 3 + len(lm.tokenizer("Hello world")["input_ids"])
        tokens = lm.generator.output.save()
    assert tokens.shape[-1] == 3 + len(lm.tokenizer("Hello world")["input_ids"])
    with lm.generate(max_new_tokens=2) as tracer:
        with tracer.invoke("Hello", scan=True):  # scan= checks the block, it is no model input
            shape = lm.transformer.h[0].output.shape
            tokens = lm.generator.output.save()
    assert shape[-1] == lm._module.config.n_embd and tokens.shape[-1] == 2 + len(
        lm.tokenizer("Hello")["input_ids"]
    )


@pytest.mark.parametrize("compile", BOTH)
def test_two_backward_passes_in_one_trace(compile):
    """Each gradient is its pass's: read after ``backward(retain_graph=True)`` (as in PyTorch) or inside
    ``with loss.backward():``. Compiled, a trace with two passes runs eagerly and agrees."""
    net = tiny_mlp().requires_grad_(True)
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x, compile=compile):
        hidden = model.layer1.output
        loss = model.output.sum()
        loss.backward(retain_graph=True)
        first = hidden.grad.save()
        (loss * 3).backward()
        second = hidden.grad.save()
    with model.trace(x, compile=compile):
        hidden = model.layer1.output
        loss = model.output.sum()
        with loss.backward(retain_graph=True):
            first_in_block = hidden.grad.save()
        with (loss * 3).backward():
            second_in_block = hidden.grad.save()
    reference = []
    handle = net.layer1.register_forward_hook(
        lambda m, a, o: o.register_hook(lambda g: reference.append(g.clone())) and None
    )
    try:
        out = net(x).sum()
        out.backward(retain_graph=True)
        (out * 3).backward()
    finally:
        handle.remove()
    for got in (first, first_in_block):
        torch.testing.assert_close(got, reference[0])
    for got in (second, second_in_block):
        torch.testing.assert_close(got, reference[1])
    model.clear_compiled()


def test_small_fixes(net, lm_dirs):
    model = ic.NNsight(net)
    assert model.to("cpu") is model and model.cpu() is model  # the wrapper, not the bare module
    x = torch.rand(2, 5)
    trained = ic.NNsight(tiny_mlp().requires_grad_(True))
    with trained.trace(x, scan=True, validate=True):  # retain_grad on fakes (which have no autograd)
        hidden = trained.layer1.output
        hidden.retain_grad()
    with model.session():
        with model.trace(x):
            h = model.layer1.output.save()
        with model.trace(x, scan=True):  # a session value in a checked trace: of unknown shape until it runs
            model.layer1.output = h * 2
            out = model.output.save()
    torch.testing.assert_close(out, net.layer2(net.layer1(x) * 2))
    with model.trace(x) as tracer:
        cache = tracer.cache()
        model.layer1.output[:] = 0  # the cache holds the edited value, as nnsight's does
    assert float(cache["model.layer1"].output.abs().sum()) == 0.0
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with pytest.raises(IndexError):  # a ModuleList index past the end, as for a Python list
        with lm.trace("Hello"):
            lm.transformer.h[999].output.save()


@pytest.mark.parametrize("compile", BOTH)
def test_an_invoke_without_input_sees_the_whole_batch(net, compile):
    model = ic.NNsight(net)
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with model.trace(compile=compile) as tracer:
        with tracer.invoke(a):
            first = model.layer1.output.save()
        with tracer.invoke(b):
            pass
        with tracer.invoke():
            everything = model.layer1.output.save()
            model.layer2.output[:, 0] = 0
            out = model.output.save()
    torch.testing.assert_close(everything, net.layer1(torch.cat([a, b])))
    torch.testing.assert_close(first, net.layer1(a))
    expected = net(torch.cat([a, b]))
    expected[:, 0] = 0
    torch.testing.assert_close(out, expected)
    model.clear_compiled()


# -- .skip(value) ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_skip_replaces_a_module_without_running_it(compile):
    from intervene_compiler.testing import tiny_gpt2

    ic.reset_compile_stats()
    m = tiny_gpt2(n_layer=3)
    model = ic.NNsight(m)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    ran = []
    handle = m.transformer.h[1].attn.register_forward_hook(lambda mod, a, o: ran.append(1))
    try:
        with model.trace(ids, compile=compile):
            model.transformer.h[1].skip(model.transformer.h[0].output)
            skipped = model.transformer.h[1].output.save()
            logits = model.output.logits.save()
    finally:
        handle.remove()
    assert ran == []  # the skipped block (and so its attention) never ran
    kept = {}
    hooks = [
        m.transformer.h[0].register_forward_hook(lambda mod, a, o: kept.__setitem__(0, o)),
        m.transformer.h[1].register_forward_hook(lambda mod, a, o: kept[0]),
    ]
    try:
        expected = m(ids).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(skipped, kept[0])
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ic.MissedSiteError):  # a module inside a skipped one never runs
        with model.trace(ids, compile=compile):
            model.transformer.h[1].skip(model.transformer.h[0].output)
            model.transformer.h[1].mlp.output.save()
    with pytest.raises(ic.InterventionError, match="only after the module would run"):
        with model.trace(ids, compile=compile):
            model.transformer.h[1].skip(model.transformer.h[2].output)
    if compile:  # compiled: the skipped block is not in the graph (its attention hook never ran)
        stats = ic.compile_stats()
        assert stats["compiled_calls"] >= 1 and not any("skip" in r for r in stats["fallback_reasons"]), stats
    model.clear_compiled()
    assert_clean(m)


# -- smaller API gaps --------------------------------------------------------------------------------------------
def test_config_persists_the_api_key_and_host(tmp_path, monkeypatch):
    from intervene_compiler import config

    monkeypatch.setenv("IC_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("IC_API_KEY", raising=False)
    monkeypatch.delenv("IC_API_HOST", raising=False)
    settings = config.load()
    assert settings.API.APIKEY is None and settings.API.HOST == config.DEFAULT_HOST
    settings.set_default_api_key("secret-key")
    settings.set_default_host("127.0.0.1:9123")
    path = config.config_path()
    assert path == tmp_path / "config.json" and (path.stat().st_mode & 0o777) == 0o600
    again = config.load()  # a later session
    assert again.API.APIKEY == "secret-key" and again.API.HOST == "127.0.0.1:9123"
    monkeypatch.setenv("IC_API_KEY", "from-env")
    assert config.load().API.APIKEY == "from-env"  # the environment wins
    with pytest.raises(ValueError):
        settings.set_default_api_key("  ")
    assert ic.CONFIG.APP.REMOTE_LOGGING in (True, False) and hasattr(ic.CONFIG.API, "HOST")


def test_session_validate_and_stop(net):
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    with count_forwards(net) as counts:
        with pytest.raises(IndexError):
            with model.session(validate=True):
                with model.trace(x):
                    model.layer1.output[:, 99] = 0  # found on fakes, before anything runs
    assert counts == {"real": 0}
    with model.session() as session:
        with model.trace(x):
            first = model.layer1.output.save()
        session.stop()  # as session.exit(): what follows does not run
        with model.trace(x):
            later = model.output.save()
    torch.testing.assert_close(first, _layer1(net, x))
    with pytest.raises(ic.ValueNotReadyError):
        print(later.value)


@pytest.mark.parametrize("compile", BOTH)
def test_cache_by_attribute_path(compile):
    from intervene_compiler.testing import tiny_gpt2

    m = tiny_gpt2(n_layer=2)
    model = ic.NNsight(m)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    with model.trace(ids, compile=compile) as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0], model.transformer.h[1].mlp])
    kept = {}
    hooks = [
        m.transformer.h[0].register_forward_hook(lambda mod, a, o: kept.__setitem__("h0", o)),
        m.transformer.h[1].mlp.register_forward_hook(lambda mod, a, o: kept.__setitem__("mlp", o)),
    ]
    try:
        with torch.no_grad():
            m(ids)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(cache.model.transformer.h[0].output, kept["h0"])
    torch.testing.assert_close(cache["model.transformer.h.1.mlp"].output, kept["mlp"])
    torch.testing.assert_close(cache.model.transformer.h[1].mlp.output, kept["mlp"])
    model.clear_compiled()


def test_a_submodule_named_like_a_site_is_warned_about():
    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.output = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.output(x)

    with pytest.warns(UserWarning, match=r"model.get\('output'\)"):
        ic.NNsight(Named())


from contextlib import contextmanager  # noqa: E402


@contextmanager
def count_forwards(module: torch.nn.Module):
    """Count the module's forward calls on real tensors (fake ones, from validation, are not counted)."""
    from torch._subclasses.fake_tensor import FakeTensor

    counts = {"real": 0}

    def hook(mod, args, output):
        if not any(isinstance(a, FakeTensor) for a in args):
            counts["real"] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


# -- .source: calls inside a forward as sites ------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_source_sites_read_and_edit_calls_inside_a_forward(compile):
    from intervene_compiler.testing import tiny_gpt2

    ic.reset_compile_stats()
    m = tiny_gpt2(n_layer=2)
    model = ic.NNsight(m)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    listing = str(model.transformer.h[0].attn.source)
    for name in ("attention_interface_0", "self_c_proj_0", "self_c_attn_1"):
        assert f"# {name}" in listing or f", {name}" in listing
    attn = model.transformer.h[0].attn
    with model.trace(ids, compile=compile):
        interface = attn.source.attention_interface_0.output.save()
        proj_in = attn.source.self_c_proj_0.input.save()
        qkv = attn.source.self_c_attn_1.output.save()
        attn.source.self_c_proj_0.output[:, :, :4] = 0
        logits = model.output.logits.save()
    seen: dict = {}

    def zero(mod, args, output):
        seen["proj_in"] = args[0]
        output = output.clone()
        output[:, :, :4] = 0
        return output

    hooks = [
        m.transformer.h[0].attn.c_attn.register_forward_hook(lambda mod, a, o: seen.__setitem__("qkv", o)),
        m.transformer.h[0].attn.c_proj.register_forward_hook(zero),
    ]
    try:
        with torch.no_grad():
            expected = m(ids).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(qkv, seen["qkv"])
    torch.testing.assert_close(proj_in, seen["proj_in"])
    torch.testing.assert_close(interface[0].reshape(2, 5, -1), seen["proj_in"])
    torch.testing.assert_close(logits, expected)
    if compile:  # the calls' events come from the forward rewritten for the compiled call: no fallback
        stats = ic.compile_stats()
        assert stats["compiled_calls"] >= 1 and not any(
            "`.source`" in r for r in stats["fallback_reasons"]
        ), stats
    model.clear_compiled()
    assert_clean(m)


def test_source_errors_and_super(net):
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = ic.NNsight(torch.nn.Sequential(Doubled(5, 3)))
    x = torch.rand(2, 5)
    names = dir(model[0].source)
    assert names == ["super_forward_0"]  # super() itself is left alone
    with model.trace(x):
        inner = model[0].source.super_forward_0.output.save()
        model[0].source.super_forward_0.output[:] = 1.0
        out = model.output.save()
    torch.testing.assert_close(inner, torch.ones(2, 3))
    torch.testing.assert_close(out, torch.full((2, 3), 2.0))
    with pytest.raises(AttributeError, match="no call named 'call_9'"):
        with model.trace(x):
            model[0].source.call_9.output.save()
    with model.trace(x):  # a call's own source: here the parent class's forward
        model[0].source.super_forward_0.source.F_linear_0.output[:] = 0.5
        out = model.output.save()
    torch.testing.assert_close(out, torch.full((2, 3), 1.0))
    with model.trace(x, scan=True, validate=True):  # op-level sites on fakes: shapes unknown, no error
        model[0].source.super_forward_0.output.save()
    assert_clean(model._module)


def _helper(x):
    return torch.relu(x) + torch.sigmoid(x)


class _CallsHelper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(_helper(x))


@pytest.mark.parametrize("compile", BOTH)
def test_source_of_a_call_reaches_into_the_function_it_calls(lm_dirs, compile):
    """``call.source``: the calls inside the function a call runs are sites too (nnsight's recursive
    ``.source``). GPT-2's eager attention: zeroing the attention probabilities (a softmax inside the attention
    function the module calls through a local variable) equals zeroing the attention output before ``c_proj``
    with a plain hook. Compiled, such a trace runs eagerly and says why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ic.reset_compile_stats()
    lm = ic.LanguageModel(lm_dirs["gpt2"], attn_implementation="eager")
    attn = lm.transformer.h[0].attn
    # the callee is a local variable of the forward: known once a run has seen it
    assert "known only when the model runs" in str(attn.source.attention_interface_0.source)
    with lm.trace("Hello world", compile=compile):
        probs = attn.source.attention_interface_0.source.nn_functional_softmax_0.output.clone().save()
        attn.source.attention_interface_0.source.nn_functional_softmax_0.output[:] = 0
        logits = lm.lm_head.output.save()
    listing = str(attn.source.attention_interface_0.source)
    assert "eager_attention_forward" in listing and "# nn_functional_softmax_0" in listing
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["gpt2"], attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(lm_dirs["gpt2"])
    ids = tok("Hello world", return_tensors="pt")
    with torch.no_grad():
        attentions = hf(**ids, output_attentions=True).attentions
    torch.testing.assert_close(probs, attentions[0])  # read before the edit: the softmax as computed
    handle = hf.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),))
    try:
        with torch.no_grad():
            expected = hf(**ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected)
    if compile:
        assert any("own `.source`" in r for r in ic.compile_stats()["fallback_reasons"])
    # a name the called function does not have: the error names the user's line, and nothing is left behind
    with pytest.raises(ic.UnknownModuleError, match="no call named 'softmax_9'") as info:
        with lm.trace("Hello world", compile=compile):
            attn.source.attention_interface_0.source.softmax_9.output.save()
    assert "softmax_9.output.save()" in str(info.value)
    assert_clean(lm._module)

    # a global function's calls are known before the model runs, and checked when recorded
    torch.manual_seed(0)
    net = _CallsHelper()
    model = ic.NNsight(net)
    listing = str(model.source._helper_0.source)
    assert "# torch_relu_0, torch_sigmoid_0" in listing
    with pytest.raises(ic.UnknownModuleError, match="did you mean 'torch_relu_0'"):
        with model.trace(torch.rand(2, 4)):
            model.source._helper_0.source.torch_relux_0.output.save()
    x = torch.rand(2, 4) - 0.5
    with model.trace(x, compile=compile):
        relu = model.source._helper_0.source.torch_relu_0.output.save()
        model.source._helper_0.source.torch_sigmoid_0.output[:] = 0
        out = model.output.save()
    torch.testing.assert_close(relu, torch.relu(x))
    torch.testing.assert_close(out, net.lin(torch.relu(x)))
    with pytest.raises(ic.TracingError, match="is a module"):
        with model.trace(x):
            model.source.self_lin_0.source.F_linear_0.output.save()
    lm.clear_compiled()
    model.clear_compiled()
    assert_clean(net)


# -- nnsight 0.4's parameter protocol ------------------------------------------------------------------------------
@pytest.mark.parametrize("compile", BOTH)
def test_parameters_inside_a_block_are_traced_values(compile):
    net = tiny_mlp()
    model = ic.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x, compile=compile):
        weight = model.layer1.weight.save()
        scaled = (model.layer2.weight * 2).save()
        out = model.output.save()
    assert isinstance(weight, torch.Tensor) and weight.value is weight
    assert type(net.layer1.weight) is torch.nn.Parameter  # the model's weight is left as it was
    torch.testing.assert_close(weight, net.layer1.weight.detach())
    torch.testing.assert_close(scaled, net.layer2.weight.detach() * 2)
    torch.testing.assert_close(out, net(x))
    with model.trace(x, compile=compile):
        model.layer2.bias[:] = 0  # in place on the weight, as written: the model keeps it
        zeroed = model.output.save()
    assert float(net.layer2.bias.abs().sum()) == 0.0
    torch.testing.assert_close(zeroed, net(x))
    model.clear_compiled()
    assert_clean(net)


def test_edit_takes_nnsight_04_inputs_and_device(net):
    model = ic.NNsight(net)
    assert model.device == torch.device("cpu")
    x = torch.rand(1, 5)
    with model.edit("an example input") as edited:  # nnsight 0.4's signature: not taken as inplace
        model.layer1.output[:, 0] = 0
    assert edited is not model
    with edited.trace(x):
        hidden = edited.layer1.output.save()
    with model.trace(x):
        plain = model.layer1.output.save()
    assert float(hidden[0, 0]) == 0.0
    torch.testing.assert_close(plain, _layer1(net, x))


@pytest.mark.parametrize("compile", BOTH)
def test_an_attached_module_called_with_hook_true_has_live_sites(compile):
    """nnsight 0.4's ``l0.attachment(acts, hook=True)``: a module attached to the model, called ad hoc inside a
    block, with its submodules' sites interceptable; without ``hook=True`` they do not run as sites."""
    from intervene_compiler.testing import tiny_gpt2

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    class Attachment(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.one = Identity()

        def forward(self, x):
            return self.one(x)

    m = tiny_gpt2(n_layer=2)
    model = ic.NNsight(m)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(8))
    block = model.transformer.h[0]
    block.attachment = Attachment()
    with model.trace(ids, compile=compile):
        block.output[:] = block.attachment(block.output, hook=True)
        block.attachment.one.output[:] = block.attachment.one.output * 2
        logits = model.output.logits.save()
    handle = m.transformer.h[0].register_forward_hook(lambda mod, a, o: o * 2)
    try:
        with torch.no_grad():
            expected = m(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ic.MissedSiteError):
        with model.trace(ids, compile=compile):
            block.attachment(block.output)  # without hook=True: an ad hoc call, no sites inside it
            block.attachment.one.output.save()
    model.clear_compiled()
    del m.transformer.h[0].attachment
    assert_clean(m)
