"""Reuse of unedited decoder layers across traces (backends/eager/reuse.py).

Results are checked against plain PyTorch forward hooks on the same model. Whether a layer really ran is seen by
a plain hook on its attention submodule (a replayed layer's forward, and so its submodules, does not run); those
hooks stay installed for a whole test, so the model state the memo compares is unchanged by them.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from intervene_compiler import LanguageModel, NNsight
from intervene_compiler.errors import InterventionError
from intervene_compiler.testing import (
    assert_clean,
    decoder_blocks,
    plain_patch_logits,
    tiny_gpt2,
    tiny_llama,
)

T = 8


def _envoy_blocks(model):
    return model.transformer.h if hasattr(model._module, "transformer") else model.model.layers


class _Ran:
    """Counts, per decoder layer, how often its attention really ran."""

    def __init__(self, m):
        self.counts = [0] * len(decoder_blocks(m))
        self.handles = [
            (b.self_attn if hasattr(b, "self_attn") else b.attn).register_forward_hook(self._hook(i))
            for i, b in enumerate(decoder_blocks(m))
        ]

    def _hook(self, i):
        def hook(mod, args, output):
            self.counts[i] += 1

        return hook

    def take(self) -> list[int]:
        counts, self.counts = self.counts, [0] * len(self.counts)
        return counts

    def remove(self):
        for h in self.handles:
            h.remove()


def _plain_outputs(m, ids, pre_hook=None, **kwargs):
    """Every block's output by plain forward hooks (``output_hidden_states`` would leave HF's capture hooks);
    ``pre_hook``: (layer, hook) also installed for the run; ``kwargs`` go to the model."""
    outs = {}
    blocks = decoder_blocks(m)
    handles = [
        b.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(blocks)
    ]
    if pre_hook is not None:
        handles.append(blocks[pre_hook[0]].register_forward_pre_hook(pre_hook[1]))
    try:
        with torch.no_grad():
            m(ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(blocks))]


def _patch(model, ids, layer, pos, value, **trace_kwargs):
    with model.trace(ids, **trace_kwargs):
        _envoy_blocks(model)[layer].output[:, pos] = value
        out = model.lm_head.output[:, -1].save()
    return out.value


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patching_loop_replays_the_unedited_layers(arch, attn):
    m = tiny_gpt2(n_layer=4) if arch == "gpt2" else tiny_llama(n_layer=4)
    m.config._attn_implementation = attn
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(1))
    value = torch.randn(32)
    ran = _Ran(m)
    try:
        with torch.no_grad():
            for layer in range(4):
                for pos in (0, 3, T - 1):
                    got = _patch(model, ids, layer, pos, value)
                    torch.testing.assert_close(got, plain_patch_logits(m, ids, layer, pos, value))
                    # (the plain reference ran every layer once)
                    counts = ran.take()[: layer + 1]
                    if pos == 0:  # the first trace at a layer computes it (earlier ones were memoized)
                        assert counts == [1] * layer + [2]
                    else:
                        assert counts == [1] * (layer + 1)
    finally:
        ran.remove()
    assert_clean(m)


def test_reads_and_input_edits_replay_up_to_their_layer():
    m = tiny_gpt2(n_layer=5)
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = _plain_outputs(m, ids)
        ran = _Ran(m)  # (installed first: hooks added later would be a new model state)
        try:
            with model.trace(ids):
                first = model.transformer.h[3].output.save()
            assert ran.take() == [1, 1, 1, 1, 0]  # (the forward stops after layer 3)
            with model.trace(ids):
                again = model.transformer.h[3].output.save()
            assert ran.take() == [0, 0, 0, 0, 0]
            torch.testing.assert_close(again.value, first.value)
            torch.testing.assert_close(again.value, plain[3])
            # an edit of layer 2's input (its first positional argument) replays layers 0-1, runs 2 and 3
            with model.trace(ids):
                model.transformer.h[2].input[:, 0] = 0
                out = model.transformer.h[3].output.save()
            assert ran.take() == [0, 0, 1, 1, 0]
        finally:
            ran.remove()

        def zero(mod, args):
            h = args[0].clone()
            h[:, 0] = 0
            return (h, *args[1:])

        expected = _plain_outputs(m, ids, (2, zero))[3]
    torch.testing.assert_close(out.value, expected)
    # the in-place edit of layer 2's input reached no memoized value
    with torch.no_grad(), model.trace(ids):
        late = model.transformer.h[3].output.save()
    torch.testing.assert_close(late.value, plain[3])
    assert_clean(m)


def test_an_edit_of_a_replayed_output_leaves_the_memo_unedited():
    m = tiny_gpt2(n_layer=4)
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = _plain_outputs(m, ids)
        for _ in range(2):  # the second edit is of the replayed (memoized) output
            with model.trace(ids):
                model.transformer.h[1].output[:] = 0
                model.transformer.h[1].output.mul_(2)
                out = model.transformer.h[2].output.save()
        with model.trace(ids):
            h1 = model.transformer.h[1].output.save()
            h2 = model.transformer.h[2].output.save()
    torch.testing.assert_close(h1.value, plain[1])
    torch.testing.assert_close(h2.value, plain[2])
    assert not torch.allclose(out.value, plain[2])


def test_changed_model_state_or_input_is_recomputed():
    m = tiny_llama(n_layer=3)
    model = NNsight(m, reuse=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 128, (1, T), generator=g)
    value = torch.randn(32, generator=g)
    ran = _Ran(m)

    def check(ids, expect_runs):
        got = _patch(model, ids, 2, 1, value)
        assert ran.take() == expect_runs
        torch.testing.assert_close(got, plain_patch_logits(m, ids, 2, 1, value))
        ran.take()

    try:
        with torch.no_grad():
            check(ids, [1, 1, 1])
            check(ids, [0, 0, 0])
            # an in-place weight edit (bumps the version counter)
            m.model.layers[0].mlp.down_proj.weight.mul_(1.5)
            check(ids, [1, 1, 1])
            check(ids, [0, 0, 0])
            # load_state_dict copies into the parameters
            state = {k: v.clone() for k, v in m.state_dict().items()}
            state["model.layers.1.self_attn.q_proj.weight"] += 0.25
            m.load_state_dict(state)
            check(ids, [1, 1, 1])
            # a parameter replaced
            emb = m.model.embed_tokens
            emb.weight = torch.nn.Parameter(emb.weight * 2, requires_grad=False)
            check(ids, [1, 1, 1])
            # a plain hook added to an early layer
            h = m.model.layers[0].register_forward_hook(lambda mod, a, o: o * 3)
            try:
                check(ids, [1, 1, 1])
            finally:
                h.remove()
            check(ids, [1, 1, 1])
            # another prompt, then back
            other = ids.clone()
            other[0, 3] += 1
            check(other, [1, 1, 1])
            check(ids, [1, 1, 1])
            # training mode: no reuse at all (dropout may be live)
            m.train()
            try:
                check(ids, [1, 1, 1])
                check(ids, [1, 1, 1])
            finally:
                m.eval()
    finally:
        ran.remove()
    assert_clean(m)


@pytest.mark.parametrize("write", ["mul_", "assign", "numpy"])
def test_writes_through_data_are_never_replayed_stale_by_default(write):
    """A weight written through ``.data`` (or a NumPy view) between traces bumps no version counter: by default
    nothing is replayed, so the next trace sees the new weight; a model that opts in to reuse needs
    ``clear_reuse()`` after such a write (documented), and gives fresh values after it."""
    m = tiny_gpt2(n_layer=2)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(5))
    value = torch.randn(32)
    weight = m.transformer.h[0].mlp.c_fc.weight

    def change():
        if write == "mul_":
            weight.data.mul_(3)
        elif write == "assign":
            weight.data = weight.data * 3
        else:
            weight.detach().numpy()[:] *= 3

    with torch.no_grad():
        model = NNsight(m)  # the default
        for _ in range(3):
            _patch(model, ids, 1, 2, value)
            change()
            torch.testing.assert_close(
                _patch(model, ids, 1, 2, value), plain_patch_logits(m, ids, 1, 2, value)
            )
        opted = NNsight(m, reuse=True)
        _patch(opted, ids, 1, 2, value)
        change()
        opted.clear_reuse()
        fresh = plain_patch_logits(m, ids, 1, 2, value)
        torch.testing.assert_close(_patch(opted, ids, 1, 2, value), fresh)
        torch.testing.assert_close(_patch(opted, ids, 1, 2, value, reuse=False), fresh)
    assert_clean(m)


def test_no_reuse_while_autograd_records():
    m = tiny_gpt2(n_layer=2)  # parameters require grad
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(6))
    ran = _Ran(m)
    try:
        for _ in range(2):
            with model.trace(ids):
                out = model.lm_head.output[:, -1].save()
            assert ran.take() == [1, 1]
        out.value.sum().backward()  # the whole graph is there: every layer gets a gradient
        assert m.transformer.h[0].attn.c_attn.weight.grad is not None
    finally:
        ran.remove()


def test_batched_invokes_replay_then_pack():
    m = tiny_gpt2(n_layer=4)
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(7))
    src = torch.randn(T, 32)
    ran = _Ran(m)
    try:
        with torch.no_grad():
            for rep in range(2):
                with model.trace() as tracer:
                    outs = []
                    for pos in range(T):
                        with tracer.invoke(ids):
                            model.transformer.h[2].output[:, pos] = src[pos]
                            outs.append(model.lm_head.output[:, -1].save())
                counts = ran.take()
                assert counts[:3] == ([1, 1, 1] if rep == 0 else [0, 0, 0])
                for pos, out in enumerate(outs):
                    torch.testing.assert_close(out.value, plain_patch_logits(m, ids, 2, pos, src[pos]))
                ran.take()
    finally:
        ran.remove()
    assert_clean(m)


def test_language_model_prompt_loop(lm_dirs):
    lm = LanguageModel(lm_dirs["gpt2"], reuse=True)
    prompt = "The Eiffel Tower is in the city of"
    with torch.no_grad():
        with lm.trace("The Colosseum is in the city of"):
            clean = lm.transformer.h[1].output.save()

        def sweep(reuse):
            diffs = []
            for pos in range(3):
                with lm.trace(prompt, reuse=reuse):
                    lm.transformer.h[1].output[:, pos] = clean[:, pos]
                    logits = lm.lm_head.output
                    diffs.append((logits[0, -1, 5] - logits[0, -1, 7]).save())
            return torch.stack([d.value for d in diffs])

        torch.testing.assert_close(sweep(True), sweep(False))
        torch.testing.assert_close(sweep(True), sweep(False))
    assert_clean(lm._module)


def test_an_error_leaves_no_replayed_forward_and_the_next_trace_works():
    m = tiny_gpt2(n_layer=3)
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with model.trace(ids):
            ok = model.transformer.h[2].output.save()
        with pytest.raises(InterventionError), model.trace(ids):
            model.transformer.h[2].output[:, 0] = torch.zeros(5)  # wrong width
        assert_clean(m)
        with model.trace(ids):
            again = model.transformer.h[2].output.save()
    torch.testing.assert_close(again.value, ok.value)


def test_memo_size_cap(monkeypatch):
    from intervene_compiler.backends.eager import reuse

    m = tiny_gpt2(n_layer=3)
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(reuse, "_MAX_BYTES", T * 32 * 4)  # room for one layer's output
    ran = _Ran(m)
    try:
        with torch.no_grad():
            with model.trace(ids):
                a = model.transformer.h[2].output.save()
            with model.trace(ids):
                b = model.transformer.h[2].output.save()
    finally:
        ran.remove()
    assert ran.counts == [1, 2, 2]  # the second trace replayed layer 0 only
    assert list(model._state.caches.reuse_memo.outputs) == [0]
    torch.testing.assert_close(a.value, b.value)


def test_explain_says_what_was_replayed_or_why_not():
    m = tiny_gpt2(n_layer=3)
    model = NNsight(m, reuse=True)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(10))

    def explained(**trace_kwargs):
        with model.trace(ids, **trace_kwargs) as tracer:
            model.transformer.h[2].output[:, 1] = 0
            model.lm_head.output.save()
        return tracer.explain(file=io.StringIO())

    assert "autograd records" in explained()  # parameters require grad
    with torch.no_grad():
        assert "memoized layers 0-2 for later traces" in explained()
        assert "replayed decoder layers 0-2 memoized by an earlier trace" in explained()
        assert "reuse across traces" not in explained(reuse=False)
        m.train()
        try:
            assert "module <root> is in training mode" in explained()
        finally:
            m.eval()


def test_a_kv_cache_passed_in_is_never_reused():
    from transformers import DynamicCache

    m = tiny_gpt2(n_layer=2)
    model = NNsight(m, reuse=True)
    g = torch.Generator().manual_seed(11)
    prefix, ids = torch.randint(1, 128, (1, 4), generator=g), torch.randint(1, 128, (1, T), generator=g)
    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(prefix, past_key_values=cache)  # the cache holds the prefix; each trace below appends to it
        outs = []
        for _ in range(2):
            snapshot = copy.deepcopy(cache)  # what this trace's forward starts from
            with model.trace(ids, past_key_values=cache) as tracer:
                outs.append(model.transformer.h[1].output.save())
            assert "neither a tensor nor a plain value" in tracer.explain(file=io.StringIO())
            plain = _plain_outputs(m, ids, past_key_values=snapshot)[1]
            torch.testing.assert_close(outs[-1].value, plain)
    assert not torch.allclose(outs[0].value, outs[1].value)  # the second trace saw a longer cache


def test_an_input_that_requires_grad_keeps_its_history():
    m = tiny_gpt2(n_layer=2).requires_grad_(False)
    model = NNsight(m, reuse=True)
    embeds = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(12), requires_grad=True)
    grads = []
    for _ in range(2):
        with model.trace(inputs_embeds=embeds) as tracer:
            out = model.transformer.h[1].output.save()
        assert "an input requires grad" in tracer.explain(file=io.StringIO())
        (grad,) = torch.autograd.grad(out.value.sum(), embeds)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_a_language_model_replays_layers(lm_dirs):
    """A LanguageModel's added ``generator`` module takes the model's mode: it used to be in training mode, which
    turned reuse off for every LanguageModel ("module generator is in training mode")."""
    lm = LanguageModel(lm_dirs["gpt2"], reuse=True)
    assert not lm._model.generator.training
    with torch.no_grad():
        for _ in range(2):
            with lm.trace("Hello world, this is") as tracer:
                lm.transformer.h[1].output[:, -1] = 0
                logits = lm.lm_head.output[:, -1].save()
        text = tracer.explain(file=io.StringIO())
        with lm.trace("Hello world, this is", reuse=False):
            lm.transformer.h[1].output[:, -1] = 0
            reference = lm.lm_head.output[:, -1].save()
    assert "replayed decoder layers 0-1" in text
    assert torch.equal(logits.value, reference.value)
