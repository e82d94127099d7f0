"""What a remote request may name: a closed, reviewed allowlist of pure tensor operations.

A request is an intervention graph as data (``ir/serialize.py``). Its CALL nodes name callables by dotted path;
locally any importable name resolves (``ir.targets.resolve_target``), which on a server would let a request reach
``os.system``, ``builtins.eval`` or ``torch.load``. The server resolves names only here:

- torch's tensor operations: the functions PyTorch itself lists as tensor operations
  (``torch.overrides.get_overridable_functions``: ``torch.*``, ``torch.Tensor.*``, ``torch.nn.functional``,
  ``torch.linalg``, ``torch.fft``, ``torch.special``), less everything that touches storage, files, hooks or
  Python callables (``_DENIED``) and every private name;
- the arithmetic of ``operator``, the pure builtins (``len``, ``min``, ``list``, ...), ``math``, ``einops``;
- what a session builds: ``torch.nn.Parameter`` and the optimizers of ``torch.optim``;
- this package's own protocol ops (``_PROTOCOL``).

Attribute reads (GETATTR), writes (SETATTR) and method calls (METHOD) name attributes too: they are checked
against the same kind of list (``check_graph``). Nothing here imports a module a request names: every allowed
callable is looked up in a table built from modules this package already imports.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch

from ..ir import Graph, Op
from ..ir.nodes import walk_nodes

# substrings of names that reach storage, files, hooks, Python callables or global state: never allowed
_DENIED = (
    "storage",
    "from_file",
    "save",
    "load",
    "hook",
    "apply_",
    "map_",
    "map2_",
    "set_",
    "share_memory",
    "pin_memory",
    "data_ptr",
    "module_load",
    "numpy",
    "register",
    "compile",
    "jit",
    "manual_seed",
    "seed",
    "set_default",
    "use_deterministic",
    "grad_fn",
    "untyped",
    "_cdata",
    "cuda",
    "ipu",
    "mtia",
    "xpu",
    "to_dlpack",
    "from_dlpack",
    "vmap",
    "cond",
    "while_loop",
    "func",
)
_DUNDER_OPS = frozenset(
    f"__{n}__"
    for n in (
        "add radd iadd sub rsub isub mul rmul imul truediv rtruediv itruediv floordiv rfloordiv ifloordiv mod "
        "rmod imod pow rpow ipow matmul rmatmul imatmul neg pos abs invert and rand iand or ror ior xor rxor ixor "
        "lshift rlshift ilshift rshift rrshift irshift eq ne lt le gt ge getitem setitem len contains bool "
        "float int index"
    ).split()
)
_OPERATOR = (
    "abs add and_ concat contains countOf eq floordiv ge getitem gt iadd iand iconcat ifloordiv ilshift imatmul "
    "imod imul index indexOf inv invert ior ipow irshift is_ is_not isub itruediv ixor le lshift lt matmul mod "
    "mul ne neg not_ or_ pos pow rshift setitem sub truediv truth xor delitem"
).split()
_BUILTINS = (
    "abs all any bool complex dict divmod enumerate float int len list max min pow range reversed round set "
    "slice sorted str sum tuple zip frozenset"
).split()
_EINOPS = ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack")
_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam")
# non-private attributes of values a graph may read (tensors, model outputs, caches of our own): any name that
# is not denied. Writes: only these
_SETTABLE = frozenset({"grad", "requires_grad", "data"})
# methods of containers, model outputs and optimizers a graph may call, besides tensor methods
_CONTAINER_METHODS = frozenset(
    "append extend insert pop clear copy index count keys values items get update setdefault to_tuple add "
    "discard remove step zero_grad".split()
)


# tensor factories (not tensor operations, so not in PyTorch's list): allowed with a bound on the size they make;
# ``empty`` is not (its memory is not cleared)
_FACTORIES = (
    "zeros",
    "ones",
    "full",
    "rand",
    "randn",
    "randint",
    "arange",
    "linspace",
    "logspace",
    "eye",
    "tensor",
)
MAX_ELEMENTS = 1 << 28


def _bounded(factory: Any) -> Any:
    """``factory`` refusing to make a tensor of more than ``MAX_ELEMENTS`` elements."""

    def make(*args: Any, **kwargs: Any) -> Any:
        sizes = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
        for a in args:
            if isinstance(a, (tuple, list, torch.Size)) and all(isinstance(x, int) for x in a):
                sizes.extend(a)
        size = kwargs.get("size")
        if isinstance(size, (tuple, list, torch.Size)):
            sizes.extend(x for x in size if isinstance(x, int))
        count = 1
        for n in sizes:
            count *= max(int(n), 1)
        if factory is torch.arange or factory is torch.linspace or factory is torch.logspace:
            count = max((abs(int(x)) for x in sizes), default=0)
        if count > MAX_ELEMENTS:
            raise ValueError(f"torch.{factory.__name__} would make more than {MAX_ELEMENTS} elements")
        return factory(*args, **kwargs)

    make.__name__ = make.__qualname__ = factory.__name__
    return make


def _denied(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("__") and leaf.endswith("__"):
        return leaf not in _DUNDER_OPS
    return leaf.startswith("_") or any(d in leaf for d in _DENIED)


def _build() -> tuple[dict[str, Any], frozenset[str]]:
    from torch.overrides import get_overridable_functions

    table: dict[str, Any] = {}
    methods: set[str] = set()
    prefixes = {
        torch: "torch",
        torch.functional: "torch.functional",
        torch.nn.functional: "torch.nn.functional",
        torch.Tensor: "torch.Tensor",
        torch.linalg: "torch.linalg",
        torch.fft: "torch.fft",
        torch.special: "torch.special",
    }
    for namespace, fns in get_overridable_functions().items():
        prefix = prefixes.get(namespace)
        if prefix is None:
            continue
        for fn in fns:
            name = getattr(fn, "__name__", None)
            if not isinstance(name, str) or _denied(name):
                continue
            if getattr(namespace, name, None) is not fn:
                continue
            table[f"{prefix}.{name}"] = fn
            if namespace is torch.Tensor:
                methods.add(name)
    for name in _DUNDER_OPS:
        op = getattr(torch.Tensor, name, None)
        if op is not None:
            table[f"torch.Tensor.{name}"] = op
            methods.add(name)
    for name in _OPERATOR:  # and the dunder spelling (operator.__mul__ is operator.mul)
        for spelling in (name, f"__{name.rstrip('_')}__"):
            found = getattr(operator, spelling, None)
            if found is not None:
                table[f"operator.{spelling}"] = found
    for name in _BUILTINS:
        table[f"builtins.{name}"] = getattr(builtins, name)
    for name in dir(math):
        fn = getattr(math, name)
        if not name.startswith("_") and callable(fn):
            table[f"math.{name}"] = fn
    try:
        import einops

        for name in _EINOPS:
            found = getattr(einops, name, None)
            if found is not None:
                table[f"einops.{name}"] = found
    except ImportError:
        pass
    for name in _FACTORIES:
        table[f"torch.{name}"] = _bounded(getattr(torch, name))
    table["torch.nn.parameter.Parameter"] = torch.nn.Parameter
    table["torch.nn.Parameter"] = torch.nn.Parameter
    for name in _OPTIMIZERS:
        cls = getattr(torch.optim, name, None)
        if cls is not None:
            table[f"torch.optim.{name}"] = cls
            table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for fn in _protocol():
        table[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return table, frozenset(methods)


def _protocol() -> list[Any]:
    """This package's own callables that recorded graphs call (a request carries a graph as recorded: the passes'
    own callables are added on the server, after it is read)."""
    from ..tracing.envoy import module_tensor

    return [module_tensor]


_TABLE: dict[str, Any] | None = None
_METHODS: frozenset[str] = frozenset()


def allowed() -> dict[str, Any]:
    """Name -> callable, for every callable a request may name."""
    global _TABLE, _METHODS
    if _TABLE is None:
        _TABLE, _METHODS = _build()
    return _TABLE


def safe_target(name: str) -> Any:
    """The allowed callable ``name`` names; ``UnsafeRequest`` (naming it) for any other name."""
    if not isinstance(name, str):
        raise UnsafeRequest(f"a callable's name must be a string, not {type(name).__name__}")
    fn = allowed().get(name)
    if fn is None:
        raise UnsafeRequest(f"{name!r} is not an operation a remote request may call")
    return fn


class UnsafeRequest(ValueError):
    """A request names something outside the allowlist (the server answers 400 with this message)."""


def check_graph(graph: Graph) -> None:
    """Every attribute a graph reads, writes or calls by name is allowed (its callables were resolved through
    :func:`safe_target` when it was read)."""
    allowed()
    for n in walk_nodes(graph.nodes):
        op = n.op
        if op is Op.GETATTR:
            _check_attribute(n.target, "read")
        elif op is Op.SETATTR:
            if n.target not in _SETTABLE:
                raise UnsafeRequest(f"setting attribute {n.target!r} is not allowed in a remote request")
        elif op is Op.METHOD:
            name = n.target
            if (
                not isinstance(name, str)
                or _denied(name)
                or (name not in _METHODS and name not in _CONTAINER_METHODS)
            ):
                raise UnsafeRequest(f"method {name!r} is not one a remote request may call")
        elif op is Op.MODULE or op is Op.CACHE or op is Op.STOP:
            _check_plain(n.target, op)


def _check_attribute(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or _denied(name):
        raise UnsafeRequest(f"{what}ing attribute {name!r} is not allowed in a remote request")


def _check_plain(target: Any, op: Op) -> None:
    """A module path, a list of them, or a stop's kind: plain strings."""
    items = target if isinstance(target, tuple) else (target,)
    for t in items:
        if t is not None and not isinstance(t, str):
            raise UnsafeRequest(f"a {op.value} node's target must be a module path, not {type(t).__name__}")
        if isinstance(t, str) and any(part.startswith("_") for part in t.split(".") if part):
            raise UnsafeRequest(f"module path {t!r} names a private attribute")


__all__ = ["UnsafeRequest", "allowed", "check_graph", "safe_target"]
