"""The device tier: eager and compiled runs on the machine's accelerator against plain PyTorch hooks there.

The tests run on CUDA when a GPU is present (compiled programs then go through Triton), else on the CPU, so CI
keeps them working; ``IC_TEST_DEVICE`` picks the device. On a lent GPU: ``python -m pytest tests/test_device.py``.

What is checked on the device: eager reads and edits against hooks (the fast read path and wraps included),
compiled parity with zero recompiles over position, value and layer sweeps, batched patches, reuse across
traces, a compiled steering-vector training loop, steered generation compiled against eager and hooks, and (with an
accelerator only) a compiled trace repeated across a move of the model between the CPU and the device.
"""

from __future__ import annotations

import os

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, plain_block_outputs, plain_patch_logits, tiny_gpt2

pytestmark = pytest.mark.device

DEVICE = torch.device(os.environ.get("IC_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt2(n_layer=3).to(DEVICE)


@pytest.fixture
def gpt(hf):
    model = ic.NNsight(hf, reuse=True)
    ic.reset_compile_stats()
    yield model
    model.clear_compiled()
    model.clear_reuse()
    assert_clean(hf)


def _ids(n: int = 1, t: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, t), generator=g).to(DEVICE)


def test_eager_reads_and_a_patch_match_hooks(gpt, hf):
    ids = _ids()
    with torch.no_grad(), gpt.trace(ids, reuse=False):
        saved = [gpt.transformer.h[i].output.save() for i in range(3)]
    for got, want in zip(saved, plain_block_outputs(hf, ids)):
        assert got.value.device.type == DEVICE.type
        torch.testing.assert_close(got.value, want)
    v = torch.randn(32, device=DEVICE)
    with torch.no_grad(), gpt.trace(ids, reuse=False):
        gpt.transformer.h[1].output[:, 3] = v
        logits = gpt.lm_head.output[:, -1].save()
    torch.testing.assert_close(logits.value, plain_patch_logits(hf, ids, 1, 3, v))


@pytest.mark.compiled
def test_compiled_position_value_and_layer_sweeps_compile_once(gpt):
    ids = _ids()
    for layer in range(3):
        for pos in (0, 4, 7):
            v = torch.randn(32, device=DEVICE)
            outs = []
            for compile in (True, False):
                with torch.no_grad(), gpt.trace(ids, compile=compile, reuse=False):
                    gpt.transformer.h[layer].output[:, pos] = v
                    outs.append(gpt.lm_head.output[:, -1].save())
            torch.testing.assert_close(outs[0].value, outs[1].value, rtol=1e-4, atol=1e-4)
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["fallbacks"] == 0, stats


@pytest.mark.compiled
def test_batched_patches_compiled_match_eager(gpt):
    ids = _ids()
    clean = _ids(seed=1)
    with torch.no_grad(), gpt.trace(clean):
        source = gpt.transformer.h[1].output.save()
    results = []
    for compile in (False, True):
        diffs = []
        with torch.no_grad(), gpt.trace(compile=compile) as tracer:
            for pos in range(8):
                with tracer.invoke(ids):
                    gpt.transformer.h[1].output[:, pos] = source[:, pos]
                    diffs.append((gpt.lm_head.output[:, -1, 5] - gpt.lm_head.output[:, -1, 7]).save())
        results.append(torch.cat([d.value for d in diffs]))
    expected = torch.stack(
        [
            plain_patch_logits(gpt._model, ids, 1, pos, source.value[:, pos])[0, 5]
            - plain_patch_logits(gpt._model, ids, 1, pos, source.value[:, pos])[0, 7]
            for pos in range(8)
        ]
    )
    torch.testing.assert_close(results[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1], expected, rtol=1e-4, atol=1e-4)


def test_reuse_across_traces_on_the_device(gpt, hf):
    ids = _ids()
    v = torch.randn(32, device=DEVICE)
    outs = []
    for _ in range(2):
        with torch.no_grad(), gpt.trace(ids) as tracer:
            gpt.transformer.h[2].output[:, 1] = v
            outs.append(gpt.lm_head.output[:, -1].save())
    assert "replayed" in (tracer._reuse_note or ""), tracer._reuse_note
    torch.testing.assert_close(outs[0].value, outs[1].value, rtol=0, atol=0)
    torch.testing.assert_close(outs[1].value, plain_patch_logits(hf, ids, 2, 1, v))


@pytest.mark.compiled
def test_steering_vector_training_compiled_matches_eager(gpt):
    ids = _ids(4, 6)
    trained = []
    for compile in (False, True):
        torch.manual_seed(3)
        vec = torch.zeros(32, device=DEVICE, requires_grad=True)
        opt = torch.optim.Adam([vec], lr=0.05)
        for _ in range(4):
            with gpt.trace(ids, compile=compile):
                gpt.transformer.h[1].output[:] += vec
                loss = gpt.lm_head.output[:, -1, 3].mean().save()
                loss.backward()
            opt.step()
            opt.zero_grad()
        trained.append(vec.detach().clone())
    torch.testing.assert_close(trained[0], trained[1], rtol=1e-4, atol=1e-5)
    assert ic.compile_stats()["fallbacks"] == 0


@pytest.mark.compiled
def test_steered_generation_compiled_matches_eager_and_hooks(lm_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intervene_compiler.testing import steered_generate

    path = lm_dirs["gpt2"]
    hf = AutoModelForCausalLM.from_pretrained(path).to(DEVICE).eval()
    tok = AutoTokenizer.from_pretrained(path)
    lm = ic.LanguageModel(hf, tokenizer=tok)
    torch.manual_seed(3)
    steer = torch.randn(64, device=DEVICE) * 4
    prompt, n, block = "The Eiffel Tower is in the city of", 6, "transformer.h.0"
    ic.reset_compile_stats()
    ids, _, logits = steered_generate(lm, prompt, n, steer, block, compile=True)
    stats = ic.compile_stats()
    assert stats["compiles"] == 2 and stats["fallbacks"] == 0, stats
    eager_ids, _, eager_logits = steered_generate(lm, prompt, n, steer, block, compile=False)
    assert torch.equal(ids, eager_ids)
    for got, want in zip(logits, eager_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    def add(mod, args, output):  # the reference: plain generate with a hook on the device
        output = output.clone()
        output[:, -1] += steer
        return output

    handle = hf.get_submodule(block).register_forward_hook(add)
    try:
        encoded = {k: v.to(DEVICE) for k, v in tok(prompt, return_tensors="pt").items()}
        with torch.no_grad():
            want = hf.generate(**encoded, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert torch.equal(ids.to(want.device), want)
    lm.clear_compiled()
    assert_clean(hf)


@pytest.mark.compiled
def test_reduce_overhead_matches_eager_and_keeps_each_calls_values(gpt):
    """compile="reduce-overhead": CUDA graphs on a GPU (each saved value copied out of the graph's buffers, which
    the next replay overwrites), compile=True elsewhere (and explain() says so); values equal eager's."""
    import io
    import warnings

    ids = _ids()
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # off a GPU: "CUDA graphs need a CUDA device" (tested on the CPU)
        for i in range(4):  # replays after the first: each call's values must survive the next
            with torch.no_grad(), gpt.trace(ids, compile="reduce-overhead", reuse=False) as tracer:
                gpt.transformer.h[1].output[:, 2] = gpt.transformer.h[1].output[:, 2] * float(i + 1)
                hidden = gpt.transformer.h[2].output.save()
                logits = gpt.lm_head.output[:, -1].save()
            got.append((hidden, logits))
    for i, (hidden, logits) in enumerate(got):
        with torch.no_grad(), gpt.trace(ids, reuse=False):
            gpt.transformer.h[1].output[:, 2] = gpt.transformer.h[1].output[:, 2] * float(i + 1)
            want_hidden = gpt.transformer.h[2].output.save()
            want_logits = gpt.lm_head.output[:, -1].save()
        torch.testing.assert_close(hidden, want_hidden, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    text = tracer.explain(file=io.StringIO())
    if DEVICE.type == "cuda":
        assert "CUDA graphs: on" in text
    else:
        assert "CUDA graphs: not used" in text
    stats = ic.compile_stats()
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["fallbacks"] == 0, stats


@pytest.mark.compiled
def test_reduce_overhead_generation_matches_eager(lm_dirs):
    """Decode steps under compile="reduce-overhead" (CUDA graphs on a GPU) give eager's tokens and logits."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intervene_compiler.testing import steered_generate

    path = lm_dirs["gpt2"]
    hf = AutoModelForCausalLM.from_pretrained(path).to(DEVICE).eval()
    lm = ic.LanguageModel(hf, tokenizer=AutoTokenizer.from_pretrained(path))
    torch.manual_seed(4)
    steer = torch.randn(64, device=DEVICE) * 4
    prompt, n, block = "The Eiffel Tower is in the city of", 6, "transformer.h.1"
    ic.reset_compile_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # off a GPU: "CUDA graphs need a CUDA device"
        ids, _, logits = steered_generate(lm, prompt, n, steer, block, compile="reduce-overhead")
    eager_ids, _, eager_logits = steered_generate(lm, prompt, n, steer, block, compile=False)
    assert torch.equal(ids, eager_ids)
    for got, want in zip(logits, eager_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ic.compile_stats()["fallbacks"] == 0
    lm.clear_compiled()
    assert_clean(hf)


@pytest.mark.compiled
@pytest.mark.skipif(
    DEVICE.type == "cpu", reason="moves a model between the CPU and an accelerator: needs one"
)
def test_the_compiled_shortcut_leaves_on_a_device_change():
    """A repeated save-only compiled trace takes its last plan and entry again (run.Hot); moving the model (and
    its input) to another device leaves that shortcut and Dynamo's direct call: values stay the hooks' on each
    device, and moving back finds the first device's program again."""
    hf = tiny_gpt2(n_layer=2)
    model = ic.NNsight(hf)
    ic.reset_compile_stats()
    for device in ("cpu", "cpu", DEVICE, DEVICE, "cpu"):
        hf.to(device)
        ids = _ids().to(device)
        with torch.no_grad(), model.trace(ids, compile=True):
            saved = model.transformer.h[0].output.save()
        want = plain_block_outputs(hf, ids)[0]
        assert saved.device.type == torch.device(device).type
        torch.testing.assert_close(saved, want)
    stats = ic.compile_stats()
    assert stats["compiles"] == 2 and stats["direct_calls"] == 3 and stats["fallbacks"] == 0, stats
    model.clear_compiled()
    assert_clean(hf)
