"""Generation: ``model.generate``, ``.next()``, ``tracer.all()``, ``tracer.iter[...]``, against ``generate`` + hooks.

Greedy decoding on tiny GPT-2 and Llama checkpoints loaded with ``from_pretrained``; every result is compared
with plain ``transformers`` ``generate`` plus forward hooks (token for token, and per-step logits with
``assert_close``).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import intervene_compiler as ic
from intervene_compiler.errors import MissedSiteError, TracingError
from intervene_compiler.ir import Graph, Node, Op, format_graph, from_data, to_data, verify
from intervene_compiler.testing import assert_clean, generate_with_hooks, steered_generate

ARCHS = ("gpt2", "llama")
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Hello"
N = 4  # new tokens (also the minimum: an early EOS would end generation before the steps a test selects)


@pytest.fixture(scope="module")
def lms(lm_dirs):
    return {arch: ic.LanguageModel(path) for arch, path in lm_dirs.items()}


def hf_generate(hf, tok, text, n=N, **edits):
    return generate_with_hooks(hf, tok, text, n, **edits)


# -- generate, generator.output, next() --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_generator_output_and_next(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    with model.generate(PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False) as tracer:
        out = model.generator.output.save()  # before tracer.next(), which moves every module (generator too)
        first = model.lm_head.output[:, -1].save()
        second = model.lm_head.next().output[:, -1].save()
        tracer.next()
        third = model.lm_head.output[:, -1].save()
    ids, logits, _ = hf_generate(hf, tok, PROMPT, n=3)
    assert torch.equal(out.value, ids)
    for got, want in zip((first, second, third), logits):
        assert_close(got.value, want)
    assert model.tokenizer.decode(out.value[0], skip_special_tokens=True).startswith(PROMPT)
    assert_clean(model._module)


def test_generate_on_a_meta_model_loads_it(lm_dirs, hf_models):
    hf, tok = hf_models["gpt2"]
    model = ic.LanguageModel(lm_dirs["gpt2"])
    with model.generate(PROMPT, max_new_tokens=2, min_new_tokens=2, do_sample=False):
        out = model.generator.output.save()
    assert model.dispatched
    assert torch.equal(out.value, hf_generate(hf, tok, PROMPT, n=2)[0])


# -- tracer.all() / tracer.iter[...] ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_steering_every_step_matches_hooks(arch, lms, hf_models, steer):
    model, (hf, tok) = lms[arch], hf_models[arch]
    block = f"{BLOCKS[arch]}.0"
    out, hidden, logits = steered_generate(model, PROMPT, N, steer, block)
    ids, want_logits, want_hidden = hf_generate(hf, tok, PROMPT, steer=steer, block=block)
    assert torch.equal(out, ids)
    assert not torch.equal(ids, hf_generate(hf, tok, PROMPT)[0])  # the steering changes the text
    assert len(hidden) == len(logits) == N
    for got, want in zip(logits, want_logits):
        assert_close(got, want)
    for got, want in zip(hidden, want_hidden):
        assert_close(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_cond_inside_every_step_matches_hooks(arch, lms, hf_models, steer):
    """`tracer.cond` on the step's activation inside `tracer.all()`: steered at exactly the steps where it holds,
    as a plain hook that tests the same condition."""
    model, (hf, tok) = lms[arch], hf_models[arch]
    block = f"{BLOCKS[arch]}.1"

    def reference(threshold):
        norms = []  # the block's last position before the edit, per step

        def holds(output):
            norms.append(float(output[:, -1].norm()))
            return norms[-1] > threshold

        ids, _, hidden = hf_generate(hf, tok, PROMPT, steer=steer, block=block, steer_if=holds)
        return ids, hidden, [n > threshold for n in norms], norms

    # a threshold at which the condition holds at some steps only: between two norms seen when steering at every
    # step or at none (steering moves later steps' norms)
    seen = sorted(reference(float("-inf"))[3] + reference(float("inf"))[3])
    candidates = [(a + b) / 2 for a, b in zip(seen, seen[1:])]
    threshold, (ids, want_hidden, _, _) = next(
        (t, got) for t in candidates if len(set((got := reference(t))[2])) == 2
    )
    with model.generate(PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False) as tracer:
        hidden = ic.list().save()
        with tracer.all():
            h = model.get(block).output
            with tracer.cond(h[:, -1].norm() > threshold):
                h[:, -1] += steer
            hidden.append(h[:, -1])
        out = model.generator.output.save()
    assert torch.equal(out.value, ids)
    assert len(hidden.value) == N
    for got, want in zip(hidden.value, want_hidden):
        assert_close(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_iter_slice_changes_exactly_those_steps(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    block = f"{BLOCKS[arch]}.1"
    with model.generate(PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False) as tracer:
        logits = ic.list().save()
        with tracer.all():
            logits.append(model.lm_head.output[:, -1])
        with tracer.iter[1:3]:
            model.get(block).output[:] = 0
        out = model.generator.output.save()
    ids, want, _ = hf_generate(hf, tok, PROMPT, block=block, ablate_steps={1, 2})
    plain_ids, plain, _ = hf_generate(hf, tok, PROMPT)
    assert torch.equal(out.value, ids)
    for got, expected in zip(logits.value, want):
        assert_close(got, expected)
    assert_close(logits[0], plain[0])  # step 0 untouched
    assert not torch.allclose(logits[1], plain[1])  # step 1 ablated


@pytest.mark.parametrize("arch", ARCHS)
def test_iter_forms_and_step_values(arch, lms, hf_models, steer):
    model, (hf, tok) = lms[arch], hf_models[arch]
    block = f"{BLOCKS[arch]}.0"
    with model.generate(PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False) as tracer:
        steps = ic.list().save()
        for step in tracer.iter[1:4:2]:
            steps.append(step)
        with tracer.iter[[0, 2]] as step:
            model.get(block).output[:, -1] += steer
            steps.append(step * 10)
        with tracer.iter[3]:
            last = model.lm_head.output[:, -1].save()
        out = model.generator.output.save()
    assert sorted(steps.value) == [0, 1, 3, 20]
    ids, logits, _ = hf_generate(hf, tok, PROMPT, steer=steer, steer_at={0, 2}, block=block)
    assert torch.equal(out.value, ids)
    assert_close(last.value, logits[3])


@pytest.mark.parametrize("arch", ARCHS)
def test_multiple_invokes_generate(arch, lms, hf_models, steer):
    model, (hf, tok) = lms[arch], hf_models[arch]
    block = f"{BLOCKS[arch]}.0"
    with model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False) as tracer:
        with tracer.invoke(PROMPT):
            with tracer.all():
                model.get(block).output[:, -1] += steer
            steered = model.generator.output.save()
        with tracer.invoke(OTHER):  # shorter: left-padded
            hidden = ic.list().save()
            with tracer.iter[1:3]:
                hidden.append(model.get(block).output[:, -1])
            plain = model.generator.output.save()
    want_steered, _, _ = hf_generate(hf, tok, PROMPT, steer=steer, block=block)
    want_plain, _, want_hidden = hf_generate(hf, tok, OTHER, block=block)
    assert torch.equal(steered.value, want_steered)
    assert torch.equal(plain.value[:, -want_plain.shape[1] :], want_plain)
    assert len(hidden) == 2
    for got, want in zip(hidden.value, want_hidden[1:3]):
        assert_close(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_cross_prompt_embeddings_in_generate(arch, lms, hf_models):
    model, (hf, tok) = lms[arch], hf_models[arch]
    embed = model.get({"gpt2": "transformer.wte", "llama": "model.embed_tokens"}[arch])
    source = "Madison Square Garden is located in the city of New"
    target = "_" + " _" * (len(tok(source, add_special_tokens=False)["input_ids"]) - 1)
    assert len(tok(source)["input_ids"]) == len(tok(target)["input_ids"])
    with model.generate(max_new_tokens=3, min_new_tokens=3, do_sample=False) as tracer:
        with tracer.invoke(source):
            embeddings = embed.output
            first = model.generator.output.save()
        with tracer.invoke(target):
            embed.output = embeddings
            second = model.generator.output.save()
    assert torch.equal(first.value, hf_generate(hf, tok, source, n=3)[0])
    assert torch.equal(second.value[:, -3:], first.value[:, -3:])  # the target continues the source


def test_all_in_a_plain_trace_runs_once(lms):
    model = lms["gpt2"]
    with model.trace(PROMPT) as tracer:
        seen = ic.list().save()
        with tracer.all():
            seen.append(model.lm_head.output)
    assert len(seen) == 1


def test_outer_value_read_only_inside_a_block_is_kept(lms, hf_models):
    model, (hf, tok) = lms["gpt2"], hf_models["gpt2"]
    with model.generate(PROMPT, max_new_tokens=N, min_new_tokens=N, do_sample=False) as tracer:
        push = ic.apply(torch.full, (64,), 4.0)  # a graph value that only the block reads
        with tracer.all():
            model.transformer.h[0].output[:, -1] += push
        out = model.generator.output.save()
    steer = torch.full((64,), 4.0)
    assert torch.equal(out.value, hf_generate(hf, tok, PROMPT, steer=steer, block="transformer.h.0")[0])


def test_generation_stops_after_the_last_step_it_needs(lms):
    model = lms["gpt2"].dispatch()
    calls = []
    handle = model._module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with model.generate(PROMPT, max_new_tokens=8, min_new_tokens=8, do_sample=False) as tracer:
            with tracer.iter[1]:
                logits = model.lm_head.output.save()
    finally:
        handle.remove()
    assert len(calls) == 2  # early-stop truncation: steps 2..7 never run
    assert logits.shape[1] == 1


# -- mistakes --------------------------------------------------------------------------------------------------
def test_iter_beyond_the_last_step(lms):
    model = lms["gpt2"]
    with pytest.raises(MissedSiteError, match=r"tracer.iter\[\[5\]\] asks for step 5, but the model ran 2"):
        with model.generate(PROMPT, max_new_tokens=2, min_new_tokens=2, do_sample=False) as tracer:
            with tracer.iter[5]:
                model.transformer.h[0].output[:] = 0
    assert_clean(model._module)


def test_iter_misuse(lms):
    model = lms["gpt2"]
    with pytest.raises(TracingError, match="non-negative"):
        with model.generate(PROMPT, max_new_tokens=2) as tracer:
            tracer.iter[-1]
    with pytest.raises(TracingError, match="nested"):
        with model.generate(PROMPT, max_new_tokens=2) as tracer:
            with tracer.all():
                with tracer.iter[1]:
                    pass
    with pytest.raises(TracingError, match="used outside it"):
        with model.generate(PROMPT, max_new_tokens=2) as tracer:
            with tracer.iter[1]:
                h = model.transformer.h[0].output
            h.save()
    with pytest.raises(MissedSiteError, match="step 0"):
        with model.generate(PROMPT, max_new_tokens=2) as tracer:
            with tracer.all():
                model.generator.output.save()  # runs after the steps, never inside one
    assert_clean(model._module)


# -- the ITER node in the IR -----------------------------------------------------------------------------------
def test_iter_ir_prints_verifies_and_round_trips(lms, steer):
    model = lms["gpt2"]
    with model.generate(PROMPT, max_new_tokens=3) as tracer:
        kept = ic.list().save()
        with tracer.iter[1:3]:
            model.transformer.h[0].output[:, -1] += steer
            kept.append(model.lm_head.output)
    graph = tracer.graph
    text = format_graph(graph)
    assert "iter 1:3" in text and "graph iter:" in text and "model.transformer.h.0.step.output" in text
    data, tensors = to_data(graph)
    again = from_data(data, tensors)
    assert format_graph(again) == text
    assert torch.equal(again.params[0], steer)
    (node,) = [n for n in graph.nodes if n.op is Op.ITER]
    bad = Node(node.id, Op.ITER, (-1,), body=node.body)
    with pytest.raises(Exception, match="step selection"):
        verify(Graph(nodes=(bad,), params=graph.params))
    clash = Node(node.body[0].nodes[0].id, Op.STOP, "truncate")  # an outer id that a body node already has
    with pytest.raises(Exception, match="unique across nested graphs"):
        verify(Graph(nodes=tuple(n for n in graph.nodes if n.id <= node.id) + (clash,), params=graph.params))
    assert len(kept) == 2
