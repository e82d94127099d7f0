"""Compiled generation: ``generate(..., compile=True)`` runs each step's forward as a compiled program.

Every compiled result is compared with the eager backend (same block, ``compile=False``) and with plain
``transformers`` ``generate`` plus a forward hook doing the same edit. Compile counts come from
``ic.compile_stats()``: one program for the prefill and one for decode, none for a repeated block. Inductor
compiles are slow here, so each model is built once per module (its compiled programs are shared by the tests).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.testing import assert_close

import intervene_compiler as ic
from intervene_compiler import testing
from intervene_compiler.testing import assert_clean, generate_with_hooks

pytestmark = pytest.mark.compiled

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
PROMPT = "The Eiffel Tower is in the city of"
N = 6  # new tokens


@pytest.fixture(scope="module")
def compiled_lms(lm_dirs):
    """One LanguageModel per architecture whose blocks compile by default (``LanguageModel(..., compile=True)``)."""
    models = {arch: ic.LanguageModel(path, compile=True) for arch, path in lm_dirs.items()}
    yield models
    for model in models.values():
        model.clear_compiled()
        if model.dispatched:
            assert_clean(model._module)


@pytest.fixture(autouse=True)
def _stats():
    ic.reset_compile_stats()
    yield


def hf_generate(hf, tok, block, steer=None, zero_steps=()):
    """Plain ``hf.generate`` with a forward hook on ``block``: returns (ids, per-step last-token logits)."""
    ids, logits, _ = generate_with_hooks(
        hf, tok, PROMPT, N, steer=steer, block=block, ablate_steps=zero_steps
    )
    return ids, logits


def steered_generate(model, steer, block, compile=None):
    return testing.steered_generate(model, PROMPT, N, steer, block, compile)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_steering_every_step_compiles_prefill_and_decode_once(arch, compiled_lms, hf_models, steer):
    model, (hf, tok) = compiled_lms[arch], hf_models[arch]
    block = f"{BLOCKS[arch]}.0"
    ids, hidden, logits = steered_generate(model, steer, block)  # compile=True: the model's default
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0, stats["fallback_reasons"]
    assert stats["compiles"] == 2  # the prefill's program and the decode program, not one per token
    assert stats["compiled_calls"] == N and stats["cache_hits"] == N - 2

    want_ids, want_logits = hf_generate(hf, tok, block, steer=steer)
    assert torch.equal(ids, want_ids)
    assert len(logits) == len(hidden) == N
    for got, want in zip(logits, want_logits):
        assert_close(got, want, atol=1e-4, rtol=1e-4)

    eager_ids, eager_hidden, eager_logits = steered_generate(model, steer, block, compile=False)
    assert torch.equal(ids, eager_ids)
    for got, want in zip(hidden + logits, eager_hidden + eager_logits):
        assert_close(got, want, atol=1e-4, rtol=1e-4)

    ic.reset_compile_stats()
    again, _, _ = steered_generate(model, steer * 2, block)  # same structure, other values: no compile
    stats = ic.compile_stats()
    assert stats["compiles"] == 0 and stats["cache_hits"] == N and stats["fallbacks"] == 0
    assert torch.equal(again, hf_generate(hf, tok, block, steer=steer * 2)[0])


def test_iter_slice_changes_exactly_those_steps(compiled_lms, hf_models):
    model, (hf, tok) = compiled_lms["gpt2"], hf_models["gpt2"]
    block = "transformer.h.1"

    def run(compile):
        with model.generate(
            PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False, compile=compile
        ) as tracer:
            logits = ic.list().save()
            with tracer.all():
                logits.append(model.lm_head.output[:, -1])
            with tracer.iter[1:3]:
                model.get(block).output[:] = 0
            out = model.generator.output.save()
        return out.value, logits.value

    ids, logits = run(True)
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0, stats["fallback_reasons"]
    assert stats["compiles"] == 3  # prefill; decode with the ablation (steps 1, 2); decode without it
    eager_ids, eager_logits = run(False)
    assert torch.equal(ids, eager_ids)
    for got, want in zip(logits, eager_logits):
        assert_close(got, want, atol=1e-4, rtol=1e-4)
    want_ids, want_logits = hf_generate(hf, tok, block, zero_steps={1, 2})
    assert torch.equal(ids, want_ids)
    plain_ids, plain_logits = hf_generate(hf, tok, block)
    changed = [not torch.allclose(a, b, atol=1e-4) for a, b in zip(logits, plain_logits)]
    assert changed[:3] == [False, True, True]  # step 0 untouched, steps 1 and 2 ablated


def test_step_index_in_the_model_falls_back_with_its_reason(compiled_lms, hf_models, steer):
    model, (hf, tok) = compiled_lms["gpt2"], hf_models["gpt2"]
    with model.generate(PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False) as tracer:
        with tracer.all() as step:
            model.transformer.h[0].output[:, -1] += steer * (step > -1)  # the step index reaches the model
        out = model.generator.output.save()
    stats = ic.compile_stats()
    assert stats["compiles"] == 0 and stats["fallbacks"] == 1
    assert "step index" in stats["fallback_reasons"][0]
    assert "step index" in tracer.explain(file=None)
    assert torch.equal(out.value, hf_generate(hf, tok, "transformer.h.0", steer=steer)[0])


def test_sites_outside_iteration_blocks_fall_back(compiled_lms, hf_models):
    model, (hf, tok) = compiled_lms["gpt2"], hf_models["gpt2"]
    with model.generate(PROMPT, max_new_tokens=2, min_new_tokens=2, do_sample=False):
        first = model.lm_head.output[:, -1].save()
        second = model.lm_head.next().output[:, -1].save()
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 1 and "outside `tracer.all()`" in stats["fallback_reasons"][0]
    want = hf_generate(hf, tok, "transformer.h.0")[1]
    assert_close(first.value, want[0])
    assert_close(second.value, want[1])


def test_a_growing_cache_falls_back(compiled_lms, hf_models, steer):
    model, (hf, tok) = compiled_lms["gpt2"], hf_models["gpt2"]
    with model.generate(
        PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False, cache_implementation="dynamic"
    ) as tracer:
        with tracer.all():
            model.transformer.h[0].output[:, -1] += steer
        out = model.generator.output.save()
    stats = ic.compile_stats()
    assert stats["compiles"] == 0 and "static KV cache" in stats["fallback_reasons"][0]
    assert torch.equal(out.value, hf_generate(hf, tok, "transformer.h.0", steer=steer)[0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cond_inside_every_step_compiles_once(arch, compiled_lms, steer):
    """`tracer.cond` on an activation inside `tracer.all()`: the steering applies at exactly the steps where the
    condition holds, the appends under it happen at those steps only, and the step programs compile once."""
    model, block = compiled_lms[arch], f"{BLOCKS[arch]}.1"

    def run(threshold, compile):
        with model.generate(
            PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False, compile=compile
        ) as tracer:
            taken = ic.list().save()
            with tracer.all():
                h = model.get(block).output
                with tracer.cond(h[:, -1].norm() > threshold) as c:
                    h[:, -1] += steer
                    taken.append(h[:, -1].sum())
                with c.else_():
                    taken.append(torch.zeros(()))
            out = model.generator.output.save()
        return out.value, taken.value

    with model.generate(PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False, compile=False) as tracer:
        norms = ic.list().save()
        with tracer.all():
            norms.append(model.get(block).output[:, -1].norm())
    middle = float(torch.stack(norms.value).median())  # the condition holds at some steps only
    for threshold in (-1.0, 1e9, middle):
        eager_ids, eager_taken = run(threshold, False)
        ids, taken = run(threshold, True)
        assert torch.equal(ids, eager_ids)
        assert len(taken) == len(eager_taken) == N
        for got, want in zip(taken, eager_taken):
            assert_close(got, want)
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0, stats["fallback_reasons"]
    assert stats["compiles"] == 2 and stats["recompiles"] == 0, stats


def test_log_inside_every_step_compiles(compiled_lms, capsys):
    """`tracer.log` in `tracer.all()` prints each step's values after that step's compiled forward."""
    model, block = compiled_lms["gpt2"], f"{BLOCKS['gpt2']}.0"
    printed = []
    for compile in (False, True):
        with model.generate(PROMPT, max_new_tokens=3, do_sample=False, compile=compile) as tracer:
            with tracer.all():
                tracer.log("norm", model.get(block).output[:, -1].norm())
        printed.append(capsys.readouterr().out)
    assert printed[0].count("norm") == printed[1].count("norm") == 3
    numbers = [[float(v) for v in re.findall(r"tensor\(([-\d.e]+)\)", out)] for out in printed]
    assert len(numbers[0]) == 3
    assert_close(torch.tensor(numbers[1]), torch.tensor(numbers[0]), rtol=1e-4, atol=1e-4)
    stats = ic.compile_stats()
    assert stats["fallbacks"] == 0, stats["fallback_reasons"]
