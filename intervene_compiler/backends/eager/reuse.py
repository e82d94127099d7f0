"""Reuse of the unedited decoder layers across traces.

A patching loop runs one trace per (layer, position), each on the same corrupted prompt. Every trace that first
touches layer ``L`` computes layers ``0..L`` exactly as the unedited model does, so a loop spends about half its
time recomputing values an earlier trace already had. A shared-prefix run (``execute._batch``: a decoder
family, every invoke the same one-row input, nothing read but module sites) keeps the decoder layers' outputs it
computes before the first event any node touches (copies, taken before any node sees them) in a memo on the
model's state, one prompt at a time. A later run on an equal input whose model is in the same state replays them:
the layers up to the last memoized one before its first touched event return their memoized output instead of
running (the forward is replaced on the layer instance for the run), and the forward goes on from there.

The model's state is compared through a fingerprint taken at the start of each such run: every module's identity,
training flag and hooks (keys, which torch never reuses), and every parameter's and buffer's storage, version
counter and shape, plus grad and inference mode, autocast, the float32 matmul precision and the config's attention
implementation. Version counters see every in-place change that autograd sees: optimizer steps,
``torch.no_grad()`` edits, ``load_state_dict``, ``copy_``. Like autograd's own checks they do not see writes
through ``.data`` or through NumPy views of a tensor, and ``p.data = t`` may land on the address of a freed
storage; checking the values instead would read every replayed weight, which costs about as much as running those
layers on a short prompt. So reuse is opt-in (``NNsight(module, reuse=True)`` or ``trace(reuse=True)``), and
after such a write a model that opted in needs ``model.clear_reuse()``. Runs in training mode,
with grad mode on while a parameter or an input requires grad (a replayed value has no history), or on a model
with a module whose ``forward`` is replaced on the instance (accelerate's dispatch hooks) neither use nor fill the
memo; nor does a layer output other than a tensor or a tuple of tensors (and ``None``), or an input that is
neither a tensor nor a plain value (a KV cache passed in changes as the model runs). Eager runs and layered
compiled runs (``backends/compiled/layered.py``) keep separate memos, so an eager trace stays bit-identical to one
without reuse. ``tracer.explain()`` says what a run replayed and memoized, or why it could not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules import module as _global_hooks

from ...ir import SiteKind
from ...runtime import Target

_MAX_BYTES = 256 << 20  # memoized outputs per model, at most
_INPUTS, _OUTPUT = SiteKind.INPUTS, SiteKind.OUTPUT


class Memo:
    """The unedited decoder-layer outputs of one input, and the model state they were computed in."""

    __slots__ = ("inputs", "state", "outputs", "nbytes")

    def __init__(self, inputs: list, state: tuple):
        self.inputs = inputs  # the input's leaves (tensors cloned)
        self.state = state
        self.outputs: dict[int, Any] = {}  # decoder layer index -> its output, copied
        self.nbytes = 0

    def prefix(self) -> int:
        """How many layers from the first are memoized."""
        n = 0
        while n in self.outputs:
            n += 1
        return n

    def record(self, index: int, output: Any) -> None:
        if index in self.outputs or not _plain(output):
            return
        copied = _clone(output)
        size = sum(t.numel() * t.element_size() for t in _tensors(copied))
        if self.nbytes + size <= _MAX_BYTES:
            self.outputs[index] = copied
            self.nbytes += size


class Plan:
    """What one run does with the memo: replay layers ``0..skip`` and record layers ``skip+1..last``."""

    __slots__ = ("memo", "layers", "skip", "last")

    def __init__(self, memo: Memo, layers, skip: int, last: int):
        self.memo = memo
        self.layers = layers
        self.skip = skip
        self.last = last

    def describe(self) -> str:
        parts = []
        if self.skip >= 0:
            parts.append(f"replayed decoder layers 0-{self.skip} memoized by an earlier trace of this prompt")
        if self.last > self.skip:
            parts.append(f"memoized layers {self.skip + 1}-{self.last} for later traces of it")
        return "; ".join(parts)

    def install(self, handles: list, add_hook) -> None:
        """Replace the replayed layers' forwards and hook the recorded ones (before the runner's own hooks)."""
        layers, memo = self.layers, self.memo
        for j in range(self.skip + 1):
            handles.append(Swap(layers[j], _Replay(memo.outputs[j], copy=j == self.skip)))
        for j in range(self.skip + 1, self.last + 1):
            handles.append(add_hook(layers[j], _recorder(memo, j), pre=False))


class _Replay:
    """A replayed layer's forward: its memoized output (a fresh copy for the last replayed layer, whose output
    reaches the nodes and the next layer; the others' outputs only feed replayed layers)."""

    __slots__ = ("output", "copy")

    def __init__(self, output: Any, copy: bool):
        self.output = output
        self.copy = copy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _clone(self.output) if self.copy else self.output


class Swap:
    """A module's ``forward`` replaced on the instance for one run (``remove`` puts back what was there: the
    class's, or a forward an earlier patch had set on the instance)."""

    __slots__ = ("module", "before")

    def __init__(self, module: torch.nn.Module, forward):
        self.module = module
        self.before = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.before is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.before


def _recorder(memo: Memo, index: int):
    def hook(mod, args, kwargs, output):
        memo.record(index, output)

    return hook


