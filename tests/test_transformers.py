"""Interventions on tiny GPT-2 and Llama models, each checked against the same computation done with hooks.

Every test runs an intervention through ``intervene_compiler`` and then does the same thing by hand on the same
``torch.nn.Module`` with plain ``register_forward_hook`` / ``register_forward_pre_hook`` / ``Tensor.register_hook``
and compares the numbers with ``torch.testing.assert_close``. Hooks registered for the comparison are removed
before the test ends (the ``gpt2`` / ``llama`` fixtures assert the model is clean afterwards).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.testing import assert_close

import intervene_compiler as ic

HIDDEN = 32
VOCAB = 128


@dataclass(frozen=True)
class Arch:
    blocks: str
    attn: str
    embed: str
    norm: str


ARCH = {
    "gpt2": Arch(blocks="transformer.h", attn="attn", embed="transformer.wte", norm="transformer.ln_f"),
    "llama": Arch(blocks="model.layers", attn="self_attn", embed="model.embed_tokens", norm="model.norm"),
}


class LM:
    """One wrapped model plus the paths of its parts, so a test reads the same for both architectures."""

    def __init__(self, name: str, model: ic.NNsight):
        self.name = name
        self.model = model
        self.module: torch.nn.Module = model._module
        self.arch = ARCH[name]

    # paths (for hooks on the plain module)
    def block_path(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}"

    def mlp_path(self, i: int) -> str:
        return f"{self.block_path(i)}.mlp"

    def attn_path(self, i: int) -> str:
        return f"{self.block_path(i)}.{self.arch.attn}"

    # envoys (for the traced side)
    def block(self, i: int, model: ic.NNsight | None = None):
        return (model or self.model).get(self.block_path(i))

    def mlp(self, i: int, model: ic.NNsight | None = None):
        return (model or self.model).get(self.mlp_path(i))

    def attn(self, i: int, model: ic.NNsight | None = None):
        return (model or self.model).get(self.attn_path(i))

    @property
    def embed(self):
        return self.model.get(self.arch.embed)

    @property
    def norm(self):
        return self.model.get(self.arch.norm)

    @property
    def n_layers(self) -> int:
        return len(self.model.get(self.arch.blocks))


@pytest.fixture(params=["gpt2", "llama"])
def lm(request):
    model = request.getfixturevalue(request.param)  # the fixture asserts no hooks are left after the test
    wrapped = LM(request.param, model)
    yield wrapped
    wrapped.module.zero_grad(set_to_none=True)  # backward passes accumulate into the shared module's params


@pytest.fixture
def ids_b():
    torch.manual_seed(3)
    return torch.randint(0, VOCAB, (1, 7))


@pytest.fixture
def vec():
    torch.manual_seed(4)
    return torch.randn(HIDDEN)


# -- plain-PyTorch reference ---------------------------------------------------------------------------------
@contextmanager
def registered(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference(module, *args, edit=None, save=(), save_inputs=(), **kwargs):
    """Run ``module`` with plain hooks: ``edit`` maps path -> fn(output) returning the new output; ``save``
    collects outputs (after the edits), ``save_inputs`` collects ``(args, kwargs)``. Returns (output, saved)."""
    saved: dict = {}
    handles = []
    with registered(handles):
        for path, fn in (edit or {}).items():
            handles.append(module.get_submodule(path).register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
        for path in save:
            handles.append(
                module.get_submodule(path).register_forward_hook(
                    lambda m, a, o, p=path: saved.__setitem__(p, o)
                )
            )
        for path in save_inputs:
            handles.append(
                module.get_submodule(path).register_forward_pre_hook(
                    lambda m, a, k, p=path: saved.__setitem__(("inputs", p), (a, k)), with_kwargs=True
                )
            )
        out = module(*args, **kwargs)
    return out, saved


@contextmanager
def count_calls(module, paths):
    """Count how often each module in ``paths`` starts running (forward pre-hooks), removed on exit."""
    counts = {p: 0 for p in paths}
    handles = []

    def make(p):
        def hook(m, a):
            counts[p] += 1

        return hook

    with registered(handles):
        for p in paths:
            handles.append(module.get_submodule(p).register_forward_pre_hook(make(p)))
        yield counts


def set_last(v):
    def fn(o):
        o = o.clone()
        o[:, -1, :] = v
        return o

    return fn


def assert_tree_close(actual, expected):
    """assert_close through tuples, lists, dicts and ModelOutputs; other leaves must have the same type."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), type(actual)
        assert_close(actual, expected)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_tree_close(a, e)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual.keys()) == list(expected.keys())
        for k in expected:
            assert_tree_close(actual[k], expected[k])
    else:
        assert type(actual) is type(expected)


