"""Saved values after a block, and ``.save()`` on plain Python containers inside one.

After a block runs, the names in the caller's frame that hold its saved proxies are rebound to the values
themselves (:func:`rebind`), as nnsight 0.5 and later does: ``h = model.layer1.output.save()`` leaves a tensor in
``h``, so ``isinstance(h, torch.Tensor)``, ``np.asarray(h)``, ``torch.save(h)`` and plotting libraries see one. The
values answer ``.value`` too (graph-era code): a tensor becomes a :class:`SavedTensor` (a ``torch.Tensor``
subclass sharing its storage, whose operations return plain tensors and which pickles as a plain tensor), other
values an instance of a subclass of their type with a ``value`` property (:func:`saved_value`). Saved proxies
appended to a list or stored in a dict that a name holds are replaced there too (looking from the end: the block
appended them last). Proxies held anywhere else stay proxies, which behave as their values after the block.

Inside a block, ``list().save()``, ``dict().save()`` and ``set().save()`` make a container that lives in the
graph (as ``ic.list()``), filled as the model runs and a plain container after the block. Built-in types have no
``save``: it is added to them while a block is open, by the outermost block's ``__enter__``, and removed by its
``__exit__`` (:func:`open_block`, :func:`close_block`), so it never exists outside a block.
"""

from __future__ import annotations

import builtins
import ctypes
import gc
import sys
import threading
import types
import weakref
from typing import Any

import torch

from ..errors import InterventionError
from ..ir import Op
from .current import current_tracer
from .proxy import Proxy


