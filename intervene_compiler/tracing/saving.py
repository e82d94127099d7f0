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
``save``: the first block opened gives them one (:func:`open_block`; importing the package changes nothing) that
acts only inside an open block of the same thread or task, and anywhere else raises the AttributeError Python
would (``hasattr([], "save")`` is False outside blocks; ``dir(list)`` does list it).
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
        if value.requires_grad:  # a tensor trained, or whose .grad is read (retain_grad): keep the object
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
    done = memo.get(key, _MISSING)
    if done is not _MISSING:
        return done
    tracer = proxy._tracer
    results = tracer._results
    value = results.get(proxy._id, _MISSING) if results else _MISSING  # (a session's trace: the session's)
    if value is _MISSING:
        try:
            value = proxy.value  # not among the results: this raises and says why
        except InterventionError:
            memo[key] = proxy
            return proxy
    if type(value) is torch.Tensor and not value.requires_grad:  # the common case: an activation
        if sys.getrefcount(value) <= _HELD_BY_RESULTS_ONLY and not _weakrefs(value):
            # no one but this block's results holds it (a fresh activation): it becomes the saved tensor itself,
            # and nobody can see its class change (an alias made per trace costs a loop of small traces ~2.5 us)
            value.__class__ = SavedTensor
            memo[key] = value
            return value
        alias = value.as_subclass(SavedTensor)  # the model's, the user's or a cache's tensor: left as it is
        memo[key] = alias
        return alias
    if proxy._id in tracer.__dict__.get("_plain_containers", ()):
        memo[key] = value
        return value
    saved = saved_value(value, alias=isinstance(value, torch.Tensor) and _of_a_model(value, tracer))
    memo[key] = result = proxy if saved is NO_VALUE_ATTRIBUTE else saved
    return result


_MISSING = object()
_weakrefs = weakref.getweakrefcount


def _count_held(results: dict, key: int) -> int:
    """``sys.getrefcount`` of ``results[key]`` read as :func:`_resolved` reads it (the same shape of code)."""
    value = results.get(key, _MISSING) if results else _MISSING
    return sys.getrefcount(value)


# What _resolved's refcount reads for a value that only the results dict holds: calibrated on this interpreter
# (what a local and an argument add to the count is the interpreter's business, not ours)
_HELD_BY_RESULTS_ONLY = _count_held({0: object()}, 0)


def _of_a_model(value: torch.Tensor, owner: Any) -> bool:
    """Is ``value`` a parameter or buffer of the model ``owner`` (a tracer, or a session's) traced?"""
    if not isinstance(value, torch.nn.Parameter) and not (value.requires_grad and value.is_leaf):
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
        elif t is _list:
            i = len(value) - 1
            while i >= 0 and _owned(value[i], owners):
                value[i] = _resolved(value[i], memo)
                i -= 1
        elif t is _dict and value:
            for key in reversed(value):
                item = value[key]
                if not _owned(item, owners):
                    break
                value[key] = _resolved(item, memo)
    if _WRITES_THROUGH or not frame.f_code.co_flags & _CO_OPTIMIZED:
        names.update(changed)  # the frame's real namespace (a module's, a class body's), or a view (3.13+)
        return
    if changed:
        names.update(changed)
        _locals_to_fast(ctypes.py_object(frame), _KEEP_UNBOUND)
    # Before 3.13 a function's f_locals is a dict cached on the frame, refreshed only when read again: left
    # filled, it would keep every local alive (a model the function deletes, say) until the next read.
    names.clear()


_list, _dict = builtins.list, builtins.dict  # (read once, not per local per trace)
_CO_OPTIMIZED = 0x0001  # a function's frame: its locals live in fast slots, f_locals is a copy
_WRITES_THROUGH = sys.version_info >= (3, 13)  # PEP 667: a function's f_locals is a view that writes through
if not _WRITES_THROUGH:
    _locals_to_fast = ctypes.pythonapi.PyFrame_LocalsToFast
    _locals_to_fast.argtypes = [ctypes.py_object, ctypes.c_int]
    _locals_to_fast.restype = None
_KEEP_UNBOUND = ctypes.c_int(
    0
)  # PyFrame_LocalsToFast's `clear`: names missing from the dict stay as they are


# -- `.save()` on built-in containers, while a block is open ----------------------------------------------------
def save_container(self: Any) -> Any:
    """``[].save()`` / ``{}.save()`` / ``set().save()`` inside a block: a container of the graph (``ic.list()``),
    saved, holding this one's items; a plain container after the block."""
    tracer = current_tracer()
    if tracer is None or tracer._finished:  # another thread's block is open: not ours to record into
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'save'")
    made = tracer._record(Op.CALL, type(self), (self,) if self else ())
    # the ids of the containers `list().save()` made in this block: rebound as plain containers
    plain = tracer.__dict__.setdefault("_plain_containers", builtins.set())
    plain.add(made._id)
    return made.save()


class _SaveMethod:
    """``save`` on ``list``, ``dict`` and ``set``: inside an open block of this thread (or task) the bound
    :func:`save_container`; anywhere else an AttributeError, exactly as if there were no such attribute
    (``hasattr([], "save")`` is False, ``[].save()`` raises as Python does)."""

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        tracer = current_tracer()
        if obj is None or tracer is None or tracer._finished:
            name = (cls or type(obj)).__name__
            raise AttributeError(f"'{name}' object has no attribute 'save'")
        return types.MethodType(save_container, obj)


_PATCHED = (builtins.list, builtins.dict, builtins.set)
_installed = False
_lock = threading.Lock()


def open_block() -> None:
    """A block opens: the first one ever gives ``list``, ``dict`` and ``set`` their ``save`` (inert outside
    blocks, see :class:`_SaveMethod`). Adding an attribute to a built-in type invalidates the type caches of it
    and all its subclasses, which costs a loop of small traces about 7 us per trace when done at every block's
    enter and exit: so it is added once, and acts only inside blocks."""
    global _installed
    if _installed:
        return
    with _lock:
        if not _installed:
            descriptor = _SaveMethod()
            for cls in _PATCHED:
                gc.get_referents(cls.__dict__)[0]["save"] = descriptor  # the type's real dict
                _type_modified(cls)
            _installed = True


_type_modified = ctypes.pythonapi.PyType_Modified
_type_modified.argtypes = [ctypes.py_object]
_type_modified.restype = None


__all__ = ["SavedTensor", "open_block", "rebind", "save_container", "saved_value"]