def assert_differs(a, b):
    assert not torch.allclose(a, b), (
        "the intervention did not change anything, so the comparison proves nothing"
    )


# -- 1. saving -----------------------------------------------------------------------------------------------
def test_save_outputs_and_inputs(lm, ids):
    m = lm.model
    with m.trace(ids):
        inp1 = lm.block(1).input.save()
        inputs1 = lm.block(1).inputs.save()
        attn0 = lm.attn(0).output.save()
        attn0_hidden = lm.attn(0).output[0].save()
        mlp0 = lm.mlp(0).output.save()
        blk1 = lm.block(1).output.save()
        last = lm.block(1).output[:, -1].save()
        logits = m.lm_head.output.save()
        out = m.output.save()

    ref_out, ref = reference(
        lm.module,
        ids,
        save=[lm.attn_path(0), lm.mlp_path(0), lm.block_path(1), "lm_head"],
        save_inputs=[lm.block_path(1)],
    )
    ref_args, ref_kwargs = ref[("inputs", lm.block_path(1))]
    assert_close(inp1.value, ref_args[0])
    args, kwargs = inputs1.value
    assert_tree_close(tuple(args), tuple(ref_args))
    assert sorted(kwargs) == sorted(ref_kwargs)
    assert_tree_close(dict(kwargs), {k: ref_kwargs[k] for k in kwargs})
    assert isinstance(attn0.value, tuple)
    assert_tree_close(attn0.value, ref[lm.attn_path(0)])
    assert_close(attn0_hidden.value, ref[lm.attn_path(0)][0])
    assert_close(mlp0.value, ref[lm.mlp_path(0)])
    assert isinstance(blk1.value, torch.Tensor) and blk1.value.shape == (2, 7, HIDDEN)
    assert_close(blk1.value, ref[lm.block_path(1)])
    assert_close(last.value, ref[lm.block_path(1)][:, -1])
    assert_close(logits.value, ref["lm_head"])
    assert type(out.value) is type(ref_out)
    assert_close(out.value.logits, ref_out.logits)
    assert_close(out.value["logits"], logits.value)


def test_save_embeddings_and_final_norm(lm, ids):
    m = lm.model
    with m.trace(ids):
        emb = lm.embed.output.save()
        normed = lm.norm.output.save()
    _, ref = reference(lm.module, ids, save=[lm.arch.embed, lm.arch.norm])
    assert_close(emb.value, ref[lm.arch.embed])
    assert_close(normed.value, ref[lm.arch.norm])


# -- 2. setting ----------------------------------------------------------------------------------------------
def test_ablate_mlp_output(lm, ids):
    m = lm.model
    with m.trace(ids):
        lm.mlp(0).output = torch.zeros_like(lm.mlp(0).output)
        mlp0 = lm.mlp(0).output.save()
        logits = m.lm_head.output.save()
    ref_out, _ = reference(lm.module, ids, edit={lm.mlp_path(0): torch.zeros_like})
    clean, _ = reference(lm.module, ids)
    assert_close(mlp0.value, torch.zeros(2, 7, HIDDEN))
    assert_close(logits.value, ref_out.logits)
    assert_differs(logits.value, clean.logits)


