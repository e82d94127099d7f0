"""Sessions, ``session.iter`` loops and training inside a session, each against plain PyTorch.

Every result is compared with the same computation written with plain PyTorch (forward hooks, a Python loop,
the same optimizer and seed). The walkthrough's session, iterator and LoRA examples run here with the import
changed (``import intervene_compiler as nnsight``) and ``remote=True`` dropped.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

import intervene_compiler as nnsight
from intervene_compiler import NNsight
from intervene_compiler.errors import InterventionError, TracingError, ValueNotReadyError
from intervene_compiler.ir import Op, dumps, format_graph, loads
from intervene_compiler.ir.nodes import walk_nodes
from intervene_compiler.testing import assert_clean, tiny_gpt2, tiny_mlp


def _count_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    calls = [0]

    def hook(m, args, out):
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


# -- sessions ---------------------------------------------------------------------------------------------------
def test_traces_run_in_order_when_the_session_exits(net):
    model = NNsight(net)
    x1, x2 = torch.randn(2, 5), torch.randn(3, 5)
    calls, handle = _count_calls(net.layer2)
    try:
        with model.session():
            with model.trace(x1):
                h = model.layer1.output  # no .save(): the next trace reads it inside the session
                out1 = model.output.save()
            with model.trace(x2):
                model.layer1.output[:, :] = h.mean(0) * 2
                out2 = model.output.save()
            assert calls[0] == 0  # nothing ran yet
            with pytest.raises(ValueNotReadyError):
                _ = out1.value
        assert calls[0] == 2
    finally:
        handle.remove()
    with torch.no_grad():
        ref1 = net(x1)
        ref2 = net.layer2((net.layer1(x1).mean(0) * 2).expand(3, -1))
    assert_close(out1.value, ref1)
    assert_close(out2.value, ref2)
    with pytest.raises(ValueNotReadyError, match="not saved"):
        _ = h.value
    assert_clean(net)


def test_session_log_and_exit(net, capsys):
    model = NNsight(net)
    x = torch.randn(1, 5)
    calls, handle = _count_calls(net)
    try:
        with model.session() as session:
            with model.trace(x):
                first = model.output.save()
            session.log("-- Early Stop --")
            session.exit()
            with model.trace(x):
                second = model.output.save()
            session.log("never printed")
    finally:
        handle.remove()
    assert calls[0] == 1
    assert capsys.readouterr().out == "-- Early Stop --\n"
    assert_close(first.value, net(x))
    with pytest.raises(ValueNotReadyError, match="exited"):
        _ = second.value


def test_session_holds_two_models_and_swaps_activations():
    a_mod, b_mod = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    a, b = NNsight(a_mod), NNsight(b_mod)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with a.session():
        with a.trace(ids):
            hidden = a.transformer.h[0].output  # transformers 5: a block returns the hidden states
        with b.trace(ids):
            b.transformer.h[0].output[:] = hidden
            logits = b.lm_head.output.save()
    store = {}
    h1 = a_mod.transformer.h[0].register_forward_hook(lambda m, args, out: store.update(h=out))
    h2 = b_mod.transformer.h[0].register_forward_hook(lambda m, args, out: store["h"])
    try:
        with torch.no_grad():
            a_mod(ids)
            ref = b_mod(ids).logits
    finally:
        h1.remove()
        h2.remove()
    assert_close(logits.value, ref)
    assert_clean(a_mod)
    assert_clean(b_mod)


def test_error_in_a_trace_names_the_trace_and_leaves_every_model_clean(net):
    model, other_net = NNsight(net), tiny_mlp(seed=1)
    other = NNsight(other_net)
    x = torch.randn(1, 5)
    with pytest.raises(InterventionError) as info:
        with model.session():
            with model.trace(x):
                h = model.layer1.output
            with other.trace(x):
                other.layer1.output[:] = h[:, :99] @ torch.ones(3, 3)  # shape mismatch at run time
    err = info.value
    assert err.loc is not None and "h[:, :99] @ torch.ones(3, 3)" in err.loc.text
    assert any("in the session's trace opened at" in note for note in getattr(err, "__notes__", []))
    assert_clean(net)
    assert_clean(other_net)
    with model.trace(x):  # the next trace works
        out = model.output.save()
    assert_close(out.value, net(x))


def test_session_values_are_not_ready_inside_and_remote_is_refused(net):
    model = NNsight(net)
    with pytest.raises(TracingError, match="remote execution needs a model the service hosts"):
        model.session(remote=True)  # a wrapped module has no name a service could host
    with pytest.raises(TracingError, match="inside another session"):
        with model.session():
            with model.session():
                pass
    with model.trace(torch.randn(1, 5)):  # nothing left open
        model.output.save()


def test_walkthrough_session_example(llama_lm, lm_dirs):
    """The walkthrough's first session: a later layer's last-token state from one prompt patched into another
    prompt's earlier layer, with no `.save()` in between (transformers 5 decoder layers return the hidden states
    as a tensor, so ``output`` replaces the walkthrough's ``output[0]``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = llama_lm
    with llama.session():
        with llama.trace("The Eiffel Tower is in the city of"):
            hs = llama.model.layers[1].output[:, -1, :]  # no .save()
            t1_tokens_out = llama.lm_head.output.argmax(dim=-1).save()
        with llama.trace("Buckingham Palace is in the city of"):
            llama.model.layers[0].output[:, -1, :] = hs[:]
            t2_tokens_out = llama.lm_head.output.argmax(dim=-1).save()
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["llama"])
    tok = AutoTokenizer.from_pretrained(lm_dirs["llama"])
    store = {}
    h1 = hf.model.layers[1].register_forward_hook(lambda m, a, out: store.update(hs=out[:, -1].clone()))
    with torch.no_grad():
        ref1 = hf(**tok("The Eiffel Tower is in the city of", return_tensors="pt")).logits.argmax(-1)
    h1.remove()

    def patch(m, a, out):
        out = out.clone()
        out[:, -1] = store["hs"]
        return out

    h2 = hf.model.layers[0].register_forward_hook(patch)
    with torch.no_grad():
        ref2 = hf(**tok("Buckingham Palace is in the city of", return_tensors="pt")).logits.argmax(-1)
    h2.remove()
    assert torch.equal(t1_tokens_out.value, ref1)
    assert torch.equal(t2_tokens_out.value, ref2)