class SavedTensor(torch.Tensor):
    """A saved tensor after its block: a ``torch.Tensor`` (the same storage and autograd history) that also
    answers ``.value``, for graph-era code. Operations on it return plain tensors; it pickles as a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @property
    def value(self) -> SavedTensor:
        """Itself (graph-era code reads saved values through ``.value``)."""
        return self

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __repr__(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # printed as a tensor
        return _TENSOR_REPR(self.as_subclass(torch.Tensor), *args, **kwargs)


_TENSOR_REPR: Any = torch.Tensor.__repr__


def _value(self: Any) -> Any:
    """Itself (graph-era code reads saved values through ``.value``)."""
    return self


def _plain_value(self: Any) -> Any:
    """The value itself, of its own type (this object is a copy of it that also answers ``.value``)."""
    return self.__dict__["_plain"]


def _copy_reduce(self: Any, protocol: int = 2) -> Any:
    """Pickle (and copy) as the original built-in type: loading needs nothing of this package."""
    base = type(self).__mro__[1]
    return (base, (base(self),))


def _swapped_reduce(self: Any, protocol: int = 2) -> Any:
    """Pickle (and copy) as the original class: reduced while the object is of that class again."""
    made = type(self)
    self.__class__ = made.__mro__[1]
    try:
        return self.__reduce_ex__(protocol)
    finally:
        self.__class__ = made


# values whose type can be subclassed and rebuilt from the value (a copy); other objects have their class swapped
_BUILT_FROM_COPY = (int, float, complex, str, bytes, tuple, list, dict, set, frozenset, torch.Size)
_SAVED_TYPES: dict[type, type | None] = {}


def _saved_type(cls: type) -> type | None:
    made = _SAVED_TYPES.get(cls)
    if made is None and cls not in _SAVED_TYPES:
        try:
            copied = cls in _BUILT_FROM_COPY
            attrs: dict[str, Any] = {
                "value": property(_plain_value if copied else _value),
                "__module__": cls.__module__,
            }
            attrs["__reduce_ex__"] = _copy_reduce if copied else _swapped_reduce
            if issubclass(cls, torch.Tensor):  # its operations keep returning what they returned
                attrs["__torch_function__"] = cls.__torch_function__
            made = type(cls.__name__, (cls,), attrs)
            made.__qualname__ = cls.__qualname__
        except TypeError:  # not subclassable (bool, NoneType, final C types)
            made = None
        _SAVED_TYPES[cls] = made
    return made


def saved_value(value: Any, alias: bool = False) -> Any:
    """``value`` as a saved name holds it after the block: itself, answering ``.value`` (see the module docstring),
    or :data:`NO_VALUE_ATTRIBUTE` when ``.value`` cannot be added to it (``None``, a bool, an object whose class
    cannot change): the name then keeps its proxy, which behaves as the value."""
    cls = type(value)
    if alias and isinstance(value, torch.Tensor):  # a model's own weight: never change its class
        return value.as_subclass(SavedTensor)
    if cls is torch.Tensor:
        if value.is_leaf and value.requires_grad:  # a tensor trained or read for its .grad: keep the object
            value.__class__ = SavedTensor
            return value
        return value.as_subclass(SavedTensor)  # an alias: the model's (or the user's) tensor is left as it is
    if cls is SavedTensor or isinstance(getattr(cls, "value", None), property):
        return value  # saved already (a value saved twice, or by two blocks)
    made = _saved_type(cls) if (cls in _BUILT_FROM_COPY or isinstance(value, torch.Tensor)) else None
    if made is None:
        return NO_VALUE_ATTRIBUTE
    if cls in _BUILT_FROM_COPY:
        copy = made(value)
        copy.__dict__["_plain"] = value
        return copy
    if not isinstance(value, torch.Tensor):
        # another object (an HF ModelOutput, a CacheEntry): its proxy stands for it, so that `.value` is the
        # object of its own class
        return NO_VALUE_ATTRIBUTE
    try:
        value.__class__ = made  # a Parameter (or tensor subclass): the object itself, as optimizers hold it
    except TypeError:
        return NO_VALUE_ATTRIBUTE
    return value


NO_VALUE_ATTRIBUTE = object()


def _owned(value: Any, owners: tuple) -> bool:
    return type(value) is Proxy and value._tracer in owners


def _resolved(proxy: Proxy, memo: dict) -> Any:
    """The proxy's saved value, or the proxy itself when it has none (reading it then says why). A container
    made by ``list().save()`` (modern code, which never reads ``.value``) is the plain container."""
    key = id(proxy)
    if key in memo:
        return memo[key]
    try:
        value = proxy.value
    except InterventionError:
        memo[key] = proxy
        return proxy
    if proxy._id in _PLAIN.get(proxy._tracer, ()):
        memo[key] = value
        return value
    saved = saved_value(value, alias=isinstance(value, torch.Tensor) and _of_a_model(value, proxy._tracer))
    memo[key] = result = proxy if saved is NO_VALUE_ATTRIBUTE else saved
    return result


def _of_a_model(value: torch.Tensor, owner: Any) -> bool:
    """Is ``value`` a parameter or buffer of the model ``owner`` (a tracer, or a session's) traced?"""
    if not (value.is_leaf and (value.requires_grad or isinstance(value, torch.nn.Parameter))):
        return False  # the cheap common case: an activation
    models = [t.model for t in getattr(owner, "_tracers", ())] + [getattr(owner, "model", None)]
    for model in models:
        module = getattr(model, "_module", None)
        if isinstance(module, torch.nn.Module):
            if any(t is value for t in module.parameters()) or any(t is value for t in module.buffers()):
                return True
    return False


def rebind(frame: types.FrameType | None, owners: tuple) -> None:
    """Replace every saved proxy of ``owners`` (a tracer, or a session and its traces) among ``frame``'s variables,
    and at the end of the lists and dicts they hold, with its saved value (see the module docstring)."""
    if frame is None:
        return
    names = frame.f_locals  # a module's or class body's own dict; a snapshot of a function's fast locals
    changed: dict[str, Any] = {}
    memo: dict[int, Any] = {}  # one saved value per proxy (two names for one proxy hold one object)
    for name, value in names.items():
        t = type(value)
        if t is Proxy:
            if value._tracer in owners:
                changed[name] = _resolved(value, memo)
        elif t is builtins.list:
            i = len(value) - 1
            while i >= 0 and _owned(value[i], owners):
                value[i] = _resolved(value[i], memo)
                i -= 1
        elif t is builtins.dict and value:
            for key in reversed(value):
                item = value[key]
                if not _owned(item, owners):
                    break
                value[key] = _resolved(item, memo)
    if names is frame.f_globals or not frame.f_code.co_flags & _CO_OPTIMIZED or sys.version_info >= (3, 13):
        names.update(changed)  # the frame's real namespace, or (3.13+, PEP 667) a view that writes through
        return
    if changed:
        names.update(changed)
        _locals_to_fast(ctypes.py_object(frame), ctypes.c_int(0))
    # Before 3.13 a function's f_locals is a dict cached on the frame, refreshed only when read again: left
    # filled, it would keep every local alive (a model the function deletes, say) until the next read.
    names.clear()


_CO_OPTIMIZED = 0x0001  # a function's frame: its locals live in fast slots, f_locals is a copy
if sys.version_info < (3, 13):
    _locals_to_fast = ctypes.pythonapi.PyFrame_LocalsToFast
    _locals_to_fast.argtypes = [ctypes.py_object, ctypes.c_int]
    _locals_to_fast.restype = None


# -- `.save()` on built-in containers, while a block is open ----------------------------------------------------
def save_container(self: Any) -> Any:
    """``[].save()`` / ``{}.save()`` / ``set().save()`` inside a block: a container of the graph (``ic.list()``),
    saved, holding this one's items; a plain container after the block."""
    tracer = current_tracer()
    if tracer is None or tracer._finished:  # another thread's block is open: not ours to record into
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'save'")
    made = tracer._record(Op.CALL, type(self), (self,) if self else ())
    plain = _PLAIN.get(tracer)
    if plain is None:
        plain = _PLAIN[tracer] = builtins.set()
    plain.add(made._id)
    return made.save()


# tracer -> ids of the containers `list().save()` made in its block (rebound as plain containers)
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_PATCHED = (builtins.list, builtins.dict, builtins.set)
_open = 0
_lock = threading.Lock()
_type_modified = ctypes.pythonapi.PyType_Modified
_type_modified.argtypes = [ctypes.py_object]
_type_modified.restype = None


def _type_dict(cls: type) -> dict:
    """The real (writable) dict behind ``cls.__dict__`` of a built-in type."""
    return gc.get_referents(cls.__dict__)[0]


def open_block() -> None:
    """A block opens: the outermost one gives the built-in containers a ``save`` method."""
    global _open
    with _lock:
        _open += 1
        if _open == 1:
            for cls in _PATCHED:
                _type_dict(cls)["save"] = save_container
                _type_modified(cls)


def close_block() -> None:
    """A block closes: the outermost one takes the ``save`` method away again."""
    global _open
    with _lock:
        _open -= 1
        if _open == 0:
            for cls in _PATCHED:
                _type_dict(cls).pop("save", None)
                _type_modified(cls)


__all__ = ["SavedTensor", "close_block", "open_block", "rebind", "save_container", "saved_value"]