def test_ablate_attention_output(lm, ids):
    m = lm.model
    with m.trace(ids):
        attn = lm.attn(1).output
        lm.attn(1).output = (torch.zeros_like(attn[0]), attn[1])
        logits = m.lm_head.output.save()
    ref_out, _ = reference(lm.module, ids, edit={lm.attn_path(1): lambda o: (torch.zeros_like(o[0]), o[1])})
    clean, _ = reference(lm.module, ids)
    assert_close(logits.value, ref_out.logits)
    assert_differs(logits.value, clean.logits)


def test_setitem_last_position(lm, ids, vec):
    m = lm.model
    with m.trace(ids):
        lm.block(1).output[:, -1, :] = vec
        logits = m.lm_head.output.save()
    ref_out, _ = reference(lm.module, ids, edit={lm.block_path(1): set_last(vec)})
    clean, _ = reference(lm.module, ids)
    assert_close(logits.value, ref_out.logits)
    assert_differs(logits.value, clean.logits)
    assert_close(logits.value[:, :-1], clean.logits[:, :-1])  # the edit is at the last position only


def test_setitem_then_read_same_site(lm, ids, vec):
    m = lm.model
    with m.trace(ids):
        lm.block(0).output[:, 2] = vec
        h0 = lm.block(0).output.save()
        logits = m.lm_head.output.save()

    def edit(o):
        o = o.clone()
        o[:, 2] = vec
        return o

    ref_out, ref = reference(lm.module, ids, edit={lm.block_path(0): edit}, save=[lm.block_path(0)])
    assert_close(h0.value, ref[lm.block_path(0)])
    assert_close(h0.value[:, 2], vec.expand(2, HIDDEN))
    assert_close(logits.value, ref_out.logits)


def test_inplace_add(lm, ids, vec):
    m = lm.model
    with m.trace(ids):
        lm.block(0).output[:, -1, :] += vec
        lm.mlp(1).output += 2 * vec
        logits = m.lm_head.output.save()

    def add_last(o):
        o = o.clone()
        o[:, -1, :] += vec
        return o

    ref_out, _ = reference(
        lm.module, ids, edit={lm.block_path(0): add_last, lm.mlp_path(1): lambda o: o + 2 * vec}
    )
    clean, _ = reference(lm.module, ids)
    assert_close(logits.value, ref_out.logits)
    assert_differs(logits.value, clean.logits)


def test_set_block_input(lm, ids, vec):
    m = lm.model
    with m.trace(ids):
        lm.block(1).input = lm.block(1).input + vec
        logits = m.lm_head.output.save()

    def add(mod, args):
        assert torch.is_tensor(args[0])  # both architectures pass the hidden states positionally
        return (args[0] + vec, *args[1:])

    handles = [lm.module.get_submodule(lm.block_path(1)).register_forward_pre_hook(add)]
    with registered(handles):
        ref_out = lm.module(ids)
    clean, _ = reference(lm.module, ids)
    assert_close(logits.value, ref_out.logits)
    assert_differs(logits.value, clean.logits)


# -- 3. invokes ----------------------------------------------------------------------------------------------
def test_invokes_see_and_edit_only_their_rows(lm, ids, ids_b, vec):
    m = lm.model
    with m.trace() as tracer:
        with tracer.invoke(ids):
            lm.block(0).output[:, -1, :] = vec
            h1_a = lm.block(1).output.save()
            logits_a = m.lm_head.output.save()
        with tracer.invoke(ids_b):
            lm.mlp(1).output = torch.zeros_like(lm.mlp(1).output)
            h1_b = lm.block(1).output.save()
            logits_b = m.lm_head.output.save()

    ref_a, saved_a = reference(
        lm.module, ids, edit={lm.block_path(0): set_last(vec)}, save=[lm.block_path(1)]
    )
    ref_b, saved_b = reference(
        lm.module, ids_b, edit={lm.mlp_path(1): torch.zeros_like}, save=[lm.block_path(1)]
    )
    assert logits_a.value.shape == (2, 7, VOCAB) and logits_b.value.shape == (1, 7, VOCAB)
    assert_close(h1_a.value, saved_a[lm.block_path(1)])
    assert_close(h1_b.value, saved_b[lm.block_path(1)])
    assert_close(logits_a.value, ref_a.logits)
    assert_close(logits_b.value, ref_b.logits)
    clean_b, _ = reference(lm.module, ids_b)
    assert_differs(logits_b.value, clean_b.logits)


