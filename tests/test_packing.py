"""Suffix packing (backends/eager/packing.py): after the shared prefix of identical invokes, later layers run one
packed sequence of the unedited row plus each invoke's positions from its first changed one.

Every result is checked against plain PyTorch forward hooks on the same model, one forward per invoke; plain
hooks on the later layers see the packed sequence (so the tests know packing happened, or did not)."""

from __future__ import annotations

import pytest
import torch

from intervene_compiler import NNsight
from intervene_compiler.testing import assert_clean, tiny_gpt2, tiny_llama

T, WIDTH = 8, 32


def _model(arch: str, attn: str, n_layer: int = 4):
    m = tiny_gpt2(n_layer=n_layer) if arch == "gpt2" else tiny_llama(n_layer=n_layer)
    m.config._attn_implementation = attn
    return m


def _blocks(m):
    return m.transformer.h if hasattr(m, "transformer") else m.model.layers


def _envoy_blocks(model):
    return model.transformer.h if hasattr(model._module, "transformer") else model.model.layers


def _shapes(block, into: list):
    return block.register_forward_pre_hook(lambda mod, args: into.append(tuple(args[0].shape)))


def _plain(m, ids, edit_layer: int, edit, read_layer: int | None = None, **kwargs):
    """Last-position logits (and block ``read_layer``'s output at the last position) with ``edit`` applied to
    block ``edit_layer``'s output by a plain forward hook."""
    seen = []

    def patch(mod, args, output):
        output = output.clone()
        edit(output)
        return output

    handles = [_blocks(m)[edit_layer].register_forward_hook(patch)]
    if read_layer is not None:
        handles.append(_blocks(m)[read_layer].register_forward_hook(lambda mod, a, o: seen.append(o[:, -1])))
    try:
        with torch.no_grad():
            logits = m(ids, **kwargs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return logits, (seen[0] if seen else None)


def _set_pos(src, pos):
    return lambda o: o.__setitem__((slice(None), pos), src[pos])


def _patch_sweep(m, ids, src, positions, watch=(0, 2), **invoke_kwargs):
    """One trace, one invoke of ``ids`` per position: block 1's output there set to ``src[pos]``, the last
    position's logits saved. Returns the saved values and, per block in ``watch``, the input shapes it saw."""
    model = NNsight(m)
    seen = [[] for _ in watch]
    handles = [_shapes(_blocks(m)[b], into) for b, into in zip(watch, seen)]
    try:
        with model.trace() as tracer:
            outs = []
            for pos in positions:
                with tracer.invoke(ids, **invoke_kwargs):
                    _envoy_blocks(model)[1].output[:, pos] = src[pos]
                    outs.append(model.lm_head.output[:, -1].save())
    finally:
        for h in handles:
            h.remove()
    return outs, seen


def _assert_plain(m, ids, src, positions, outs, **kwargs):
    for pos, out in zip(positions, outs):
        ref, _ = _plain(m, ids, 1, _set_pos(src, pos), **kwargs)
        torch.testing.assert_close(out.value, ref)
    assert_clean(m)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_position_patches_pack_and_match_plain_hooks(arch, attn):
    m = _model(arch, attn)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(0))
    src = torch.randn(T, WIDTH, generator=torch.Generator().manual_seed(1))
    outs, (first, later) = _patch_sweep(m, ids, src, range(T))
    assert first == [(1, T, WIDTH)]  # the shared prefix
    assert later == [(1, T + T * (T + 1) // 2, WIDTH)]  # the unedited row, then positions p.. of invoke p
    _assert_plain(m, ids, src, range(T), outs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_any_edit_packs_from_its_first_changed_position(arch):
    """Whole-value sets, in-place ops, several positions, and an edit that changes nothing (it packs no tokens):
    the first changed position is found by comparing with the unedited value."""
    m = _model(arch, "eager")
    model = NNsight(m)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(2))
    v = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))
    edits = [
        lambda o: o.__setitem__((slice(None), slice(5, None)), o[:, 5:] * 2),
        lambda o: (o.__setitem__((slice(None), 3), v), o.__setitem__((slice(None), 6), -v)),
        lambda o: o.__setitem__((slice(None), 2), o[:, 2]),  # the same values: nothing changes
    ]
    later = []
    handle = _shapes(_blocks(m)[2], later)
    try:
        with model.trace() as tracer:
            outs = []
            with tracer.invoke(ids):
                block = _envoy_blocks(model)[1]
                block.output[:, 5:] *= 2
                outs.append(model.lm_head.output[:, -1].save())
            with tracer.invoke(ids):
                block = _envoy_blocks(model)[1]
                block.output[:, 3] = v
                block.output[:, 6] = -v
                outs.append(model.lm_head.output[:, -1].save())
            with tracer.invoke(ids):
                block = _envoy_blocks(model)[1]
                block.output = block.output.clone()  # a whole-value set, equal to the unedited value
                outs.append(model.lm_head.output[:, -1].save())
    finally:
        handle.remove()
    assert later == [(1, T + (T - 5) + (T - 3), WIDTH)]
    for out, edit in zip(outs, edits):
        ref, _ = _plain(m, ids, 1, edit)
        torch.testing.assert_close(out.value, ref)
    assert_clean(m)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_later_layer_read_unpacks_there(arch):
    """A node reading a later layer's output gets one row per invoke; the layers after it run packed again."""
    m = _model(arch, "sdpa", n_layer=5)
    model = NNsight(m)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(4))
    src = torch.randn(T, WIDTH, generator=torch.Generator().manual_seed(5))
    packed, again = [], []
    handles = [_shapes(_blocks(m)[2], packed), _shapes(_blocks(m)[4], again)]
    positions = (3, 5, 7)
    try:
        with model.trace() as tracer:
            outs = []
            for pos in positions:
                with tracer.invoke(ids):
                    _envoy_blocks(model)[1].output[:, pos] = src[pos]
                    mid = _envoy_blocks(model)[3].output[:, -1].save()
                    outs.append((mid, model.lm_head.output[:, -1].save()))
    finally:
        for h in handles:
            h.remove()
    assert packed == again == [(1, T + sum(T - p for p in positions), WIDTH)]
    for pos, (mid, out) in zip(positions, outs):
        ref, ref_mid = _plain(m, ids, 1, _set_pos(src, pos), 3)
        torch.testing.assert_close(mid.value, ref_mid)
        torch.testing.assert_close(out.value, ref)
    assert_clean(m)


