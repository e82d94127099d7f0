"""Front-end tests on the walkthrough's tiny network and small in-test modules.

Every intervention result is checked against the same computation written with plain PyTorch (forward hooks,
pre-hooks with kwargs, a hand-written forward, autograd tensor hooks) using ``torch.testing.assert_close``.
"""

from __future__ import annotations

import operator
import subprocess
import sys
import textwrap
from collections import OrderedDict

import einops
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import intervene_compiler as ic
from intervene_compiler import NNsight
from intervene_compiler.testing import assert_clean

# ---------------------------------------------------------------------------------------------------------------
# plain-PyTorch references
# ---------------------------------------------------------------------------------------------------------------


def capture(module: torch.nn.Module, *args, **kwargs) -> tuple[dict, object]:
    """Run ``module`` with hooks on every submodule; return ({name: [(args, kwargs, output), ...]}, output)."""
    calls: dict[str, list] = {}
    handles = []
    for name, mod in module.named_modules():

        def hook(m, a, kw, out, name=name):
            calls.setdefault(name, []).append((a, dict(kw), out))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def l1_l2(net, x):
    """The tiny net's layer1 output, layer2 output (= model output)."""
    h = net.layer1(x)
    return h, net.layer2(h)


class SharedTwice(torch.nn.Module):
    """Calls ``shared`` twice in one forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.shared = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.shared(x)
        h = torch.relu(h)
        h = self.shared(h)
        return self.head(h)


class Scale(torch.nn.Module):
    def forward(self, h, gain=1.0, shift=None):
        out = h * gain
        if shift is not None:
            out = out + shift
        return out


class KwargModel(torch.nn.Module):
    """A forward with keyword args, calling a submodule with keyword args (and one with keywords only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lin = torch.nn.Linear(4, 4)
        self.scale = Scale()
        self.kwonly = Scale()

    def forward(self, x, *, mult=1.0, shift=None):
        h = self.lin(x) * mult
        h = self.scale(h, gain=2.0, shift=shift)
        return self.kwonly(h=h, gain=0.5)

    def reference(self, x, mult=1.0, shift=None, gain=2.0):
        h = self.lin(x) * mult
        h = h * gain
        if shift is not None:
            h = h + shift
        return h * 0.5


class Stack(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(5)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture
def shared():
    m = SharedTwice().requires_grad_(False)
    yield m
    assert_clean(m)


@pytest.fixture
def kwmodel():
    m = KwargModel().requires_grad_(False)
    yield m
    assert_clean(m)


@pytest.fixture
def stack():
    m = Stack().requires_grad_(False)
    yield m
    assert_clean(m)


@pytest.fixture
def x4():
    torch.manual_seed(6)
    return torch.randn(2, 4)


# ---------------------------------------------------------------------------------------------------------------
# the module tree
# ---------------------------------------------------------------------------------------------------------------


def test_print_shows_module_tree(tiny, net, capsys):
    print(tiny)
    printed = capsys.readouterr().out
    assert printed == str(net) + "\n"
    assert "(layer1): Linear(in_features=5, out_features=10, bias=True)" in printed
    assert "(layer2): Linear(in_features=10, out_features=2, bias=True)" in printed
    assert repr(tiny) == repr(net)
    assert repr(tiny.layer1) == repr(net.layer1)


def test_attribute_access_mirrors_submodules(tiny, net):
    assert isinstance(tiny.layer1, ic.Envoy)
    assert tiny.layer1._module is net.layer1
    assert tiny.layer2._module is net.layer2
    assert tiny.layer1 is tiny.layer1  # envoys are cached
    # non-module attributes come from the module
    assert tiny.layer1.weight is net.layer1.weight
    assert tiny.layer2.out_features == 2
    assert tiny.training == net.training
    with pytest.raises(AttributeError, match="did you mean"):
        _ = tiny.layer3
    with pytest.raises(ic.UnknownModuleError):
        _ = tiny.layer1.nothing_here


def test_setattr_forwards_to_module(tiny, net):
    tiny.layer1.custom_flag = 7
    assert net.layer1.custom_flag == 7


def test_module_list_iteration_len_negative_index(stack, x4):
    model = NNsight(stack)
    assert len(model.layers) == 3
    envoys = list(model.layers)
    assert [e._module for e in envoys] == list(stack.layers)
    assert model.layers[-1]._module is stack.layers[2]
    assert model.layers[0]._module is stack.layers[0]
    assert [e._module for e in model.layers[1:]] == list(stack.layers[1:])
    with pytest.raises(ic.UnknownModuleError):
        model.layers[3]

    calls, out = capture(stack, x4)
    with model.trace(x4):
        outs = [layer.output.save() for layer in model.layers]
        last = model.layers[-1].output.save()
        first_in = model.layers[0].input.save()
    for i, o in enumerate(outs):
        assert_close(o.value, calls[f"layers.{i}"][0][2])
    assert_close(last.value, calls["layers.2"][0][2])
    assert_close(first_in.value, x4)


def test_get_by_path(tiny, net, x):
    assert tiny.get("layer1") is tiny.layer1
    assert tiny.get("model.layer2") is tiny.layer2
    assert tiny.get("") is tiny
    with tiny.trace(x):
        h = tiny.get("layer1").output.save()
    assert_close(h.value, net.layer1(x))


def test_rename_dotted_key_at_root_and_single_name_alias(stack, x4):
    model = NNsight(stack, rename={"layers.0": "first", "layers": "blocks"})
    assert model.first._module is stack.layers[0]
    assert model.blocks._module is stack.layers
    assert model.blocks[1]._module is stack.layers[1]
    calls, _ = capture(stack, x4)
    with model.trace(x4):
        a = model.first.output.save()
        b = model.blocks[2].output.save()
    assert_close(a.value, calls["layers.0"][0][2])
    assert_close(b.value, calls["layers.2"][0][2])


def test_rename_single_name_alias_on_nested_module(x):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.mlp(x) + x

    torch.manual_seed(0)
    mod = torch.nn.Sequential(Block(), Block()).requires_grad_(False)
    model = NNsight(mod, rename={"mlp": "ff"})
    assert model[1].ff._module is mod[1].mlp
    calls, out = capture(mod, x)
    with model.trace(x):
        ff = model[1].ff.output.save()
    assert_close(ff.value, calls["1.mlp"][0][2])


# ---------------------------------------------------------------------------------------------------------------
# getting: .output / .input / .inputs
# ---------------------------------------------------------------------------------------------------------------


def test_output_input_inputs_root_and_submodules(tiny, net, x):
    calls, out = capture(net, x)
    with tiny.trace(x):
        root_out = tiny.output.save()
        root_in = tiny.input.save()
        root_inputs = tiny.inputs.save()
        l1_out = tiny.layer1.output.save()
        l1_in = tiny.layer1.input.save()
        l2_in = tiny.layer2.input.save()
        l2_inputs = tiny.layer2.inputs.save()
        l2_out = tiny.layer2.output.save()
    assert_close(root_out.value, out)
    assert_close(root_in.value, x)
    args, kwargs = root_inputs.value
    assert_close(args[0], x)
    assert len(args) == 1 and kwargs == {}
    assert_close(l1_out.value, calls["layer1"][0][2])
    assert_close(l1_in.value, x)
    assert_close(l2_in.value, calls["layer1"][0][2])
    assert_close(l2_inputs.value[0][0], calls["layer2"][0][0][0])
    assert l2_inputs.value[1] == {}
    assert_close(l2_out.value, out)


def test_inputs_with_kwargs(kwmodel, x4):
    model = NNsight(kwmodel)
    shift = torch.full((4,), 0.25)
    calls, out = capture(kwmodel, x4, mult=3.0, shift=shift)
    with model.trace(x4, mult=3.0, shift=shift):
        root_inputs = model.inputs.save()
        scale_inputs = model.scale.inputs.save()
        scale_in = model.scale.input.save()
        kwonly_in = model.kwonly.input.save()  # no positional args: the first keyword argument
        kwonly_inputs = model.kwonly.inputs.save()
        result = model.output.save()
    assert_close(root_inputs.value[0][0], x4)
    assert root_inputs.value[1]["mult"] == 3.0
    assert_close(root_inputs.value[1]["shift"], shift)
    ref_args, ref_kwargs, _ = calls["scale"][0]
    assert_close(scale_inputs.value[0][0], ref_args[0])
    assert set(scale_inputs.value[1]) == set(ref_kwargs) == {"gain", "shift"}
    assert scale_inputs.value[1]["gain"] == ref_kwargs["gain"] == 2.0
    assert_close(scale_inputs.value[1]["shift"], ref_kwargs["shift"])
    assert_close(scale_in.value, ref_args[0])
    assert kwonly_inputs.value[0] == ()
    assert_close(kwonly_in.value, calls["kwonly"][0][1]["h"])
    assert_close(kwonly_inputs.value[1]["h"], calls["kwonly"][0][1]["h"])
    assert kwonly_inputs.value[1]["gain"] == 0.5
    assert_close(result.value, out)
    assert_close(result.value, kwmodel.reference(x4, 3.0, shift))


def test_out_of_order_access(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x):
        o2 = tiny.layer2.output.save()
        o1 = tiny.layer1.output.save()
        both = (tiny.layer2.output.sum() + tiny.layer1.output.sum()).save()
    assert_close(o2.value, out)
    assert_close(o1.value, h)
    assert_close(both.value, out.sum() + h.sum())


def test_output_value_not_saved_raises(tiny, x):
    with tiny.trace(x):
        out = tiny.output
        with pytest.raises(ValueError):
            _ = out.value  # inside the block: not computed yet
    with pytest.raises(ValueError, match="not saved"):
        _ = out.value


def test_output_outside_block_raises(tiny):
    with pytest.raises(ic.TracingError):
        _ = tiny.layer1.output


# ---------------------------------------------------------------------------------------------------------------
# setting
# ---------------------------------------------------------------------------------------------------------------


def test_set_output(tiny, net, x):
    new = torch.arange(10.0).reshape(1, 10)
    with tiny.trace(x):
        tiny.layer1.output = new
        after = tiny.layer1.output.save()
        out = tiny.output.save()
    assert_close(after.value, new)
    assert_close(out.value, net.layer2(new))


def test_set_output_from_proxy(tiny, net, x):
    with tiny.trace(x):
        tiny.layer1.output = tiny.layer1.output * 2 + 1
        out = tiny.output.save()
    assert_close(out.value, net.layer2(net.layer1(x) * 2 + 1))


def test_set_input(tiny, net, x):
    new = torch.ones(1, 10)
    with tiny.trace(x):
        tiny.layer2.input = new
        seen = tiny.layer2.input.save()
        out = tiny.output.save()
    assert_close(seen.value, new)
    assert_close(out.value, net.layer2(new))


def test_set_input_from_proxy_on_root(tiny, net, x):
    with tiny.trace(x):
        tiny.input = tiny.input * -1
        out = tiny.output.save()
    assert_close(out.value, net(-x))


def test_set_inputs_with_kwargs(kwmodel, x4):
    model = NNsight(kwmodel)
    ref_h = []

    def pre(mod, args, kwargs):
        ref_h.append(args[0])
        return (args[0] + 1,), {**kwargs, "gain": 3.0}

    handle = kwmodel.scale.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = kwmodel(x4)
    finally:
        handle.remove()

    with model.trace(x4):
        args_kwargs = model.scale.inputs
        h = args_kwargs[0][0]
        model.scale.inputs = ((h + 1,), {"gain": 3.0, "shift": None})
        seen = model.scale.inputs.save()
        out = model.output.save()
    assert_close(out.value, expected)
    assert seen.value[1]["gain"] == 3.0
    assert_close(seen.value[0][0], ref_h[0] + 1)


def test_set_input_kwonly_module(kwmodel, x4):
    model = NNsight(kwmodel)
    with model.trace(x4):
        model.kwonly.input = torch.zeros(2, 4)
        out = model.output.save()
    assert_close(out.value, torch.zeros(2, 4))


def test_setitem_in_place(tiny, net, x):
    h, _ = l1_l2(net, x)
    h_ref = h.clone()
    h_ref[:, 0] = 0
    with tiny.trace(x):
        tiny.layer1.output[:, 0] = 0
        seen = tiny.layer1.output.save()
        out = tiny.output.save()
    assert_close(seen.value, h_ref)
    assert_close(out.value, net.layer2(h_ref))


def test_iadd_on_output(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x):
        tiny.layer1.output += 1
        out = tiny.output.save()
    assert_close(out.value, net.layer2(h + 1))


def test_iadd_on_proxy_mutates_site_value(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x):
        hp = tiny.layer1.output
        hp += 2
        hp *= 3
        out = tiny.output.save()
    assert_close(out.value, net.layer2((h + 2) * 3))


def test_clone_before_after_setitem_walkthrough(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x):
        before = tiny.layer1.output.clone().save()
        tiny.layer1.output[:, 9] = 0
        after = tiny.layer1.output.save()
    assert_close(before.value, h)
    expected = h.clone()
    expected[:, 9] = 0
    assert_close(after.value, expected)
    assert not torch.equal(before.value, after.value)


def test_set_root_output(tiny, net, x):
    with tiny.trace(x):
        tiny.output = tiny.output * 10
        out = tiny.output.save()
        l2 = tiny.layer2.output.save()
    assert_close(out.value, net(x) * 10)
    assert_close(l2.value, net(x))  # the submodule's own output is unchanged


def test_set_output_then_read_downstream_input(tiny, net, x):
    with tiny.trace(x):
        tiny.layer1.output[:, :3] = 5.0
        l2_in = tiny.layer2.input.save()
    expected = net.layer1(x)
    expected[:, :3] = 5.0
    assert_close(l2_in.value, expected)


def test_set_wrong_shape_raises(tiny, x):
    with pytest.raises(ic.SetShapeError):
        with tiny.trace(x):
            tiny.layer1.output = torch.zeros(1, 3)


# ---------------------------------------------------------------------------------------------------------------
# proxies: functions, methods, operators, indexing
# ---------------------------------------------------------------------------------------------------------------


def test_torch_functions_on_proxies(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x):
        hp = tiny.layer1.output
        op = tiny.output
        amax = torch.argmax(hp, dim=1).save()
        cat = torch.cat([hp, hp * 2], dim=1).save()
        where = torch.where(hp > 0, hp, torch.zeros_like(hp)).save()
        relu = F.relu(hp).save()
        soft = torch.softmax(op, dim=-1).save()
        stacked = torch.stack([op, op]).save()
    assert_close(amax.value, torch.argmax(h, dim=1))
    assert_close(cat.value, torch.cat([h, h * 2], dim=1))
    assert_close(where.value, torch.where(h > 0, h, torch.zeros_like(h)))
    assert_close(relu.value, F.relu(h))
    assert_close(soft.value, torch.softmax(out, dim=-1))
    assert_close(stacked.value, torch.stack([out, out]))


def test_tensor_methods_on_proxies(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x):
        hp = tiny.layer1.output
        s = hp.sum().save()
        m = hp.mean(dim=-1).save()
        r = hp.reshape(2, 5).save()
        t = hp.t().save()
        am = hp.argmax(dim=-1).save()
        ab = hp.abs().pow(2).save()
        f = hp.flatten().save()
        ch = hp.clone().detach().save()
        d = hp.to(torch.float64).save()
    assert_close(s.value, h.sum())
    assert_close(m.value, h.mean(dim=-1))
    assert_close(r.value, h.reshape(2, 5))
    assert_close(t.value, h.t())
    assert_close(am.value, h.argmax(dim=-1))
    assert_close(ab.value, h.abs().pow(2))
    assert_close(f.value, h.flatten())
    assert_close(ch.value, h)
    assert d.value.dtype == torch.float64
    assert_close(d.value, h.double())


ARITH = [
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
]
COMPARE = [operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne]
BITWISE = [operator.and_, operator.or_, operator.xor, operator.lshift, operator.rshift]


def test_arithmetic_operators_forward_and_reflected(tiny, net, x):
    h, _ = l1_l2(net, x)
    hpos = h.abs() + 0.5
    with tiny.trace(x):
        hp = tiny.layer1.output.abs() + 0.5
        fwd = [fn(hp, 1.5).save() for fn in ARITH]
        refl = [fn(1.5, hp).save() for fn in ARITH]
        with_tensor = [fn(hp, hpos).save() for fn in ARITH]
        tensor_left = [fn(torch.full_like(hpos, 2.0), hp).save() for fn in (operator.add, operator.mul)]
        mm = (hp @ torch.ones(10, 3)).save()
        rmm = (torch.ones(4, 1) @ hp).save()
        unary = [(-hp).save(), (+hp).save(), abs(-hp).save()]
    for fn, p in zip(ARITH, fwd):
        assert_close(p.value, fn(hpos, 1.5), msg=str(fn))
    for fn, p in zip(ARITH, refl):
        assert_close(p.value, fn(1.5, hpos), msg=str(fn))
    for fn, p in zip(ARITH, with_tensor):
        assert_close(p.value, fn(hpos, hpos), msg=str(fn))
    assert_close(tensor_left[0].value, 2.0 + hpos)
    assert_close(tensor_left[1].value, 2.0 * hpos)
    assert_close(mm.value, hpos @ torch.ones(10, 3))
    assert_close(rmm.value, torch.ones(4, 1) @ hpos)
    assert_close(unary[0].value, -hpos)
    assert_close(unary[1].value, hpos)
    assert_close(unary[2].value, hpos)


def test_comparison_operators(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x):
        hp = tiny.layer1.output
        cmp = [fn(hp, 0.1).save() for fn in COMPARE]
        rcmp = [fn(0.1, hp).save() for fn in COMPARE]  # Python reflects these to hp.__gt__ etc.
        vs_proxy = (hp == tiny.layer2.input).save()
    for fn, p in zip(COMPARE, cmp):
        assert_close(p.value, fn(h, 0.1), msg=str(fn))
    for fn, p in zip(COMPARE, rcmp):
        assert_close(p.value, fn(0.1, h), msg=str(fn))
    assert bool(vs_proxy.value.all())


def test_bitwise_operators_on_int_proxies(tiny, net, x):
    h, _ = l1_l2(net, x)
    hi = (h * 100).to(torch.int64).abs()
    with tiny.trace(x):
        ip = (tiny.layer1.output * 100).to(torch.int64).abs()
        fwd = [fn(ip, 3).save() for fn in BITWISE]
        refl = [fn(6, ip).save() for fn in (operator.and_, operator.or_, operator.xor)]
        inv = (~ip).save()
        b = tiny.layer1.output > 0
        logic = [(b & (ip > 10)).save(), (b | (ip > 10)).save(), (b ^ (ip > 10)).save(), (~b).save()]
    for fn, p in zip(BITWISE, fwd):
        assert_close(p.value, fn(hi, 3), msg=str(fn))
    for fn, p in zip((operator.and_, operator.or_, operator.xor), refl):
        assert_close(p.value, fn(6, hi), msg=str(fn))
    assert_close(inv.value, ~hi)
    hb = h > 0
    assert_close(logic[0].value, hb & (hi > 10))
    assert_close(logic[1].value, hb | (hi > 10))
    assert_close(logic[2].value, hb ^ (hi > 10))
    assert_close(logic[3].value, ~hb)


def test_indexing(tiny, net, x):
    h, _ = l1_l2(net, x)
    idx = torch.tensor([3, 1, 4])
    mask = h > 0
    with tiny.trace(x):
        hp = tiny.layer1.output
        a = hp[0].save()
        b = hp[:, 2:7:2].save()
        c = hp[..., -1].save()
        d = hp[:, idx].save()
        e = hp[hp > 0].save()
        f = hp[None, ..., 1:].save()
        g = hp[:, torch.argmax(hp, dim=1)].save()
    assert_close(a.value, h[0])
    assert_close(b.value, h[:, 2:7:2])
    assert_close(c.value, h[..., -1])
    assert_close(d.value, h[:, idx])
    assert_close(e.value, h[mask])
    assert_close(f.value, h[None, ..., 1:])
    assert_close(g.value, h[:, torch.argmax(h, dim=1)])


def test_shape_dtype_inside_block(tiny, net, x):
    with tiny.trace(x):
        shape = tiny.layer1.output.shape
        dtype = tiny.layer1.output.dtype
        last = tiny.layer2.output.shape[-1]
        noise = torch.zeros(tiny.layer1.output.shape)
        tiny.layer1.output = tiny.layer1.output + noise
        out = tiny.output.save()
    assert shape == torch.Size([1, 10])
    assert repr(shape) == "torch.Size([1, 10])"
    assert dtype == torch.float32
    assert last == 2
    assert_close(out.value, net(x))


def test_requires_grad_setattr(tiny, x):
    with tiny.trace(x):
        tiny.layer1.output.requires_grad = True
        h = tiny.layer1.output.save()
        out = tiny.output.save()
    assert h.value.requires_grad
    assert out.value.requires_grad  # flows through layer2 although its weights do not require grad


def test_einops_rearrange_on_proxy(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x):
        r = einops.rearrange(tiny.layer1.output, "b (g d) -> b d g", g=2).save()
        red = einops.reduce(tiny.layer1.output, "b (g d) -> b g", "sum", g=5).save()
    assert_close(r.value, einops.rearrange(h, "b (g d) -> b d g", g=2))
    assert_close(red.value, einops.reduce(h, "b (g d) -> b g", "sum", g=5))


def test_apply_custom_function(tiny, net, x):
    h, _ = l1_l2(net, x)

    def tensor_sum(tensor):
        total = 0
        for element in tensor.flatten():
            total += element.item()
        return torch.tensor(total)

    with tiny.trace(x) as tracer:
        custom = ic.apply(tensor_sum, tiny.layer1.output).save()
        kw = ic.apply(torch.clamp, tiny.layer1.output, min=0.0).save()
        via_tracer = tracer.apply(lambda a, b: a - b, tiny.layer1.output, 1.0).save()
    assert_close(custom.value, h.sum(), atol=1e-5, rtol=1e-5)
    assert_close(kw.value, h.clamp(min=0.0))
    assert_close(via_tracer.value, h - 1.0)
    assert ic.apply(len, [1, 2, 3]) == 3  # outside a block it just calls


def test_python_control_flow_on_proxy_raises(tiny, x):
    with tiny.trace(x):
        hp = tiny.layer1.output
        with pytest.raises(ic.ProxyControlFlowError):
            if hp.sum() > 0:
                pass
        with pytest.raises(TypeError):
            int(hp[0, 0])
        with pytest.raises(TypeError):
            for _ in hp:
                pass
        with pytest.raises(TypeError):
            len(hp)


# ---------------------------------------------------------------------------------------------------------------
# traceable built-ins
# ---------------------------------------------------------------------------------------------------------------


def test_list_append_inside_trace(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x):
        acts = ic.list().save()
        acts.append(tiny.layer1.output)
        acts.append(tiny.layer2.output)
    assert isinstance(acts.value, list) and len(acts) == 2
    assert_close(acts[0], h)
    assert_close(acts[1], out)


def test_all_builtins(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x):
        hp = tiny.layer1.output
        lst = ic.list([hp[0, 0], hp[0, 1]]).save()
        dct = ic.dict(a=hp[0, 0], b=tiny.output).save()
        dct["c"] = hp.sum()
        tup = ic.tuple([hp.argmax(), 3]).save()
        st = ic.set([hp.argmax().item(), 1]).save()
        i = ic.int(hp.argmax()).save()
        fl = ic.float(hp.sum()).save()
        s = ic.str(hp.argmax().item()).save()
        bo = ic.bool(hp.sum() > 0).save()
        by = ic.bytes([hp.argmax().item(), 65]).save()
        ba = ic.bytearray(by).save()
        ba.append(66)
        cx = ic.complex(hp.sum().item(), 1.0).save()
    amax = int(h.argmax())
    assert_close(lst.value[0], h[0, 0])
    assert_close(lst.value[1], h[0, 1])
    assert type(lst.value) is list
    assert_close(dct.value["a"], h[0, 0])
    assert_close(dct.value["b"], out)
    assert_close(dct.value["c"], h.sum())
    assert type(tup.value) is tuple and tup.value[1] == 3 and int(tup.value[0]) == amax
    assert st.value == {amax, 1}
    assert type(i.value) is int and i.value == amax
    assert type(fl.value) is float and fl.value == pytest.approx(float(h.sum()), rel=1e-6)
    assert s.value == str(amax)
    assert bo.value is bool(h.sum() > 0)
    assert by.value == bytes([amax, 65])
    assert ba.value == bytearray([amax, 65, 66])
    assert cx.value == pytest.approx(complex(float(h.sum()), 1.0), rel=1e-6)


def test_builtins_outside_block_call_through():
    assert ic.list((1, 2)) == [1, 2]
    assert ic.dict(a=1) == {"a": 1}
    assert ic.int("4") == 4
    assert ic.str(3) == "3"
    assert ic.save(5) == 5


# ---------------------------------------------------------------------------------------------------------------
# saved proxies after the block
# ---------------------------------------------------------------------------------------------------------------


def test_saved_proxy_behaves_as_value(tiny, net, x, capsys):
    """A saved proxy that no name of the block's frame holds (here: an object's attributes) stays a proxy after
    the block, and behaves as its value (names are rebound to the values: test_saved_names_hold_values)."""
    import types

    h, out = l1_l2(net, x)
    box = types.SimpleNamespace()
    with tiny.trace(x):
        box.hp = tiny.layer1.output.save()
        box.amax = torch.argmax(box.hp, dim=1).save()
    hp, amax = box.hp, box.amax
    assert isinstance(hp, ic.Proxy)
    assert torch.equal(hp.value, h)
    assert str(hp) == str(h) and repr(hp) == repr(h)
    print(hp)
    assert capsys.readouterr().out == str(h) + "\n"
    assert f"{hp.sum():.3f}" == f"{h.sum():.3f}"
    assert f"{amax[0]}" == f"{torch.argmax(h, dim=1)[0]}"
    assert_close(hp[0, 1:3], h[0, 1:3])
    assert_close(hp[:, torch.tensor([1, 2])], h[:, torch.tensor([1, 2])])
    assert_close(torch.relu(hp), torch.relu(h))
    assert_close(torch.cat([hp, hp]), torch.cat([h, h]))
    assert hp.shape == torch.Size([1, 10]) and hp.dtype == torch.float32 and hp.ndim == 2
    assert_close(hp.sum(), h.sum())
    assert_close(hp + 1, h + 1)
    assert_close(1 - hp, 1 - h)
    assert_close(hp @ torch.ones(10), h @ torch.ones(10))
    assert_close(hp > 0, h > 0)
    assert_close(hp == h, torch.ones_like(h, dtype=torch.bool))
    assert bool((hp >= h).all())
    assert_close(-hp, -h)
    assert len(hp) == 1
    assert [r.shape for r in hp] == [torch.Size([10])]
    assert int(amax[0]) == int(torch.argmax(h))
    assert float(hp.sum()) == pytest.approx(float(h.sum()))
    assert amax[0].item() in {int(torch.argmax(h))}


def test_proxy_printing_inside_block_and_save_helpers(tiny, net, x):
    with tiny.trace(x):
        hp = tiny.layer1.output
        text = str(hp)
        shown = repr(hp.sum())
        saved = ic.save(hp * 2)
        twice = saved.save()
    assert text.startswith("<Proxy") and "layer1" in text
    assert shown.startswith("<Proxy")
    assert twice is saved
    assert_close(saved.value, net.layer1(x) * 2)


def test_saved_proxy_cannot_record_after_block(tiny, x):
    with tiny.trace(x):
        hp = tiny.layer1.output.save()
    # operations act on the value; nothing new is recorded
    assert isinstance(hp * 2, torch.Tensor)


# ---------------------------------------------------------------------------------------------------------------
# log, cond, stop
# ---------------------------------------------------------------------------------------------------------------


def test_tracer_log(tiny, net, x, capsys):
    h, _ = l1_l2(net, x)
    with tiny.trace(x) as tracer:
        tracer.log("Layer 1 - out: ", tiny.layer1.output)
        tracer.log("argmax", tiny.layer1.output.argmax())
    printed = capsys.readouterr().out
    expected = ""
    print("Layer 1 - out: ", h)
    print("argmax", h.argmax())
    expected = capsys.readouterr().out
    assert printed == expected


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond_true_false_else(tiny, net, x, sign):
    h, out = l1_l2(net, x)
    xs = x * sign
    h, out = l1_l2(net, xs)
    with tiny.trace(xs) as tracer:
        s = tiny.layer1.output.sum()
        with tracer.cond(s > 0) as c:
            tiny.layer1.output[:] = 1
        with c.else_():
            tiny.layer1.output[:] = -1
        res = tiny.output.save()
    fill = 1.0 if h.sum() > 0 else -1.0
    assert_close(res.value, net.layer2(torch.full_like(h, fill)))


def test_cond_literal_and_nested(tiny, net, x, capsys):
    h, out = l1_l2(net, x)
    with tiny.trace(x) as tracer:
        n = 8
        with tracer.cond(n > 0):
            with tracer.cond(n % 2 == 0):
                tracer.log("positive and even")
                hits = ic.list().save()
                hits.append(1)
            with tracer.cond(n % 2 == 1):
                tracer.log("positive and odd")
        with tracer.cond(n < 0):
            tracer.log("negative")
    assert capsys.readouterr().out == "positive and even\n"
    assert hits.value == [1]


def test_cond_nested_on_values_and_elif(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x) as tracer:
        hp = tiny.layer1.output
        m = hp.max()
        flags = ic.list().save()
        with tracer.cond(m > 100) as c:  # false
            flags.append("big")
        with c.else_(m > 0) as c2:  # true when max > 0
            flags.append("positive")
            with tracer.cond(hp.argmax() == int(h.argmax())):
                flags.append("argmax-ok")
        with c2.else_():
            flags.append("else")
        skipped = ic.list().save()
        with tracer.cond(m > 100):
            skipped.append(tiny.layer2.output)
    expected = ["positive", "argmax-ok"] if h.max() > 0 else ["else"]
    assert flags.value == expected
    assert skipped.value == []


def test_cond_with_real_tensor_condition(tiny, x, capsys):
    rand_int = torch.tensor([-5])
    with tiny.trace(x) as tracer:
        with tracer.cond(rand_int % 2 == 0):
            tracer.log("even")
        with tracer.cond(rand_int % 2 == 1):
            tracer.log("odd")
    assert capsys.readouterr().out == "odd\n"


def test_tracer_stop(tiny, net, x):
    seen = []
    handle = net.layer2.register_forward_pre_hook(lambda m, a: seen.append(1))
    try:
        with tiny.trace(x) as tracer:
            h = tiny.layer1.output.save()
            tracer.stop()
    finally:
        handle.remove()
    assert_close(h.value, net.layer1(x))
    assert seen == []  # layer2 never ran


def test_module_output_stop(tiny, net, x):
    seen = []
    handle = net.layer2.register_forward_hook(lambda m, a, o: seen.append(1))
    try:
        with tiny.trace(x):
            l1 = tiny.layer1.output.save()
            tiny.layer1.output.stop()
    finally:
        handle.remove()
    assert_close(l1.value, net.layer1(x))
    assert seen == []


def test_stop_before_later_module_value_not_computed(tiny, x):
    with tiny.trace(x):
        l2 = tiny.layer2.output.save()
        tiny.layer1.output.stop()
    with pytest.raises(ValueError, match="stopped"):
        print(l2)


# ---------------------------------------------------------------------------------------------------------------
# trace=False and ad hoc module calls
# ---------------------------------------------------------------------------------------------------------------


def test_trace_false_returns_output(tiny, net, x):
    out = tiny.trace(x, trace=False)
    assert isinstance(out, torch.Tensor)
    assert_close(out, net(x))


def test_interventions_do_not_persist_after_block(tiny, net, x):
    with tiny.trace(x):
        tiny.layer1.output[:] = 0
        inside = tiny.output.save()
    assert_close(inside.value, net.layer2(torch.zeros(1, 10)))
    out = tiny.trace(x, trace=False)
    assert_close(out, net(x))  # the intervention did not persist
    with tiny.trace(x):
        again = tiny.output.save()
    assert_close(again.value, net(x))


def test_ad_hoc_module_call(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x):
        again = tiny.layer2(tiny.layer1.output).save()
        doubled = tiny.layer2(tiny.layer1.output * 2).save()
        final = tiny.output.save()
    assert_close(again.value, out)
    assert_close(doubled.value, net.layer2(h * 2))
    assert_close(final.value, out)


def test_ad_hoc_call_does_not_trigger_interventions(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.trace(x):
        tiny.layer2.output[:] = 0
        adhoc = tiny.layer2(tiny.layer1.output).save()
        final = tiny.output.save()
    assert_close(adhoc.value, out)
    assert_close(final.value, torch.zeros_like(out))


def test_envoy_call_outside_block_runs_module(tiny, net, x):
    assert_close(tiny.layer1(x), net.layer1(x))
    assert_close(tiny(x), net(x))


# ---------------------------------------------------------------------------------------------------------------
# invokes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def x3():
    torch.manual_seed(7)
    return torch.rand(3, 5)


def test_invokes_see_only_their_rows(tiny, net, x3):
    a, b = x3[:1], x3[1:]
    with tiny.trace() as tracer:
        with tracer.invoke(a):
            ha = tiny.layer1.output.save()
            oa = tiny.output.save()
            ia = tiny.input.save()
        with tracer.invoke(b):
            hb = tiny.layer1.output.save()
            ob = tiny.output.save()
            ib = tiny.layer1.inputs.save()
        whole = tiny.output.save()  # outside any invoke: the whole batch
    assert ha.value.shape == (1, 10) and hb.value.shape == (2, 10)
    assert_close(ha.value, net.layer1(a))
    assert_close(hb.value, net.layer1(b))
    assert_close(oa.value, net(a))
    assert_close(ob.value, net(b))
    assert_close(ia.value, a)
    assert_close(ib.value[0][0], b)
    assert_close(whole.value, net(x3))


def test_batched_interventions_equal_separate_runs(tiny, net, x3):
    a, b = x3[:1], x3[1:]
    with tiny.trace() as tracer:
        with tracer.invoke(a):
            tiny.layer1.output[:, 0] = 0
            oa = tiny.output.save()
        with tracer.invoke(b):
            tiny.layer1.output = tiny.layer1.output * 3
            ob = tiny.output.save()
    with tiny.trace(a):
        tiny.layer1.output[:, 0] = 0
        oa_alone = tiny.output.save()
    with tiny.trace(b):
        tiny.layer1.output = tiny.layer1.output * 3
        ob_alone = tiny.output.save()
    assert_close(oa.value, oa_alone.value)
    assert_close(ob.value, ob_alone.value)
    ha = net.layer1(a)
    ha[:, 0] = 0
    assert_close(oa.value, net.layer2(ha))
    assert_close(ob.value, net.layer2(net.layer1(b) * 3))


def test_cross_invoke_value_without_barrier(tiny, net, x3):
    a, b = x3[:1], x3[1:2]
    with tiny.trace() as tracer:
        with tracer.invoke(a):
            emb = tiny.layer1.output
        with tracer.invoke(b):
            tiny.layer1.output = emb
            patched = tiny.output.save()
        with tracer.invoke(b):
            clean = tiny.output.save()
    assert_close(patched.value, net(a))
    assert_close(clean.value, net(b))


def test_cross_invoke_value_with_barrier(tiny, net, x3):
    a, b = x3[:1], x3[1:2]
    with tiny.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            emb = tiny.layer1.output
            barrier()
        with tracer.invoke(b):
            barrier()
            tiny.layer1.output = emb
            patched = tiny.output.save()
    assert_close(patched.value, net(a))


def test_invokes_with_kwargs(kwmodel):
    torch.manual_seed(8)
    a, b = torch.randn(1, 4), torch.randn(2, 4)
    model = NNsight(kwmodel)
    with model.trace() as tracer:
        with tracer.invoke(a, mult=2.0):
            sa = model.scale.inputs.save()
            model.scale.input = model.scale.input + 1
            oa = model.output.save()
        with tracer.invoke(b, mult=2.0):
            sb = model.scale.input.save()
            ob = model.output.save()
    assert sa.value[0][0].shape == (1, 4) and sb.value.shape == (2, 4)
    assert_close(sa.value[0][0], kwmodel.lin(a) * 2.0)
    assert sa.value[1]["gain"] == 2.0
    assert_close(sb.value, kwmodel.lin(b) * 2.0)
    assert_close(oa.value, (kwmodel.lin(a) * 2.0 + 1) * 2.0 * 0.5)
    assert_close(ob.value, kwmodel.reference(b, 2.0))


def test_barrier_not_reached_raises(tiny, x3):
    with pytest.raises(ic.BarrierError):
        with tiny.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(x3[:1]):
                barrier()
                tiny.output.save()


def test_invoker_errors(tiny, x):
    with pytest.raises(ic.InvokeError):
        with tiny.trace(x) as tracer:
            with tracer.invoke(x):
                pass
    with pytest.raises(ic.InvokeError):
        with tiny.trace() as tracer:
            pass
    with pytest.raises(ic.InvokeError):
        with tiny.trace() as tracer:
            with tracer.invoke():
                pass


def test_tracer_invoker_with_direct_input(tiny, x):
    with tiny.trace(x) as tracer:
        invoker = tracer.invoker
        out = tiny.output.save()
    assert invoker is not None
    assert_close(invoker.inputs[0][0], x)
    assert out.value.shape == (1, 2)


# ---------------------------------------------------------------------------------------------------------------
# scan / validate
# ---------------------------------------------------------------------------------------------------------------


def test_scan_shapes(tiny, x, capsys):
    with tiny.scan(x):
        dim = tiny.layer1.output.shape[-1]
        shape = tiny.layer2.output.shape.save()
        in_shape = tiny.layer2.input.shape
    print(dim)
    assert capsys.readouterr().out == "10\n"
    assert dim == 10
    assert shape == torch.Size([1, 2])
    assert in_shape == torch.Size([1, 10])


def test_scan_does_not_run_model(tiny, net, x):
    from torch._subclasses.fake_tensor import FakeTensor

    seen = []
    handle = net.layer1.register_forward_hook(lambda m, a, o: seen.append(type(o)))
    try:
        with tiny.scan(x):
            shape = tiny.layer1.output.shape
            tiny.layer1.output[:, 0] = 0
    finally:
        handle.remove()
    assert shape == (1, 10)
    assert seen and all(issubclass(t, FakeTensor) for t in seen)  # only fake forwards ran


def test_validate_catches_index_error_at_line(tiny, x):
    with pytest.raises(IndexError) as info:
        with tiny.trace(x, scan=True, validate=True):
            tiny.layer1.output.clone().save()
            tiny.layer1.output[:, 10] = 0
            raise AssertionError("validation should have raised at the line above")
    assert info.value.loc is not None and info.value.loc.filename == __file__


def test_validate_correct_intervention_runs(tiny, net, x):
    h, _ = l1_l2(net, x)
    with tiny.trace(x, scan=True, validate=True):
        before = tiny.layer1.output.clone().save()
        shape = tiny.layer1.output.shape
        tiny.layer1.output[:, 9] = 0
        after = tiny.layer1.output.save()
    assert shape == torch.Size([1, 10])
    expected = h.clone()
    expected[:, 9] = 0
    assert_close(before.value, h)
    assert_close(after.value, expected)


def test_index_error_without_validate_raises_on_exit(tiny, x):
    with pytest.raises(IndexError):
        with tiny.trace(x):
            tiny.layer1.output[:, 10] = 0


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------


def autograd_reference(net, x, l1_hook=None, l2_hook=None):
    """Plain autograd: layer1/layer2 output grads, with optional tensor hooks that change them."""
    grads = {}
    h = net.layer1(x)
    h.requires_grad_(True)
    out = net.layer2(h)
    if l2_hook:
        out.register_hook(l2_hook)
    if l1_hook:
        h.register_hook(l1_hook)
    h.register_hook(lambda g: grads.__setitem__("l1", g))
    out.register_hook(lambda g: grads.__setitem__("l2", g))
    out.sum().backward()
    return grads


def test_gradients_walkthrough_era(tiny, net, x):
    with tiny.trace(x):
        tiny.layer1.output.requires_grad = True
        l1_grad = tiny.layer1.output.grad.save()
        l2_grad = tiny.layer2.output.grad.save()
        loss = tiny.output.sum()
        loss.backward()
    ref = autograd_reference(net, x)
    assert_close(l2_grad.value, torch.ones(1, 2))
    assert_close(l2_grad.value, ref["l2"])
    assert_close(l1_grad.value, ref["l1"])
    assert_close(l1_grad.value, torch.ones(1, 2) @ net.layer2.weight)


def test_gradients_edit_walkthrough_era(tiny, net, x):
    with tiny.trace(x):
        tiny.layer1.output.requires_grad = True
        tiny.layer1.output.grad[:] = 0
        tiny.layer2.output.grad = tiny.layer2.output.grad * 2
        l1_grad = tiny.layer1.output.grad.save()
        l2_grad = tiny.layer2.output.grad.save()
        loss = tiny.output.sum()
        loss.backward()
    ref = autograd_reference(net, x, l1_hook=lambda g: torch.zeros_like(g), l2_hook=lambda g: g * 2)
    assert_close(l2_grad.value, torch.full((1, 2), 2.0))
    assert_close(l1_grad.value, torch.zeros(1, 10))
    assert_close(l2_grad.value, ref["l2"])
    assert_close(l1_grad.value, ref["l1"])


def test_gradients_backward_context_era(tiny, net, x):
    with tiny.trace(x):
        hidden = tiny.layer1.output
        hidden.requires_grad = True
        logits = tiny.output
        with logits.sum().backward():
            logits_grad = logits.grad.save()
            hidden_grad = hidden.grad.save()
    ref = autograd_reference(net, x)
    assert_close(logits_grad.value, ref["l2"])
    assert_close(hidden_grad.value, ref["l1"])


def test_gradient_of_doubled_layer2_reaches_layer1(tiny, net, x):
    with tiny.trace(x):
        hidden = tiny.layer1.output
        hidden.requires_grad = True
        logits = tiny.output
        with (logits * logits).sum().backward():
            logits.grad = logits.grad * 2
            hidden_grad = hidden.grad.save()
    # reference with loss (out*out).sum(): d/dout = 2*out, then doubled by the tensor hook
    h = net.layer1(x).requires_grad_(True)
    out = net.layer2(h)
    out.register_hook(lambda g: g * 2)
    (out * out).sum().backward()
    assert_close(hidden_grad.value, h.grad)
    assert_close(hidden_grad.value, (4 * out.detach()) @ net.layer2.weight)


def test_retain_grad_read_after_block(tiny, net, x):
    with tiny.trace(x):
        hidden = tiny.layer1.output.save()
        hidden.requires_grad = True
        hidden.retain_grad()
        tiny.output.sum().backward()
    ref = autograd_reference(net, x)
    assert_close(hidden.grad, ref["l1"])


@pytest.mark.parametrize("invokes", [False, True])
def test_in_place_gradient_edit_stays_on_its_path(invokes):
    """`.grad[...] = v` changes the gradient flowing into that value only: autograd gives the MLP output and the
    residual stream of a block one shared gradient tensor, which the edit must not change (plain PyTorch: a
    tensor hook returning an edited copy)."""
    from intervene_compiler.testing import tiny_gpt2

    net = tiny_gpt2(n_layer=2)
    model = NNsight(net)
    ids = torch.randint(0, 128, (3, 6))
    rows = slice(1, 3) if invokes else slice(None)
    steer = torch.zeros(32, requires_grad=True)
    with model.trace() as tracer:
        for part in (ids[:1], ids[1:]) if invokes else (ids,):
            with tracer.invoke(part):
                model.transformer.h[0].output = model.transformer.h[0].output + steer
        model.transformer.h[1].mlp.output.grad[rows, 3:] = 0
        model.lm_head.output[:, -1, 5].sum().backward()

    def edit(g):
        g = g.clone()
        g[rows, 3:] = 0
        return g

    want = torch.zeros(32, requires_grad=True)
    handles = [
        net.transformer.h[0].register_forward_hook(lambda m, a, o: o + want),
        net.transformer.h[1].mlp.register_forward_hook(lambda m, a, o: (o.register_hook(edit), o)[1]),
    ]
    try:
        net(ids).logits[:, -1, 5].sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert_close(steer.grad, want.grad)
    assert_clean(net)


def test_grad_without_requires_grad_raises(tiny, x):
    with pytest.raises(ic.GradientError):
        with tiny.trace(x):
            tiny.layer1.output.grad.save()
            tiny.output.sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# edits and cache
# ---------------------------------------------------------------------------------------------------------------


def test_edit_copy(tiny, net, x):
    h, out = l1_l2(net, x)
    h0 = h.clone()
    h0[:, 0] = 0
    with tiny.edit() as edited:
        tiny.layer1.output[:, 0] = 0
    assert edited is not tiny
    with edited.trace(x):
        e_out = edited.output.save()
    with edited.trace(x):  # persists across traces, also through the original's envoys
        e_out2 = tiny.output.save()
    with tiny.trace(x):
        o_out = tiny.output.save()
    assert_close(e_out.value, net.layer2(h0))
    assert_close(e_out2.value, net.layer2(h0))
    assert_close(o_out.value, out)
    assert_close(edited.trace(x, trace=False), net.layer2(h0))
    assert_close(tiny.trace(x, trace=False), out)


def test_edit_with_saved_value_and_further_interventions(tiny, net, x, x3):
    other = x3[:1]
    with tiny.trace(other):
        h_other = tiny.layer1.output[:, :5].save()
    with tiny.edit() as edited:
        tiny.layer1.output[:, :5] = h_other
    with edited.trace(x):
        tiny.layer1.output[:, 9] = 1
        h = tiny.layer1.output.save()
        out = edited.output.save()
    expected = net.layer1(x)
    expected[:, :5] = net.layer1(other)[:, :5]
    expected[:, 9] = 1
    assert_close(h.value, expected)
    assert_close(out.value, net.layer2(expected))


def test_edit_inplace_and_clear_edits(tiny, net, x):
    h, out = l1_l2(net, x)
    with tiny.edit(inplace=True) as edited:
        tiny.layer1.output = tiny.layer1.output * 0
    assert edited is tiny
    with tiny.trace(x):
        e_out = tiny.output.save()
    assert_close(e_out.value, net.layer2(torch.zeros_like(h)))
    tiny.clear_edits()
    with tiny.trace(x):
        c_out = tiny.output.save()
    assert_close(c_out.value, out)


def test_two_edits_stack(tiny, net, x):
    with tiny.edit(inplace=True):
        tiny.layer1.output[:, 0] = 0
    with tiny.edit(inplace=True):
        tiny.layer1.output = tiny.layer1.output + 1
    with tiny.trace(x):
        h = tiny.layer1.output.save()
    expected = net.layer1(x)
    expected[:, 0] = 0
    assert_close(h.value, expected + 1)
    tiny.clear_edits()
    assert_close(tiny.trace(x, trace=False), net(x))


def test_cache(tiny, net, x):
    calls, out = capture(net, x)
    with tiny.trace(x) as tracer:
        cache = tracer.cache()
    assert set(cache.keys()) >= {"model", "model.layer1", "model.layer2"}
    assert_close(cache["model.layer1"].output, calls["layer1"][0][2])
    assert_close(cache["model.layer2"].output, calls["layer2"][0][2])
    assert_close(cache["model"].output, out)
    assert cache["model.layer1"].inputs is None


def test_cache_include_inputs_and_selected_modules(tiny, net, x):
    calls, out = capture(net, x)
    with tiny.trace(x) as tracer:
        cache = tracer.cache(include_inputs=True)
        some = tracer.cache(modules=[tiny.layer2])
    args, kwargs = cache["model.layer2"].inputs
    assert_close(args[0], calls["layer2"][0][0][0])
    assert kwargs == {}
    assert_close(cache["model.layer2"].input, calls["layer1"][0][2])
    assert_close(cache["model.layer1"].input, x)
    assert list(some.keys()) == ["model.layer2"]
    assert_close(some["model.layer2"].output, out)


def test_cache_per_invoke_rows(tiny, net, x3):
    a, b = x3[:1], x3[1:]
    with tiny.trace() as tracer:
        with tracer.invoke(a):
            ca = tracer.cache()
        with tracer.invoke(b):
            cb = tracer.cache(include_inputs=True)
    assert_close(ca["model.layer1"].output, net.layer1(a))
    assert_close(cb["model.layer1"].output, net.layer1(b))
    assert_close(cb["model.layer2"].input, net.layer1(b))
    assert_close(cb["model"].output, net(b))


def test_edit_applies_to_every_invoke(tiny, net, x3):
    with tiny.edit() as edited:
        tiny.layer1.output[:, 0] = 0
    with edited.trace() as tracer:
        with tracer.invoke(x3[:1]):
            oa = tiny.output.save()
        with tracer.invoke(x3[1:]):
            ob = tiny.output.save()
    h = net.layer1(x3)
    h[:, 0] = 0
    assert_close(oa.value, net.layer2(h)[:1])
    assert_close(ob.value, net.layer2(h)[1:])


def test_cache_sees_interventions(tiny, net, x):
    with tiny.trace(x) as tracer:
        cache = tracer.cache()
        tiny.layer1.output[:] = 0
    assert_close(cache["model.layer1"].output, torch.zeros(1, 10))
    assert_close(cache["model.layer2"].output, net.layer2(torch.zeros(1, 10)))


# ---------------------------------------------------------------------------------------------------------------
# .next(): call-index addressing
# ---------------------------------------------------------------------------------------------------------------


def test_next_reads_second_call(shared, x4):
    model = NNsight(shared)
    calls, out = capture(shared, x4)
    assert len(calls["shared"]) == 2
    with model.trace(x4):
        first = model.shared.output.save()
        first_in = model.shared.input.save()
        second = model.shared.next().output.save()
        second_in = model.shared.input.save()  # still addressing call 1
    assert_close(first.value, calls["shared"][0][2])
    assert_close(first_in.value, x4)
    assert_close(second.value, calls["shared"][1][2])
    assert_close(second_in.value, calls["shared"][1][0][0])
    assert not torch.equal(first.value, second.value)


def test_next_sets_second_call(shared, x4):
    model = NNsight(shared)

    state = {"n": 0}

    def post(mod, args, output):
        state["n"] += 1
        if state["n"] == 2:
            return output * 0 + 0.5
        return None

    handle = shared.shared.register_forward_hook(post)
    try:
        with torch.no_grad():
            expected = shared(x4)
    finally:
        handle.remove()

    with model.trace(x4):
        first = model.shared.output.save()
        model.shared.next().output = torch.full((2, 4), 0.5)
        out = model.output.save()
    assert_close(out.value, expected)
    assert_close(first.value, shared.shared(x4))  # call 0 untouched
    assert_close(out.value, shared.head(torch.full((2, 4), 0.5)))


def test_next_set_second_call_input(shared, x4):
    model = NNsight(shared)
    with model.trace(x4):
        model.shared.next().input = model.shared.input * 0  # read and write call 1's input
        second = model.shared.output.save()
    assert_close(second.value, shared.shared(torch.zeros(2, 4)))


def test_missed_call_raises(shared, x4):
    model = NNsight(shared)
    with pytest.raises(ic.MissedSiteError):
        with model.trace(x4):
            model.shared.next().next().output.save()


# ---------------------------------------------------------------------------------------------------------------
# the graph-era walkthrough, verbatim with `import intervene_compiler as nnsight`
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def walkthrough():
    """The walkthrough's setup cells, verbatim (nnsight replaced by intervene_compiler)."""
    import intervene_compiler as nnsight
    from intervene_compiler import NNsight

    input_size = 5
    hidden_dims = 10
    output_size = 2
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        OrderedDict(
            [
                ("layer1", torch.nn.Linear(input_size, hidden_dims)),
                ("layer2", torch.nn.Linear(hidden_dims, output_size)),
            ]
        )
    ).requires_grad_(False)
    tiny_model = NNsight(net)
    input = torch.rand((1, input_size))
    ns = dict(
        nnsight=nnsight,
        NNsight=NNsight,
        net=net,
        tiny_model=tiny_model,
        input=input,
        hidden_dims=hidden_dims,
        input_size=input_size,
    )
    yield ns
    assert_clean(net)


def test_walkthrough_tracing_and_getting(walkthrough, capsys):
    tiny_model, input, net = walkthrough["tiny_model"], walkthrough["input"], walkthrough["net"]

    print(tiny_model)
    assert capsys.readouterr().out == str(net) + "\n"

    with tiny_model.trace(input) as tracer:
        pass

    with pytest.raises(ValueError):
        with tiny_model.trace(input) as tracer:
            output = tiny_model.output
            print(output.value)

    with tiny_model.trace(input) as tracer:
        output = tiny_model.output.save()
    print(output.value)
    assert_close(output.value, net(input))

    with tiny_model.trace(input) as tracer:
        l1_output = tiny_model.layer1.output.save()
    print(l1_output.value)
    assert_close(l1_output.value, net.layer1(input))

    with tiny_model.trace(input):
        l2_input = tiny_model.layer2.input.save()
    print(l2_input.value)
    assert_close(l2_input.value, net.layer1(input))

    capsys.readouterr()
    with tiny_model.trace(input) as tracer:
        tracer.log("Layer 1 - out: ", tiny_model.layer1.output)
    logged = capsys.readouterr().out
    print("Layer 1 - out: ", net.layer1(input))
    assert logged == capsys.readouterr().out


def test_walkthrough_functions_methods_operations(walkthrough, capsys):
    nnsight = walkthrough["nnsight"]
    tiny_model, input, net = walkthrough["tiny_model"], walkthrough["input"], walkthrough["net"]
    h = net.layer1(input)

    with tiny_model.trace(input):
        # Note we don't need to call .save() on the output,
        # as we're only using its value within the tracing context.
        l1_output = tiny_model.layer1.output
        # We do need to save the argmax tensor however,
        # as we're using it outside the tracing context.
        l1_amax = torch.argmax(l1_output, dim=1).save()
    print(l1_amax[0])
    assert capsys.readouterr().out == str(torch.argmax(h, dim=1)[0]) + "\n"

    with tiny_model.trace(input):
        value = (tiny_model.layer1.output.sum() + tiny_model.layer2.output.sum()).save()
    print(value)
    assert_close(value.value, h.sum() + net(input).sum())

    # Take a tensor and return the sum of its elements
    def tensor_sum(tensor):
        flat = tensor.flatten()
        total = 0
        for element in flat:
            total += element.item()
        return torch.tensor(total)

    with tiny_model.trace(input) as tracer:  # noqa: F841 (verbatim)
        # Specify the function name and its arguments (in a coma-separated form) to add to the intervention graph
        custom_sum = nnsight.apply(tensor_sum, tiny_model.layer1.output).save()
        sum = tiny_model.layer1.output.sum()
        sum.save()
    print(custom_sum, sum)
    assert_close(custom_sum.value, h.sum(), atol=1e-5, rtol=1e-5)
    assert_close(sum.value, h.sum())


def test_walkthrough_setting(walkthrough, capsys):
    tiny_model, input, net = walkthrough["tiny_model"], walkthrough["input"], walkthrough["net"]
    hidden_dims = walkthrough["hidden_dims"]
    h = net.layer1(input)

    with tiny_model.trace(input):
        # Save the output before the edit to compare.
        # Notice we apply .clone() before saving as the setting operation is in-place.
        l1_output_before = tiny_model.layer1.output.clone().save()
        # Access the 0th index of the hidden state dimension and set it to 0.
        tiny_model.layer1.output[:, 0] = 0
        # Save the output after to see our edit.
        l1_output_after = tiny_model.layer1.output.save()
    print("Before:", l1_output_before)
    print("After:", l1_output_after)
    expected = h.clone()
    expected[:, 0] = 0
    assert_close(l1_output_before.value, h)
    assert_close(l1_output_after.value, expected)

    with pytest.raises(IndexError):
        with tiny_model.trace(input):
            l1_output_before = tiny_model.layer1.output.clone().save()
            tiny_model.layer1.output[:, hidden_dims] = 0
            l1_output_after = tiny_model.layer1.output.save()

    with pytest.raises(IndexError):
        with tiny_model.trace(input, scan=True, validate=True):
            l1_output_before = tiny_model.layer1.output.clone().save()
            # the error is happening here
            tiny_model.layer1.output[:, hidden_dims] = 0
            l1_output_after = tiny_model.layer1.output.save()

    capsys.readouterr()
    with tiny_model.trace(input):
        l1_output_before = tiny_model.layer1.output.clone().save()
        print(f"Layer 1 output shape: {tiny_model.layer1.output.shape}")
        # Access the last index of the hidden state dimension and set it to 0.
        tiny_model.layer1.output[:, hidden_dims - 1] = 0
        l1_output_after = tiny_model.layer1.output.save()
    assert capsys.readouterr().out == "Layer 1 output shape: torch.Size([1, 10])\n"
    expected = h.clone()
    expected[:, hidden_dims - 1] = 0
    assert_close(l1_output_after.value, expected)

    torch.manual_seed(11)
    with tiny_model.trace(input):
        l1_output_before = tiny_model.layer1.output.clone().save()
        # Create random noise with variance of .001
        noise = (0.001**0.5) * torch.randn(l1_output_before.shape)
        # Add to original value and replace.
        tiny_model.layer1.output = l1_output_before + noise
        l1_output_after = tiny_model.layer1.output.save()
    torch.manual_seed(11)
    ref_noise = (0.001**0.5) * torch.randn((1, 10))
    assert_close(l1_output_before.value, h)
    assert_close(l1_output_after.value, h + ref_noise)

    with tiny_model.scan(input):
        dim = tiny_model.layer1.output.shape[-1]
    print(dim)
    assert dim == 10


def test_walkthrough_gradients(walkthrough, capsys):
    tiny_model, input, net = walkthrough["tiny_model"], walkthrough["input"], walkthrough["net"]
    ref = autograd_reference(net, input)

    with tiny_model.trace(input):
        # We need to explicitly have the tensor require grad
        # as the model we defined earlier turned off requiring grad.
        tiny_model.layer1.output.requires_grad = True
        # We call .grad on a tensor Proxy to communicate we want to store its gradient.
        # We need to call .save() since .grad is its own Proxy.
        layer1_output_grad = tiny_model.layer1.output.grad.save()
        layer2_output_grad = tiny_model.layer2.output.grad.save()
        # Need a loss to propagate through the later modules in order to have a grad.
        loss = tiny_model.output.sum()
        loss.backward()
    print("Layer 1 output gradient:", layer1_output_grad)
    print("Layer 2 output gradient:", layer2_output_grad)
    assert_close(layer1_output_grad.value, ref["l1"])
    assert_close(layer2_output_grad.value, torch.tensor([[1.0, 1.0]]))

    with tiny_model.trace(input):
        tiny_model.layer1.output.requires_grad = True
        tiny_model.layer1.output.grad[:] = 0
        tiny_model.layer2.output.grad = tiny_model.layer2.output.grad * 2
        layer1_output_grad = tiny_model.layer1.output.grad.save()
        layer2_output_grad = tiny_model.layer2.output.grad.save()
        loss = tiny_model.output.sum()
        loss.backward()
    print("Layer 1 output gradient:", layer1_output_grad)
    print("Layer 2 output gradient:", layer2_output_grad)
    assert_close(layer1_output_grad.value, torch.zeros(1, 10))
    assert_close(layer2_output_grad.value, torch.tensor([[2.0, 2.0]]))
    assert "tensor([[2., 2.]])" in capsys.readouterr().out


def test_walkthrough_early_stopping_and_conditionals(walkthrough, capsys):
    tiny_model, input, net = walkthrough["tiny_model"], walkthrough["input"], walkthrough["net"]

    with tiny_model.trace(input):
        l1_out = tiny_model.layer1.output.save()
        tiny_model.layer1.output.stop()
    # get the output of the first layer and stop tracing
    print("L1 - Output: ", l1_out)
    assert_close(l1_out.value, net.layer1(input))

    with tiny_model.trace(input):
        l2_out = tiny_model.layer2.output.save()
        tiny_model.layer1.output.stop()
    with pytest.raises(ValueError):
        print("L2 - Output: ", l2_out)

    capsys.readouterr()
    torch.manual_seed(0)
    with tiny_model.trace(input) as tracer:
        rand_int = torch.randint(low=-10, high=10, size=(1,))
        with tracer.cond(rand_int % 2 == 0):
            tracer.log("Random Integer ", rand_int, " is Even")
        with tracer.cond(rand_int % 2 == 1):
            tracer.log("Random Integer ", rand_int, " is Odd")
    parity = "Even" if int(rand_int) % 2 == 0 else "Odd"
    out = capsys.readouterr().out
    print("Random Integer ", rand_int, f" is {parity}")
    assert out == capsys.readouterr().out

    with tiny_model.trace(input) as tracer:
        non_rand_int = 8
        with tracer.cond(non_rand_int > 0):
            with tracer.cond(non_rand_int % 2 == 0):
                tracer.log("Rand Int ", non_rand_int, " is Positive and Even")
    assert capsys.readouterr().out == "Rand Int  8  is Positive and Even\n"


def test_walkthrough_trace_false_and_invoker_args(walkthrough):
    tiny_model, input, net = walkthrough["tiny_model"], walkthrough["input"], walkthrough["net"]
    output = tiny_model.trace(input, trace=False)
    assert_close(output, net(input))
    with tiny_model.trace(input, invoker_args={}) as tracer:
        invoker = tracer.invoker
        out = tiny_model.output.save()
    assert invoker is not None
    assert_close(out.value, net(input))


# ---------------------------------------------------------------------------------------------------------------
# importing patches nothing
# ---------------------------------------------------------------------------------------------------------------


def test_import_patches_nothing():
    script = textwrap.dedent(
        """
        import builtins, operator, torch, torch.nn.functional as F
        def snapshot():
            objs = {}
            namespaces = {
                "torch": vars(torch), "F": vars(F), "builtins": vars(builtins), "operator": vars(operator),
                "Tensor": vars(torch.Tensor), "TensorBase": vars(torch._C.TensorBase),
                "Module": vars(torch.nn.Module), "Linear": vars(torch.nn.Linear),
                "Sequential": vars(torch.nn.Sequential),
            }
            for prefix, ns in namespaces.items():
                for name, value in list(ns.items()):
                    objs[prefix + "." + name] = value
            return objs
        before = snapshot()
        import intervene_compiler as ic, einops
        from collections import OrderedDict
        after_import = snapshot()
        net = torch.nn.Sequential(OrderedDict([("layer1", torch.nn.Linear(5, 10)),
                                               ("layer2", torch.nn.Linear(10, 2))]))
        model = ic.NNsight(net)
        with model.trace(torch.rand(1, 5)):
            l = ic.list().save()
            l.append(torch.cat([model.layer1.output, model.layer1.output]))
            s = (model.output + 1).save()
        after_trace = snapshot()
        bad = [k for k in before if before[k] is not after_import.get(k) or before[k] is not after_trace.get(k)]
        assert not bad, bad
        assert len(before) > 1000
        assert "__torch_function__" not in vars(torch.Tensor) or (
            vars(torch.Tensor)["__torch_function__"] is before["Tensor.__torch_function__"])
        assert builtins.list is list and list is not ic.list
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_value_saved_under_a_false_cond_says_so(tiny, x):
    with tiny.trace(x) as tracer:
        with tracer.cond(tiny.layer1.output.sum() > 1e9):
            skipped = tiny.layer2.output.save()
        kept = tiny.layer2.output.save()
    with pytest.raises(ic.ValueNotReadyError, match="condition guarding it .* was false"):
        _ = skipped.value
    torch.testing.assert_close(kept.value, tiny._model(x))


def test_requires_grad_on_one_invokes_rows_reaches_other_invokes(tiny, net):
    torch.manual_seed(3)
    x3 = torch.rand(3, 5)
    with tiny.trace() as tracer:
        with tracer.invoke(x3[:1]):
            tiny.layer1.output.requires_grad = True
            ga = tiny.layer1.output.grad.save()
        with tracer.invoke(x3[1:]):
            gb = tiny.layer1.output.grad.save()
            tiny.output.sum().backward()  # this invoke's rows only
    h = net.layer1(x3).detach().requires_grad_(True)
    net.layer2(h)[1:].sum().backward()
    torch.testing.assert_close(ga.value, h.grad[:1])  # zeros: the loss does not read invoke 0's rows
    torch.testing.assert_close(gb.value, h.grad[1:])
    assert gb.value.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identical_invokes_share_their_prefix(arch, gpt2_module, llama_module):
    """Patching sweeps put one prompt in every invoke: the layers before the first edit run on one row, and the
    results equal one plain-hook run per invoke. Different inputs still run as one batch."""
    m = gpt2_module if arch == "gpt2" else llama_module
    blocks = m.transformer.h if arch == "gpt2" else m.model.layers
    model = NNsight(m)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    src = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    rows: list[int] = []
    handle = blocks[0].register_forward_pre_hook(lambda mod, a: rows.append(a[0].shape[0]))
    try:
        with model.trace() as tracer:
            outs = []
            for pos in range(4):
                with tracer.invoke(ids):
                    block = model.transformer.h[1] if arch == "gpt2" else model.model.layers[1]
                    block.output[:, pos] = src[pos]
                    outs.append(model.lm_head.output[:, -1].save())
        assert rows == [1]  # block 0 ran once, on one row
        rows.clear()
        other = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
        with model.trace() as tracer:
            for x in (ids, other):
                with tracer.invoke(x):
                    block = model.transformer.h[1] if arch == "gpt2" else model.model.layers[1]
                    block.output[:, 0] = src[0]
        assert rows == [2]  # different inputs: one batch of two rows
    finally:
        handle.remove()
    for pos, out in enumerate(outs):

        def patch(mod, args, output, pos=pos):
            output = output.clone()
            output[:, pos] = src[pos]
            return output

        h = blocks[1].register_forward_hook(patch)
        try:
            with torch.no_grad():
                ref = m(ids).logits[:, -1]
        finally:
            h.remove()
        torch.testing.assert_close(out.value, ref)
    assert_clean(m)