def test_torch_subclasses_of_parameter_import_while_a_session_records(net):
    """Lazy torch imports that subclass Parameter or an optimizer still work while a session records, and a
    shape read in a trace whose input is a session value says when shapes are known."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch, intervene_compiler as ic
        from intervene_compiler.testing import tiny_mlp
        model = ic.NNsight(tiny_mlp())
        with model.session():
            import torch.distributed.fsdp  # defines FlatParameter(nn.Parameter, metaclass=...)
            class MyOpt(torch.optim.SGD):
                pass
            p = torch.nn.Parameter(torch.zeros(2)).save()
        assert isinstance(p.value, torch.nn.Parameter)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    model = NNsight(net)
    with pytest.raises(TracingError, match="session value"):
        with model.session() as session:
            with session.iter([torch.randn(1, 5)]) as x:
                with model.trace(x):
                    _ = model.layer1.output.shape
    with model.trace(torch.randn(1, 5)):
        model.output.save()
    assert_clean(net)


# -- session.iter -----------------------------------------------------------------------------------------------
def test_iter_body_is_one_graph_run_once_per_item(net):
    model = NNsight(net)
    xs = [torch.randn(1, 5) for _ in range(4)]
    calls, handle = _count_calls(net.layer1)
    try:
        with model.session() as session:
            outs = nnsight.list().save()
            with session.iter(xs) as x:
                with model.trace(x):
                    outs.append(model.layer1.output * 2)
    finally:
        handle.remove()
    assert calls[0] == 4
    loops = [n for n in session.graph.nodes if n.op is Op.LOOP]
    assert len(loops) == 1
    assert sum(n.op is Op.TRACE for n in walk_nodes(session.graph.nodes)) == 1
    with torch.no_grad():
        for got, x in zip(outs.value, xs, strict=True):
            assert_close(got, net.layer1(x) * 2)


def test_iter_over_tensor_dataloader_and_dict(net):
    model = NNsight(net)
    data = torch.randn(6, 5)
    with model.session() as session:
        by_row = nnsight.dict().save()
        with session.iter(torch.arange(3)) as i:
            by_row[i] = i * 10
        sums = nnsight.list().save()
        with session.iter(DataLoader(data, batch_size=2)) as batch:
            with model.trace(batch):
                sums.append(model.output.sum())
    assert {int(k): int(v) for k, v in by_row.value.items()} == {0: 0, 1: 10, 2: 20}
    with torch.no_grad():
        want = [net(data[i : i + 2]).sum() for i in (0, 2, 4)]
    assert_close(torch.stack(sums.value), torch.stack(want))


def test_walkthrough_nested_iterators_over_traced_lists():
    model = NNsight(tiny_mlp())
    with model.session() as session:
        li = nnsight.list()
        [li.append([num]) for num in range(0, 3)]
        li2 = nnsight.list().save()
        with session.iter(li) as item:
            with session.iter(item) as item_2:
                li2.append(item_2)
    assert li2.value == [0, 1, 2]


def test_walkthrough_iterator_exit_under_cond(capsys):
    model = NNsight(tiny_mlp())
    with model.session() as session:
        seen = nnsight.list().save()
        with session.iter([0, 1, 2, 3], return_context=True) as (item, iterator):
            iterator.log(item)
            with iterator.cond(item == 2):
                iterator.exit()
            seen.append(item)
    assert capsys.readouterr().out == "0\n1\n2\n"
    assert seen.value == [0, 1]


def test_value_from_one_iteration_feeds_a_trace_in_the_next(net):
    """A running state updated every iteration: the plain-PyTorch loop does the same."""
    model = NNsight(net)
    xs = torch.randn(3, 1, 5)
    with model.session() as session:
        acc = nnsight.list().save()
        with session.iter(xs) as x:
            with model.trace(x):
                acc.append(model.layer1.output.sum())
    with torch.no_grad():
        want = [net.layer1(x).sum() for x in xs]
    assert_close(torch.stack(acc.value), torch.stack(want))


def test_session_graph_serializes():
    model = NNsight(tiny_mlp())
    x = torch.randn(1, 5)
    with model.session() as session:
        with model.trace(x):
            h = model.layer1.output
        with session.iter([1, 2]) as k:
            with model.trace(x):
                model.layer1.output[:] = h * k
                model.output.save()
    graph = session.graph
    back = loads(dumps(graph))
    assert format_graph(back) == format_graph(graph)
    assert "trace model0" in format_graph(graph) and "loop over" in format_graph(graph)


# -- training in a session: the walkthrough's LoRA ---------------------------------------------------------------
class LORA(torch.nn.Module):
    """The walkthrough's LoRA, as written there (the graph era's ``.save()`` on a new Parameter included)."""

    def __init__(self, module, dim: int, r: int) -> None:
        super().__init__()
        self.r = r
        self.module = module
        self.WA = torch.nn.Parameter(torch.randn(dim, self.r), requires_grad=True).save()
        self.WB = torch.nn.Parameter(torch.zeros(self.r, dim), requires_grad=True).save()

    def __call__(self, alpha: float = 1.0):
        A_x = torch.matmul(self.module.input[0][0], self.WA)
        BA_x = torch.matmul(A_x, self.WB)
        h = BA_x + self.module.output
        self.module.output = h * alpha

    def parameters(self):
        return [self.WA, self.WB]


def _plain_lora_training(hf, tok, dataset, dim, r, lr, steps_seed):
    """The same training with plain PyTorch: a forward hook on the last MLP, AdamW, the same seed."""
    torch.manual_seed(steps_seed)
    WA = torch.nn.Parameter(torch.randn(dim, r))
    WB = torch.nn.Parameter(torch.zeros(r, dim))
    optimizer = torch.optim.AdamW([WA, WB], lr=lr)
    mlp = hf.model.layers[-1].mlp

    def hook(m, args, out):
        return (torch.matmul(torch.matmul(args[0][0][0], WA), WB) + out) * 1.0

    handle = mlp.register_forward_hook(hook)
    try:
        for prompts, answers in DataLoader(dataset, batch_size=2):
            enc = tok(list(prompts), return_tensors="pt", padding=True)
            logits = hf(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits[:, -1], answers)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        handle.remove()
    return WA.detach(), WB.detach()


@pytest.fixture(scope="module")
def llama_lm(lm_dirs):
    return nnsight.LanguageModel(lm_dirs["llama"])


def test_walkthrough_lora_training_in_a_session(llama_lm, lm_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = llama_lm
    answer_token = llama.tokenizer.encode(" Paris")[1]
    module = llama.model.layers[-1].mlp
    with llama.scan(" "):
        dim = module.output.shape[-1]
    torch.manual_seed(0)
    with llama.session() as session:
        dataset = [["_", answer_token]] * 6
        dataloader = DataLoader(dataset, batch_size=2)
        lora = LORA(module, dim, 4)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=0.5)
        with session.iter(dataloader, return_context=True) as (batch, iterator):
            prompt = batch[0]
            with llama.trace(prompt):
                lora()
                logits = llama.lm_head.output
                loss = torch.nn.functional.cross_entropy(logits[:, -1], batch[1])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert "_parameter_new" not in repr(torch.nn.Parameter.__new__)  # the recording constructor is gone
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["llama"])
    tok = AutoTokenizer.from_pretrained(lm_dirs["llama"])
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    WA, WB = _plain_lora_training(hf, tok, [["_", answer_token]] * 6, dim, 4, 0.5, 0)
    assert_close(lora.WA.value.detach(), WA, rtol=1e-4, atol=1e-5)
    assert_close(lora.WB.value.detach(), WB, rtol=1e-4, atol=1e-5)
    assert WB.abs().sum() > 0  # it trained

    # the trained LoRA is usable afterwards, in generate: it changes the prediction as plain hooks say
    with llama.generate("Hello", max_new_tokens=3):
        plain = llama.generator.output.save()
    with llama.generate("Hello", max_new_tokens=3) as tracer:
        with tracer.all():  # every generated token, as the hook below
            lora()
        steered = llama.generator.output.save()
    handle = hf.model.layers[-1].mlp.register_forward_hook(
        lambda m, args, out: torch.matmul(torch.matmul(args[0][0][0], WA), WB) + out
    )
    try:
        enc = tok("Hello", return_tensors="pt")
        ref = hf.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert torch.equal(steered.value, ref)
    assert not torch.equal(steered.value, plain.value)


@pytest.mark.compiled
def test_steering_training_in_a_session_eager_and_compiled(lm_dirs):
    """The same session trains a steering vector eagerly and compiled; both match a plain-PyTorch loop, and the
    compiled trace inside the loop compiles once for every step (and once across two sessions)."""
    lm = nnsight.LanguageModel(lm_dirs["gpt2"])
    data = [["The Eiffel Tower is in", 7], ["Hello world", 11]] * 2

    def session_run(compile: bool):
        torch.manual_seed(0)
        with lm.session() as session:
            vec = torch.nn.Parameter(torch.randn(64) * 0.1).save()
            opt = torch.optim.Adam([vec], lr=0.05)
            losses = nnsight.list().save()
            with session.iter(DataLoader(data, batch_size=2)) as batch:
                with lm.trace(batch[0], compile=compile):
                    lm.transformer.h[0].output = lm.transformer.h[0].output + vec
                    loss = torch.nn.functional.cross_entropy(lm.lm_head.output[:, -1], batch[1])
                    loss.backward()
                    losses.append(loss.detach())
                opt.step()
                opt.zero_grad()
        return vec.value.detach(), torch.stack(losses.value)

    def plain_run():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(lm_dirs["gpt2"])
        tok = AutoTokenizer.from_pretrained(lm_dirs["gpt2"])
        tok.pad_token, tok.padding_side = tok.eos_token, "left"
        torch.manual_seed(0)
        vec = torch.nn.Parameter(torch.randn(64) * 0.1)
        opt = torch.optim.Adam([vec], lr=0.05)
        handle = hf.transformer.h[0].register_forward_hook(lambda m, a, out: out + vec)
        losses = []
        try:
            for prompts, answers in DataLoader(data, batch_size=2):
                enc = tok(list(prompts), return_tensors="pt", padding=True)
                pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                loss = torch.nn.functional.cross_entropy(hf(**enc, position_ids=pos).logits[:, -1], answers)
                loss.backward()
                losses.append(loss.detach())
                opt.step()
                opt.zero_grad()
        finally:
            handle.remove()
        return vec.detach(), torch.stack(losses)

    want_vec, want_losses = plain_run()
    eager_vec, eager_losses = session_run(False)
    assert_close(eager_vec, want_vec, rtol=1e-4, atol=1e-5)
    assert_close(eager_losses, want_losses, rtol=1e-4, atol=1e-5)
    nnsight.reset_compile_stats()
    comp_vec, comp_losses = session_run(True)
    assert_close(comp_vec, want_vec, rtol=1e-4, atol=1e-5)
    assert_close(comp_losses, want_losses, rtol=1e-4, atol=1e-5)
    session_run(True)
    stats = nnsight.compile_stats()
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["fallbacks"] == 0, stats
    assert stats["cache_hits"] == 3, stats


@pytest.mark.compiled
def test_lora_training_as_a_plain_loop_of_compiled_traces(llama_lm, lm_dirs):
    """The walkthrough's LoRA experiment as a Python loop of ``trace(batch, compile=True)`` steps with the
    optimizer outside the trace: it compiles once, reuses the program every step and trains like plain PyTorch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = llama_lm
    answer_token = llama.tokenizer.encode(" Paris")[1]
    module = llama.model.layers[-1].mlp
    dim, r = 64, 4
    dataset = [["_", answer_token]] * 6
    torch.manual_seed(0)
    WA = torch.nn.Parameter(torch.randn(dim, r))
    WB = torch.nn.Parameter(torch.zeros(r, dim))
    optimizer = torch.optim.AdamW([WA, WB], lr=0.5)
    nnsight.reset_compile_stats()
    for prompts, answers in DataLoader(dataset, batch_size=2):
        with llama.trace(list(prompts), compile=True):
            module.output = torch.matmul(torch.matmul(module.input[0][0], WA), WB) + module.output
            loss = torch.nn.functional.cross_entropy(llama.lm_head.output[:, -1], answers)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stats = nnsight.compile_stats()
    assert stats["compiles"] == 1 and stats["cache_hits"] == 2 and stats["fallbacks"] == 0, stats
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["llama"])
    tok = AutoTokenizer.from_pretrained(lm_dirs["llama"])
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    want_a, want_b = _plain_lora_training(hf, tok, dataset, dim, r, 0.5, 0)
    assert_close(WA.detach(), want_a, rtol=1e-4, atol=1e-5)
    assert_close(WB.detach(), want_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compiled)])