def test_invokes_root_output_rows(lm, ids, ids_b):
    m = lm.model
    with m.trace() as tracer:
        with tracer.invoke(ids_b):
            out_b = m.output.save()
        with tracer.invoke(ids):
            out_a = m.output.logits.save()
    ref_a, _ = reference(lm.module, ids)
    ref_b, _ = reference(lm.module, ids_b)
    assert_close(out_b.value.logits, ref_b.logits)
    assert_close(out_a.value, ref_a.logits)


@pytest.mark.parametrize("barrier", [False, True])
def test_cross_invoke_embedding_patch(lm, ids, ids_b, barrier):
    m = lm.model
    src = ids[:1]
    with m.trace() as tracer:
        b = tracer.barrier(2) if barrier else None
        with tracer.invoke(src):
            emb = lm.embed.output
            logits_src = m.lm_head.output.save()
            if b is not None:
                b()
        with tracer.invoke(ids_b):
            if b is not None:
                b()
            lm.embed.output = emb
            logits_b = m.lm_head.output.save()

    _, saved = reference(lm.module, src, save=[lm.arch.embed])
    src_emb = saved[lm.arch.embed]
    ref_b, _ = reference(lm.module, ids_b, edit={lm.arch.embed: lambda o: src_emb.clone()})
    clean_src, _ = reference(lm.module, src)
    clean_b, _ = reference(lm.module, ids_b)
    assert_close(logits_b.value, ref_b.logits)
    assert_close(logits_src.value, clean_src.logits)
    # the embedding is the only input-dependent value, so the patched run is the source run
    assert_close(logits_b.value, clean_src.logits)
    assert_differs(logits_b.value, clean_b.logits)


@pytest.mark.parametrize("barrier", [False, True])
def test_cross_invoke_position_patch(lm, ids, ids_b, barrier):
    m = lm.model
    src, pos = ids[1:], 3
    with m.trace() as tracer:
        b = tracer.barrier(2) if barrier else None
        with tracer.invoke(src):
            hs = lm.block(0).output[:, pos, :]
            logits_src = m.lm_head.output.save()
            if b is not None:
                b()
        with tracer.invoke(ids_b):
            if b is not None:
                b()
            lm.block(0).output[:, pos, :] = hs
            logits_b = m.lm_head.output.save()

    _, saved = reference(lm.module, src, save=[lm.block_path(0)])
    hs_ref = saved[lm.block_path(0)][:, pos, :].detach().clone()

    def patch(o):
        o = o.clone()
        o[:, pos, :] = hs_ref
        return o

    ref_b, _ = reference(lm.module, ids_b, edit={lm.block_path(0): patch})
    clean_src, _ = reference(lm.module, src)
    clean_b, _ = reference(lm.module, ids_b)
    assert_close(logits_b.value, ref_b.logits)
    assert_close(logits_src.value, clean_src.logits)
    assert_differs(logits_b.value, clean_b.logits)
    assert_close(logits_b.value[:, :pos], clean_b.logits[:, :pos])  # causal: earlier positions untouched


# -- 4. gradients --------------------------------------------------------------------------------------------
def _loss(logits):
    return logits[:, -1].logsumexp(-1).sum()