def plan(target: Target, run, args: tuple, kwargs: dict, compiled: bool = False) -> Plan | str:
    """The reuse plan of a shared-prefix run of ``target`` on one row ``args``/``kwargs``, or why there is none
    (``tracer.explain()`` shows either). ``compiled``: the run's layers are compiled (layered runs); eager and
    compiled runs replay only their own layers' values, so an eager trace stays bit-identical to one without
    reuse."""
    found = target.decoder_layers()
    if found is None:
        return "off: the decoder layers were not found"
    layers_path, layers = found
    last = _last_unedited(run.site_nodes, layers_path, len(layers), target.facts.last_module)
    if last < 0:
        return "off: the first module the trace touches comes before the first decoder layer's output"
    state = fingerprint(target.module)
    if state is None:
        return "off: " + _why_not(target.module)
    state = (compiled, state)
    inputs = leaves((args, kwargs))
    if not plain_values(inputs):  # a KV cache passed in changes as the model runs: equal is not the same
        return "off: an input is neither a tensor nor a plain value (a KV cache passed in?)"
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return "off: autograd records (an input requires grad)"
    store = target.caches
    memo = store.reuse_memo
    if memo is None or memo.state != state or not same_leaves(memo.inputs, inputs):
        memo = Memo([t.clone() if isinstance(t, torch.Tensor) else t for t in inputs], state)
        store.reuse_memo = memo
    skip = min(memo.prefix(), last + 1) - 1
    return Plan(memo, layers, skip, last)


def _why_not(module: torch.nn.Module) -> str:
    """Why ``fingerprint(module)`` is None (only asked then)."""
    for name, m in module.named_modules():
        if m.training:
            return f"module {name or '<root>'} is in training mode"
        if "forward" in m.__dict__:
            return f"module {name or '<root>'} has a forward set on the instance"
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return "autograd records (parameters require grad): trace under torch.no_grad() to replay layers"
    return "a module without nn.Module's state"


def _last_unedited(site_nodes, layers_path: str, n: int, unembedding: str | None) -> int:
    """The last decoder layer whose output no node sees edited (-1: none): every layer before the first event a
    node touches. Events outside the decoder layers other than the unembedding's are of unknown order: -1."""
    last = n - 1
    prefix = layers_path + "."
    for path, kind, call in site_nodes:
        if call != 0 or (kind is not _INPUTS and kind is not _OUTPUT):
            return -1
        if path.startswith(prefix):
            head, _, rest = path[len(prefix) :].partition(".")
            if not head.isdigit():
                return -1
            i = int(head)
            last = min(last, i if (not rest and kind is _OUTPUT) else i - 1)
        elif path != unembedding:
            return -1
    return last


def fingerprint(module: torch.nn.Module) -> tuple | None:
    """The state the unedited layers' values depend on (see the module docstring); None when no reuse."""
    grad = torch.is_grad_enabled()
    parts: list = [
        grad,
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled(),
        getattr(getattr(module, "config", None), "_attn_implementation", None),
        torch.get_float32_matmul_precision(),
        tuple(_global_hooks._global_forward_hooks),
        tuple(_global_hooks._global_forward_pre_hooks),
    ]
    append = parts.append
    stack = [module]
    pop, push = stack.pop, stack.extend
    while stack:  # (module.modules() builds every dotted name: twice the cost)
        m = pop()
        d = m.__dict__
        if (
            d.get("training", True) or "forward" in d
        ):  # a forward set on the instance: accelerate's hooks, a patch
            return None
        append(id(m))
        hooks, pre = d.get("_forward_hooks"), d.get("_forward_pre_hooks")
        if hooks or pre:
            append((tuple(hooks or ()), tuple(pre or ())))
        for table in (d.get("_parameters"), d.get("_buffers")):
            if table is None:  # not a plain nn.Module (a scripted one): unknown state
                return None
            for t in table.values():
                if t is None:
                    append(None)
                    continue
                if grad and t.requires_grad:
                    return None
                append((t.data_ptr(), t._version, t.shape))
        children = d.get("_modules")
        if children:
            push([c for c in children.values() if c is not None])
    return tuple(parts)


_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def plain_values(values: list) -> bool:
    """Are all ``values`` (an input's leaves) tensors or immutable plain values?"""
    return all(isinstance(v, _PLAIN) for v in values)


def same_leaves(old: list, new: list) -> bool:
    """Are two inputs' leaves (``leaves``) equal: tensors of one shape, dtype and device with equal values, other
    values of one type and equal?"""
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        if isinstance(a, torch.Tensor):
            if not (
                isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and a.dtype == b.dtype
                and a.device == b.device
                and torch.equal(a, b)
            ):
                return False
        elif type(a) is not type(b) or a != b:
            return False
    return True


def leaves(value: Any) -> list:
    """The leaves of nested tuples, lists and dicts (dict keys included), in order."""
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in leaves(v)]
    if isinstance(value, dict):
        return [k for k in value] + [x for v in value.values() for x in leaves(v)]
    return [value]


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    t = type(value)
    if t is tuple or t is list:
        return t(_clone(v) for v in value)
    return value


def _plain(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return type(value) is tuple and all(v is None or isinstance(v, torch.Tensor) for v in value)


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif type(value) is tuple or type(value) is list:
        for v in value:
            yield from _tensors(v)