def test_lora_on_the_tiny_network_in_a_session(compile):
    """A LoRA on the walkthrough's network trained inside a session (Parameters, SGD and a DataLoader created in
    the session), eager and compiled, equals the same loop in plain PyTorch with a hook."""
    net = tiny_mlp()
    model = NNsight(net)
    xs, ys = torch.rand(8, 5, generator=torch.Generator().manual_seed(0)), torch.rand(8, 2)
    data = list(zip(xs, ys))
    nnsight.reset_compile_stats()
    torch.manual_seed(0)
    with model.session() as session:
        a = torch.nn.Parameter(torch.randn(5, 2) * 0.1).save()
        b = torch.nn.Parameter(torch.zeros(2, 10)).save()
        opt = torch.optim.SGD([a, b], lr=0.5)
        with session.iter(DataLoader(data, batch_size=2)) as batch:
            with model.trace(batch[0], compile=compile):
                model.layer1.output = model.layer1.output + model.layer1.input @ a @ b
                loss = ((model.output - batch[1]) ** 2).mean()
                loss.backward()
            opt.step()
            opt.zero_grad()
    torch.manual_seed(0)
    pa = torch.nn.Parameter(torch.randn(5, 2) * 0.1)
    pb = torch.nn.Parameter(torch.zeros(2, 10))
    popt = torch.optim.SGD([pa, pb], lr=0.5)
    handle = net.layer1.register_forward_hook(lambda m, args, out: out + args[0] @ pa @ pb)
    try:
        for x, y in DataLoader(data, batch_size=2):
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            popt.step()
            popt.zero_grad()
    finally:
        handle.remove()
    assert_close(a.value.detach(), pa.detach())
    assert_close(b.value.detach(), pb.detach())
    assert pb.abs().sum() > 0
    if compile:
        stats = nnsight.compile_stats()
        assert stats["compiles"] == 1 and stats["cache_hits"] == 3 and stats["fallbacks"] == 0, stats


def test_a_backward_block_at_session_level_behaves_like_a_backward_call(net):
    """``with loss.backward():`` on a session value records the backward in program order (nothing to hook at
    session level); reading ``.grad`` there is the same clear error as after a plain ``loss.backward()``."""
    model = NNsight(net)
    x = torch.rand(2, 5)
    for block in (True, False):
        with pytest.raises(InterventionError, match="can only be used inside a trace"):
            with model.session():
                w = torch.nn.Parameter(torch.ones(2))
                with model.trace(x):
                    out = model.output * w
                loss = out.sum()
                if block:
                    with loss.backward():
                        w.grad.save()
                else:
                    loss.backward()
                    w.grad.save()
    assert_clean(net)