@contextmanager
def frozen(module):
    """Grads off for every parameter (as in the walkthrough's tiny model), restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def test_gradients_era1_requires_grad(lm, ids):
    """The walkthrough's pattern on a model with grads off: set requires_grad, read/edit .grad, backward()."""
    m = lm.model
    with frozen(lm.module):
        with m.trace(ids):
            h0 = lm.block(0).output
            h0.requires_grad = True
            lm.mlp(1).output.grad = lm.mlp(1).output.grad * 2
            g_mlp1 = lm.mlp(1).output.grad.save()
            g0 = h0.grad.save()
            loss = _loss(m.lm_head.output)
            loss.backward()

        store = {}

        def leaf(mod, a, o):
            o.requires_grad_(True)
            store["h0"] = o

        def double(mod, a, o):
            o.register_hook(lambda g: g * 2)
            o.register_hook(lambda g: store.__setitem__("g_mlp1", g))  # sees the doubled gradient

        handles = [
            lm.module.get_submodule(lm.block_path(0)).register_forward_hook(leaf),
            lm.module.get_submodule(lm.mlp_path(1)).register_forward_hook(double),
        ]
        with registered(handles):
            _loss(lm.module(ids).logits).backward()
        ref_g0, ref_g_mlp1 = store["h0"].grad, store["g_mlp1"]

        store.clear()
        handles = [lm.module.get_submodule(lm.block_path(0)).register_forward_hook(leaf)]
        with registered(handles):
            _loss(lm.module(ids).logits).backward()
        plain_g0 = store["h0"].grad

    assert g0.value.shape == (2, 7, HIDDEN)
    assert_close(g0.value, ref_g0)
    assert_close(g_mlp1.value, ref_g_mlp1)
    assert_differs(g0.value, plain_g0)


def test_gradients_era1_grad_matches_retain_grad(lm, ids):
    m = lm.model
    with m.trace(ids):
        g0 = lm.block(0).output.grad.save()
        g_mlp1 = lm.mlp(1).output.grad.save()
        g_logits = m.lm_head.output.grad.save()
        loss = _loss(m.lm_head.output)
        loss.backward()
    lm.module.zero_grad(set_to_none=True)

    store = {}

    def keep(name):
        def hook(mod, a, o):
            o.retain_grad()
            store[name] = o

        return hook

    handles = [
        lm.module.get_submodule(p).register_forward_hook(keep(p))
        for p in (lm.block_path(0), lm.mlp_path(1), "lm_head")
    ]
    with registered(handles):
        _loss(lm.module(ids).logits).backward()
    assert_close(g0.value, store[lm.block_path(0)].grad)
    assert_close(g_mlp1.value, store[lm.mlp_path(1)].grad)
    assert_close(g_logits.value, store["lm_head"].grad)


def test_gradients_era2_backward_block(lm, ids):
    m = lm.model
    with m.trace(ids):
        h0 = lm.block(0).output
        mlp1 = lm.mlp(1).output
        loss = _loss(m.lm_head.output)
        with loss.backward():
            g_mlp1 = mlp1.grad.save()
            mlp1.grad = mlp1.grad * 0.5
            g0 = h0.grad.save()
    lm.module.zero_grad(set_to_none=True)

    store = {}

    def keep(mod, a, o):
        o.retain_grad()
        store["h0"] = o

    def mlp_hook(mod, a, o):
        o.register_hook(lambda g: store.__setitem__("g_mlp1", g))  # sees the gradient before the edit
        o.register_hook(lambda g: g * 0.5)

    handles = [
        lm.module.get_submodule(lm.block_path(0)).register_forward_hook(keep),
        lm.module.get_submodule(lm.mlp_path(1)).register_forward_hook(mlp_hook),
    ]
    with registered(handles):
        _loss(lm.module(ids).logits).backward()
    assert_close(g_mlp1.value, store["g_mlp1"])
    assert_close(g0.value, store["h0"].grad)


def _ref_block0_grad(lm, ids, scale_mlp1=None):
    store = {}

    def keep(mod, a, o):
        o.retain_grad()
        store["h0"] = o

    def scale(mod, a, o):
        o.register_hook(lambda g: g * scale_mlp1)

    handles = [lm.module.get_submodule(lm.block_path(0)).register_forward_hook(keep)]
    if scale_mlp1 is not None:
        handles.append(lm.module.get_submodule(lm.mlp_path(1)).register_forward_hook(scale))
    with registered(handles):
        _loss(lm.module(ids).logits).backward()
    lm.module.zero_grad(set_to_none=True)
    return store["h0"].grad


