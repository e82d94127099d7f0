"""LanguageModel on tiny GPT-2 and Llama checkpoints loaded through ``from_pretrained``, checked against hooks.

Each test loads the checkpoint the way a user would (``ic.LanguageModel(folder)``), runs an intervention, then
does the same thing on a plain ``AutoModelForCausalLM`` with ``register_forward_hook`` and compares.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean

ARCHS = ("gpt2", "llama")
PATHS = {
    "gpt2": {"embed": "transformer.wte", "blocks": "transformer.h"},
    "llama": {"embed": "model.embed_tokens", "blocks": "model.layers"},
}
PROMPT = "The Eiffel Tower is in the city of"
SHORT = "Hello"


@pytest.fixture(scope="module")
def lms(lm_dirs):
    return {arch: ic.LanguageModel(path) for arch, path in lm_dirs.items()}


def hf_logits(hf, tok, text, hooks=()):
    """Logits of ``text`` run alone through the plain model with ``(module path, hook)`` forward hooks."""
    handles = [hf.get_submodule(p).register_forward_hook(h) for p, h in hooks]
    try:
        with torch.no_grad():
            return hf(**tok(text, return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()


def stash_output(hf, tok, text, path):
    box = {}

    def keep(m, a, out):
        box["out"] = out

    hf_logits(hf, tok, text, [(path, keep)])
    return box["out"]


# -- loading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_meta_until_first_trace(arch, lm_dirs, hf_models):
    model = ic.LanguageModel(lm_dirs[arch])
    assert not model.dispatched
    assert all(p.device.type == "meta" for p in model._module.parameters())
    text = repr(model)
    assert "(generator): Generation(" in text and type(hf_models[arch][0]).__name__ in text
    assert model.config.vocab_size == len(model.tokenizer)
    assert model.tokenizer.pad_token == model.tokenizer.eos_token  # given one without asking
    block = model.get(PATHS[arch]["blocks"])[0]  # an envoy built before the weights exist
    with model.scan(PROMPT):  # shapes on the meta model: nothing is loaded
        shape = block.output.shape
    assert not model.dispatched
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert tuple(shape) == (1, n, model.config.hidden_size)
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    assert model.dispatched
    assert block._module is model._module.get_submodule(f"{PATHS[arch]['blocks']}.0")
    assert all(p.device.type == "cpu" for p in model._module.parameters())
    assert_close(logits.value, hf_logits(*hf_models[arch], PROMPT))
    assert_clean(model._module)


def test_dispatch_and_dtype(lm_dirs):
    model = ic.LanguageModel(lm_dirs["gpt2"], dispatch=True, torch_dtype=torch.float64)
    assert model.dispatched
    assert {p.dtype for p in model._module.parameters()} == {torch.float64}
    with model.trace(PROMPT):
        h = model.transformer.h[0].output.save()
    assert h.value.dtype == torch.float64


def test_parameters_frozen_before_loading_stay_frozen(lm_dirs):
    """``requires_grad_(False)`` on a model still on the meta device holds after the first trace loads it: a
    gradient through the frozen weights is not computed, as on a model frozen after loading."""
    model = ic.LanguageModel(lm_dirs["gpt2"])
    assert not model.dispatched
    model.transformer.h[0].requires_grad_(False)  # part of it, on meta
    with model.trace(PROMPT):
        model.transformer.h[1].output.save()
    assert model.dispatched
    frozen = {n for n, p in model._module.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model._module.named_parameters() if n.startswith("transformer.h.0.")}
    assert frozen


def test_device_map_goes_to_transformers(lm_dirs):
    try:
        import accelerate  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="accelerate"):  # transformers' own message
            ic.LanguageModel(lm_dirs["gpt2"], device_map="cpu", dispatch=True)
        return
    model = ic.LanguageModel(lm_dirs["gpt2"], device_map="cpu", dispatch=True)
    assert model._module.device.type == "cpu"


@pytest.mark.parametrize("arch", ARCHS)
def test_wraps_a_built_model(arch, hf_models):
    hf, tok = hf_models[arch]
    model = ic.LanguageModel(hf, tokenizer=tok)
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    assert_close(logits.value, hf_logits(hf, tok, PROMPT))
    assert_clean(hf)


# -- interventions against hooks ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_ablation_matches_hooks(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    mlp = f"{PATHS[arch]['blocks']}.1.mlp"
    with model.trace(PROMPT):
        model.get(mlp).output[:] = 0
        logits = model.lm_head.output.save()
    expected = hf_logits(hf, tok, PROMPT, [(mlp, lambda m, a, out: torch.zeros_like(out))])
    assert_close(logits.value, expected)
    assert not torch.allclose(expected, hf_logits(hf, tok, PROMPT))


@pytest.mark.parametrize("arch", ARCHS)
def test_input_forms(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    ids = tok(PROMPT)["input_ids"]
    expected = hf_logits(hf, tok, PROMPT)[:, -1]
    forms = [
        PROMPT,
        [PROMPT],
        torch.tensor(ids),
        torch.tensor([ids]),
        ids,
        [ids],
        tok(PROMPT, return_tensors="pt"),
        dict(tok(PROMPT)),
    ]
    for form in forms:
        with model.trace(form):
            logits = model.lm_head.output[:, -1].save()
        assert_close(logits.value, expected, msg=f"input form {type(form).__name__}")


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_matches_each_prompt_alone(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    texts = [PROMPT, SHORT, "After John and Mary went to the store"]
    with model.trace() as tracer:
        saved = []
        for text in texts:
            with tracer.invoke(text):
                saved.append(model.lm_head.output[:, -1].save())
        with tracer.invoke([SHORT, PROMPT]):  # one invoke with two prompts of different lengths
            pair = model.lm_head.output[:, -1].save()
    for text, logits in zip(texts, saved):
        assert_close(logits.value, hf_logits(hf, tok, text)[:, -1])
    assert_close(pair.value[0:1], hf_logits(hf, tok, SHORT)[:, -1])
    assert_close(pair.value[1:2], hf_logits(hf, tok, PROMPT)[:, -1])


@pytest.mark.parametrize("arch", ARCHS)
def test_invoke_rows_keep_left_pads(arch, lms):
    model = lms[arch]
    n_long, n_short = (len(model.tokenizer(t)["input_ids"]) for t in (PROMPT, SHORT))
    with model.trace() as tracer:
        with tracer.invoke(PROMPT):
            pass
        with tracer.invoke(SHORT):
            ids = model.input.save()  # the root's first input: input_ids
            mask = model.inputs[1]["attention_mask"].save()
    assert ids.shape == (1, n_long)
    pads = n_long - n_short
    assert mask.value.tolist() == [[0] * pads + [1] * n_short]
    assert ids.value[0, :pads].tolist() == [model.tokenizer.pad_token_id] * pads


def test_tokenizer_kwargs_pass_through(lms, hf_models):
    model, (hf, tok) = lms["gpt2"], hf_models["gpt2"]
    truncated = tok.decode(tok(PROMPT)["input_ids"][:3])
    expected = hf_logits(hf, tok, truncated)
    with model.trace() as tracer:
        with tracer.invoke(PROMPT, max_length=3, truncation=True):
            a = model.lm_head.output.save()
    with model.trace(PROMPT, invoker_args={"max_length": 3, "truncation": True}) as tracer:
        b = model.lm_head.output.save()
    assert tracer.invoker.inputs[1]["input_ids"].shape == (1, 3)
    assert_close(a.value, expected)
    assert_close(b.value, expected)


# -- cross-prompt patching -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_embeddings_match_hooks(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    source = "The Eiffel Tower is in"
    target = "_" + " _" * (len(tok(source, add_special_tokens=False)["input_ids"]) - 1)  # as many tokens
    assert len(tok(source)["input_ids"]) == len(tok(target)["input_ids"])
    embed = PATHS[arch]["embed"]
    with model.trace() as tracer:
        with tracer.invoke(source):
            embeddings = model.get(embed).output
        with tracer.invoke(target):
            model.get(embed).output = embeddings
            patched = model.lm_head.output.save()
        with tracer.invoke(target):
            original = model.lm_head.output.save()
    source_emb = stash_output(hf, tok, source, embed)
    expected = hf_logits(hf, tok, target, [(embed, lambda m, a, out: source_emb)])
    assert_close(patched.value, expected)
    assert_close(patched.value, hf_logits(hf, tok, source))  # the target now computes the source prompt
    assert_close(original.value, hf_logits(hf, tok, target))


@pytest.mark.parametrize("use_barrier", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_one_position_from_other_prompt(arch, use_barrier, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    clean, corrupt = PROMPT, "The Colosseum is in"  # different lengths: the batch is left-padded
    block = f"{PATHS[arch]['blocks']}.0"
    with model.trace() as tracer:
        barrier = tracer.barrier(2) if use_barrier else None
        with tracer.invoke(clean):
            hidden = model.get(block).output[:, -1]
            if barrier:
                barrier()
        with tracer.invoke(corrupt):
            if barrier:
                barrier()
            model.get(block).output[:, -1] = hidden
            logits = model.lm_head.output[:, -1].save()
    clean_hidden = stash_output(hf, tok, clean, block)[:, -1]

    def patch(m, a, out):
        out = out.clone()
        out[:, -1] = clean_hidden
        return out

    expected = hf_logits(hf, tok, corrupt, [(block, patch)])[:, -1]
    assert_close(logits.value, expected)
    assert not torch.allclose(expected, hf_logits(hf, tok, corrupt)[:, -1])


def test_edit_before_dispatch(lm_dirs, hf_models):
    hf, tok = hf_models["gpt2"]
    model = ic.LanguageModel(lm_dirs["gpt2"])
    with model.edit() as edited:
        model.transformer.h[1].mlp.output[:] = 0
    with edited.trace(PROMPT):
        logits = edited.lm_head.output.save()
    with model.trace(PROMPT):
        plain = model.lm_head.output.save()
    expected = hf_logits(hf, tok, PROMPT, [("transformer.h.1.mlp", lambda m, a, out: torch.zeros_like(out))])
    assert_close(logits.value, expected)
    assert_close(plain.value, hf_logits(hf, tok, PROMPT))
    assert edited._module is model._module  # one set of weights, loaded once