def test_padding_in_the_models_mask_is_kept():
    """The packed mask is gathered from the model's own mask: a padded position stays hidden."""
    m = _model("llama", "eager")
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(1, T, dtype=torch.long)
    mask[0, 0] = 0
    src = torch.randn(T, WIDTH, generator=torch.Generator().manual_seed(7))
    positions = (4, 5, 6, 7)
    outs, (_, later) = _patch_sweep(m, ids, src, positions, attention_mask=mask)
    assert later == [(1, T + 4 + 3 + 2 + 1, WIDTH)]
    _assert_plain(m, ids, src, positions, outs, attention_mask=mask)
    padded, _ = _plain(m, ids, 1, _set_pos(src, 7), attention_mask=mask)
    unmasked, _ = _plain(m, ids, 1, _set_pos(src, 7))
    assert not torch.allclose(unmasked, padded)  # the padding matters, so the check above can fail


def test_no_pack_where_it_cannot_hold():
    """A site inside a later layer, an edit of the last layer, or a model in training mode: no packing, and
    the results still match plain hooks."""
    m = _model("gpt2", "eager")
    model = NNsight(m)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(8))
    src = torch.randn(T, WIDTH, generator=torch.Generator().manual_seed(9))
    later, last = [], []
    handles = [_shapes(_blocks(m)[2], later), _shapes(_blocks(m)[3], last)]
    try:
        with model.trace() as tracer:
            with tracer.invoke(ids):
                model.transformer.h[1].output[:, 3] = src[3]
                inner = model.transformer.h[2].mlp.output[:, -1].save()
            with tracer.invoke(ids):
                model.transformer.h[1].output[:, 4] = src[4]
        with model.trace() as tracer:
            for pos in (3, 4):
                with tracer.invoke(ids):
                    model.transformer.h[3].output[:, pos] = src[pos]
                    model.lm_head.output[:, -1].save()
    finally:
        for h in handles:
            h.remove()
    assert later == [(2, T, WIDTH), (1, T, WIDTH)]  # the first trace ends after block 2's MLP
    assert last == [(1, T, WIDTH)]  # the shared prefix runs up to the edited last block
    later.clear()
    handles = [_shapes(_blocks(m)[2], later)]
    m.train()
    try:
        with model.trace() as tracer:
            for pos in (4, 5, 6, 7):
                with tracer.invoke(ids):
                    model.transformer.h[1].output[:, pos] = src[pos]
                    model.lm_head.output[:, -1].save()
    finally:
        m.eval()
    with model.trace() as tracer:  # the same trace in eval mode packs
        for pos in (4, 5, 6, 7):
            with tracer.invoke(ids):
                model.transformer.h[1].output[:, pos] = src[pos]
                model.lm_head.output[:, -1].save()
    handles[0].remove()
    assert later == [(4, T, WIDTH), (1, T + 4 + 3 + 2 + 1, WIDTH)]
    seen = []
    h = m.transformer.h[2].mlp.register_forward_hook(lambda mod, a, o: seen.append(o[:, -1]))
    try:
        _plain(m, ids, 1, _set_pos(src, 3))
    finally:
        h.remove()
    torch.testing.assert_close(inner.value, seen[0])
    assert_clean(m)