@pytest.mark.parametrize("era", [1, 2])
def test_gradients_per_invoke(lm, ids, ids_b, era):
    """Each invoke reads (and edits) the gradient of its own rows only."""
    m = lm.model
    with m.trace() as tracer:
        with tracer.invoke(ids):
            h0_a, mlp1_a = lm.block(0).output, lm.mlp(1).output
            if era == 1:
                mlp1_a.grad = mlp1_a.grad * 3
                g0_a = h0_a.grad.save()
            loss_a = _loss(m.lm_head.output)
        with tracer.invoke(ids_b):
            h0_b = lm.block(0).output
            if era == 1:
                g0_b = h0_b.grad.save()
            loss = loss_a + _loss(m.lm_head.output)
            if era == 1:
                loss.backward()
            else:
                with loss.backward():
                    g0_b = h0_b.grad.save()
                    mlp1_a.grad = mlp1_a.grad * 3
                    g0_a = h0_a.grad.save()
    lm.module.zero_grad(set_to_none=True)

    assert g0_a.value.shape == (2, 7, HIDDEN) and g0_b.value.shape == (1, 7, HIDDEN)
    assert_close(g0_a.value, _ref_block0_grad(lm, ids, scale_mlp1=3))
    assert_close(g0_b.value, _ref_block0_grad(lm, ids_b))
    assert_differs(g0_a.value, _ref_block0_grad(lm, ids))


# -- 5. logit lens -------------------------------------------------------------------------------------------
def test_logit_lens(lm, ids):
    m = lm.model
    with m.trace(ids):
        lens = [m.lm_head(lm.norm(lm.block(i).output)).save() for i in range(lm.n_layers)]
        probs0 = torch.softmax(m.lm_head(lm.norm(lm.block(0).output))[:, -1], dim=-1).save()
        normed = lm.norm.output.save()
        logits = m.lm_head.output.save()

    ref_out, ref = reference(
        lm.module, ids, save=[lm.block_path(i) for i in range(lm.n_layers)] + [lm.arch.norm]
    )
    norm = lm.module.get_submodule(lm.arch.norm)
    for i, got in enumerate(lens):
        assert_close(got.value, lm.module.lm_head(norm(ref[lm.block_path(i)])))
    assert_close(probs0.value, torch.softmax(lens[0].value[:, -1], dim=-1))
    # the ad hoc calls are not the model's own calls of lm_head / norm
    assert_close(normed.value, ref[lm.arch.norm])
    assert_close(logits.value, ref_out.logits)
    assert_close(lens[-1].value, ref_out.logits)
    assert_differs(lens[0].value, ref_out.logits)


# -- 6. cache and edits --------------------------------------------------------------------------------------
def test_cache_matches_hooks(lm, ids):
    m = lm.model
    with m.trace(ids) as tracer:
        cache = tracer.cache()

    outputs = {}
    handles = [
        mod.register_forward_hook(lambda mo, a, o, p=path: outputs.setdefault(p, o))
        for path, mod in lm.module.named_modules()
    ]
    with registered(handles):
        lm.module(ids)
    entries = cache.value
    assert set(entries) == {"model" + ("." + p if p else "") for p in outputs}
    for path, out in outputs.items():
        entry = entries["model" + ("." + path if path else "")]
        assert isinstance(entry, ic.CacheEntry)
        assert entry.inputs is None
        assert_tree_close(entry.output, out)


