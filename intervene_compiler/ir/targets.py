"""Names for the callables a graph calls, so graphs print, hash and serialize without pickling code.

A callable's name is the dotted path it can be imported from (``torch.argmax``, ``torch.Tensor.add``,
``operator.add``, ``builtins.list``, ``einops.rearrange``, ``mypkg.mod.fn``). Callables that have no importable
name (lambdas, closures) still run locally, but a graph that holds one cannot be serialized.
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
import types
from typing import Any

import torch

_NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("torch", torch),
    ("torch.nn.functional", torch.nn.functional),
    ("torch.Tensor", torch.Tensor),
    ("torch.linalg", torch.linalg),
    ("torch.special", torch.special),
    ("torch.fft", torch.fft),
    ("operator", operator),
    ("builtins", builtins),
    ("math", math),
)

_by_id: dict[int, str] = {}
_by_name: dict[str, Any] = {}


def _index_namespaces() -> None:
    if _by_id:
        return
    for prefix, ns in _NAMESPACES:
        for attr in dir(ns):
            try:
                obj = getattr(ns, attr)
            except Exception:  # some torch attributes raise on access
                continue
            if callable(obj) and id(obj) not in _by_id:
                _by_id[id(obj)] = f"{prefix}.{attr}"
                _by_name.setdefault(f"{prefix}.{attr}", obj)


def target_name(fn: Any) -> str | None:
    """The importable dotted name of ``fn``, or None if it has none."""
    _index_namespaces()
    name = _by_id.get(id(fn))
    if name is not None:
        return name
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        name = f"{module}.{qualname}"
        try:
            if resolve_target(name) is fn:
                return name
        except (ImportError, AttributeError):
            pass
    objclass = getattr(fn, "__objclass__", None)  # method descriptors such as TensorBase.add
    if objclass is not None and issubclass(torch.Tensor, objclass):
        attr = getattr(fn, "__name__", "")
        if getattr(torch.Tensor, attr, None) is fn:
            return f"torch.Tensor.{attr}"
    return None


def display_name(fn: Any) -> str:
    """A readable name for printing, also for callables that cannot be serialized."""
    name = target_name(fn)
    if name is not None:
        return name.removeprefix("builtins.")
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def resolve_target(name: str) -> Any:
    """Import the callable a dotted name refers to (the inverse of :func:`target_name`)."""
    _index_namespaces()
    if name in _by_name:
        return _by_name[name]
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {name!r}")


# top-level modules whose functions compute values and act on nothing else (their in-place variants are mutations,
# which the IR knows apart: ``nodes.is_mutation``); this package's own callables (``keep_last_position``,
# ``unembed_columns``) are pure too
_PURE_MODULES = frozenset(
    {"torch", "operator", "_operator", "math", "einops", "intervene_compiler", "builtins"}
)
_ACTING_BUILTINS = frozenset(
    {"print", "setattr", "delattr", "exec", "eval", "open", "input", "next", "__import__"}
)


def is_pure(fn: Any) -> bool:
    """Is calling ``fn`` known to have no effect beyond its result? A user's function or a bound method
    (``seen.append``) is not: a CALL of it runs even when nothing reads its result, on real values only."""
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, (types.ModuleType, type)):
        return False  # a bound method: it acts on its object
    module = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", None)
    if not isinstance(module, str) or module.partition(".")[0] not in _PURE_MODULES:
        return False
    return not (module == "builtins" and getattr(fn, "__name__", None) in _ACTING_BUILTINS)