def _family(family: str, attn: str):
    """A tiny seeded causal LM of ``family``; Mistral and Qwen2 with a sliding window shorter than the prompt
    (Qwen2 on its last layer only, so the packed layers get different masks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=WIDTH // 4,
        vocab_size=128,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if family == "mistral":
        kwargs["sliding_window"] = 3
    if family == "qwen2":
        kwargs.update(use_sliding_window=True, sliding_window=3, max_window_layers=3)
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma"])
def test_other_families_share_and_pack(family, attn):
    m = _family(family, attn)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(10))
    src = torch.randn(T, WIDTH, generator=torch.Generator().manual_seed(11))
    positions = (2, 4, 5, 6, 7)
    outs, (first, later) = _patch_sweep(m, ids, src, positions)
    assert first == [(1, T, WIDTH)]
    assert later == [(1, T + sum(T - p for p in positions), WIDTH)]
    _assert_plain(m, ids, src, positions, outs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_language_model_prompts_pack_with_picked_logits(arch, lm_dirs):
    """``LanguageModel`` with one text prompt per invoke (tokenized, position ids from the attention mask) and
    the usual logit-difference metric: the prompt's layers after the edit run packed, the unembedding not at all,
    and every invoke's difference equals a plain-hook forward of the HF model."""
    import intervene_compiler as ic

    lm = ic.LanguageModel(lm_dirs[arch]).dispatch()
    m = lm._module
    prompt = "The Eiffel Tower is in the city of"
    ids = lm.tokenizer(prompt, return_tensors="pt")
    length, width = ids["input_ids"].shape[1], m.config.hidden_size
    src = torch.randn(length, width, generator=torch.Generator().manual_seed(12))
    later, ran_head = [], []
    handles = [
        _shapes(_blocks(m)[1], later),
        m.lm_head.register_forward_hook(lambda mod, a, o: ran_head.append(o.shape)),
    ]
    positions = range(2, length)
    try:
        with lm.trace() as tracer:
            diffs = []
            for pos in positions:
                with tracer.invoke(prompt):
                    _envoy_blocks(lm)[0].output[:, pos] = src[pos]
                    logits = lm.lm_head.output
                    diffs.append((logits[:, -1, 5] - logits[:, -1, 7]).save())
    finally:
        for h in handles:
            h.remove()
    assert later == [(1, length + sum(length - p for p in positions), width)]
    assert ran_head == []
    for pos, diff in zip(positions, diffs):
        ref, _ = _plain(m, ids["input_ids"], 0, _set_pos(src, pos), attention_mask=ids["attention_mask"])
        torch.testing.assert_close(diff.value, ref[:, 5] - ref[:, 7])
    assert_clean(m)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_invokes_editing_different_layers_pack_again_at_each(arch):
    """One trace patching two layers (an invoke per layer and position): after the first edited layer only its
    invokes have packed tokens; at the second, the pack is unpacked for the edit and packed again, now with
    every invoke's positions from its first changed one."""
    m = _model(arch, "eager", n_layer=5)
    model = NNsight(m)
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(13))
    src = torch.randn(T, WIDTH, generator=torch.Generator().manual_seed(14))
    plan = [(layer, pos) for layer in (1, 2) for pos in (4, 5, 6, 7)]
    after_first, after_second = [], []
    handles = [_shapes(_blocks(m)[2], after_first), _shapes(_blocks(m)[3], after_second)]
    try:
        with model.trace() as tracer:
            outs = []
            for layer, pos in plan:
                with tracer.invoke(ids):
                    _envoy_blocks(model)[layer].output[:, pos] = src[pos]
                    outs.append(model.lm_head.output[:, -1].save())
    finally:
        for h in handles:
            h.remove()
    assert after_first == [(1, T + 4 + 3 + 2 + 1, WIDTH)]
    assert after_second == [(1, T + 2 * (4 + 3 + 2 + 1), WIDTH)]
    for (layer, pos), out in zip(plan, outs):
        ref, _ = _plain(m, ids, layer, _set_pos(src, pos))
        torch.testing.assert_close(out.value, ref)
    assert_clean(m)