def test_cache_selected_modules_with_inputs(lm, ids, ids_b):
    m = lm.model
    with m.trace() as tracer:
        with tracer.invoke(ids):
            pass
        with tracer.invoke(ids_b):
            cache = tracer.cache(modules=[lm.block(0), m.lm_head], include_inputs=True)
    _, ref = reference(
        lm.module, ids_b, save=[lm.block_path(0), "lm_head"], save_inputs=[lm.block_path(0), "lm_head"]
    )
    entries = cache.value
    assert set(entries) == {"model." + lm.block_path(0), "model.lm_head"}
    for path in (lm.block_path(0), "lm_head"):
        entry = entries["model." + path]
        assert_close(entry.output, ref[path])
        assert_close(entry.input, ref[("inputs", path)][0][0])
    assert entries["model.lm_head"].output.shape == (1, 7, VOCAB)


def test_string_paths(lm, ids):
    """Dotted paths, with or without the ``model.`` root prefix (Llama also has a real ``model`` submodule)."""
    m = lm.model
    blocks = m.transformer.h if lm.name == "gpt2" else m.model.layers
    assert m.get(lm.block_path(0)) is blocks[0]
    assert m.get("model." + lm.block_path(1)) is blocks[1]
    with m.trace(ids) as tracer:
        cache = tracer.cache(modules=["model." + lm.block_path(0), lm.block_path(1)])
    _, ref = reference(lm.module, ids, save=[lm.block_path(0), lm.block_path(1)])
    assert set(cache.value) == {"model." + lm.block_path(0), "model." + lm.block_path(1)}
    for i in (0, 1):
        assert_close(cache.value["model." + lm.block_path(i)].output, ref[lm.block_path(i)])


def test_edit_copy_leaves_original(lm, ids, vec):
    m = lm.model
    with m.edit() as edited:
        lm.block(1).output[:, -1, :] = vec  # nnsight style: the original's envoys inside the edit block
    assert edited is not m
    with edited.trace(ids):
        h1 = lm.block(1, edited).output.save()
        logits_e = edited.lm_head.output.save()
    with m.trace(ids):
        logits_o = m.lm_head.output.save()

    ref_e, saved = reference(lm.module, ids, edit={lm.block_path(1): set_last(vec)}, save=[lm.block_path(1)])
    clean, _ = reference(lm.module, ids)
    assert_close(h1.value, saved[lm.block_path(1)])
    assert_close(logits_e.value, ref_e.logits)
    assert_close(logits_o.value, clean.logits)
    assert_close(edited.trace(ids, trace=False).logits, ref_e.logits)
    assert_close(m.trace(ids, trace=False).logits, clean.logits)


def test_edit_plus_trace_intervention(lm, ids, vec):
    m = lm.model
    with m.edit() as edited:
        lm.mlp(0, edited).output = torch.zeros_like(lm.mlp(0, edited).output)
    with edited.trace(ids):
        lm.block(1, edited).output[:, 0] = vec
        logits = edited.lm_head.output.save()

    def set_first(o):
        o = o.clone()
        o[:, 0] = vec
        return o

    ref, _ = reference(lm.module, ids, edit={lm.mlp_path(0): torch.zeros_like, lm.block_path(1): set_first})
    assert_close(logits.value, ref.logits)


def test_edit_inplace_and_clear(lm, ids):
    m = lm.model
    with m.edit(inplace=True) as edited:
        lm.mlp(0).output = torch.zeros_like(lm.mlp(0).output)
    assert edited is m
    with m.trace(ids):
        logits_edit = m.lm_head.output.save()
    m.clear_edits()
    with m.trace(ids):
        logits_clear = m.lm_head.output.save()

    ref, _ = reference(lm.module, ids, edit={lm.mlp_path(0): torch.zeros_like})
    clean, _ = reference(lm.module, ids)
    assert_close(logits_edit.value, ref.logits)
    assert_close(logits_clear.value, clean.logits)
    assert_differs(logits_edit.value, logits_clear.value)


# -- 7. early stop -------------------------------------------------------------------------------------------
def test_tracer_stop(lm, ids):
    m = lm.model
    later = [lm.block_path(1), lm.arch.norm, "lm_head"]
    with count_calls(lm.module, [lm.block_path(0), *later]) as counts:
        with m.trace(ids) as tracer:
            h0 = lm.block(0).output.save()
            tracer.stop()
    _, ref = reference(lm.module, ids, save=[lm.block_path(0)])
    assert_close(h0.value, ref[lm.block_path(0)])
    assert counts == {lm.block_path(0): 1, **{p: 0 for p in later}}
    assert tracer.output is None


def test_module_output_stop(lm, ids):
    m = lm.model
    with count_calls(lm.module, [lm.block_path(1), "lm_head"]) as counts:
        with m.trace(ids):
            mlp0 = lm.mlp(0).output.save()
            logits = m.lm_head.output.save()
            lm.block(0).output.stop()
    _, ref = reference(lm.module, ids, save=[lm.mlp_path(0)])
    assert_close(mlp0.value, ref[lm.mlp_path(0)])
    assert counts == {lm.block_path(1): 0, "lm_head": 0}
    with pytest.raises(ic.ValueNotReadyError):
        logits.value  # noqa: B018


def test_truncation_skips_unneeded_layers(lm, ids, vec):
    m = lm.model
    paths = [lm.block_path(0), lm.block_path(1), lm.arch.norm, "lm_head"]

    with count_calls(lm.module, paths) as counts:
        with m.trace(ids) as tracer:
            attn0 = lm.attn(0).output[0].save()
    _, ref = reference(lm.module, ids, save=[lm.attn_path(0)])
    assert_close(attn0.value, ref[lm.attn_path(0)][0])
    assert counts == {lm.block_path(0): 1, lm.block_path(1): 0, lm.arch.norm: 0, "lm_head": 0}
    assert tracer.output is None

    # a set at block 1 is needed, so block 1 runs; nothing after it does
    with count_calls(lm.module, paths) as counts:
        with m.trace(ids):
            lm.block(1).output[:, -1] = vec
    assert counts == {lm.block_path(0): 1, lm.block_path(1): 1, lm.arch.norm: 0, "lm_head": 0}

    # the model's own output is needed: everything runs
    with count_calls(lm.module, paths) as counts:
        with m.trace(ids):
            mlp0 = lm.mlp(0).output.save()
            out = m.output.save()
    assert counts == {p: 1 for p in paths}
    assert_close(out.value.logits, reference(lm.module, ids)[0].logits)
    assert_close(mlp0.value, reference(lm.module, ids, save=[lm.mlp_path(0)])[1][lm.mlp_path(0)])

    # a cache needs every module
    with count_calls(lm.module, paths) as counts:
        with m.trace(ids) as tracer:
            tracer.cache()
    assert counts == {p: 1 for p in paths}


# -- 8. shapes -----------------------------------------------------------------------------------------------
def test_scan_shapes(lm, ids):
    m = lm.model
    seen = []
    handles = [
        lm.module.get_submodule(lm.block_path(0)).register_forward_hook(lambda mo, a, o: seen.append(o))
    ]
    with registered(handles):
        with m.scan(ids):
            shape = lm.block(0).output.shape
            dim = lm.block(0).output.shape[-1]
            attn_shape = lm.attn(1).output[0].shape
            logits_shape = m.lm_head.output.shape
    assert shape == torch.Size([2, 7, HIDDEN])
    assert dim == HIDDEN
    assert attn_shape == torch.Size([2, 7, HIDDEN])
    assert logits_shape == torch.Size([2, 7, VOCAB])
    assert seen and all(isinstance(o, FakeTensor) for o in seen)  # nothing really ran


def test_shape_inside_invoke_drives_intervention(lm, ids, ids_b):
    m = lm.model
    with m.trace() as tracer:
        with tracer.invoke(ids):
            pass
        with tracer.invoke(ids_b):
            shape = lm.block(0).output.shape
            lm.block(0).output[:, -1] = torch.ones(shape[-1])
            logits = m.lm_head.output.save()
    assert shape == (1, 7, HIDDEN)
    ref, _ = reference(lm.module, ids_b, edit={lm.block_path(0): set_last(torch.ones(HIDDEN))})
    assert_close(logits.value, ref.logits)
