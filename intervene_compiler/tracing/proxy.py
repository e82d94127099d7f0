"""Proxy: a value that exists only when the model runs. Every operation on it records a node.

Inside a tracing block a Proxy records torch functions (through ``__torch_function__``), tensor methods, Python
operators, indexing and attribute access. After the block has run, a saved Proxy behaves as its value: printing,
indexing, operators, torch functions and attribute access all act on ``.value``.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ProxyControlFlowError, TracingError, user_location
from ..ir import Op

if TYPE_CHECKING:
    from .recorder import Recorder
    from .session import Session
    from .tracer import Tracer

_CONTROL_FLOW_HINT = {
    "bool": "use `with tracer.cond(value):` for a branch, or `torch.where(cond, a, b)` for an elementwise choice",
    "int": "keep it a tensor (index with a tensor, e.g. `x[:, idx]`), or wrap the code in `ic.apply(fn, value)`",
    "float": "keep it a tensor, or wrap the code that needs a Python number in `ic.apply(fn, value)`",
    "iter": "index it explicitly (`value[0]`, `value[:, i]`), or wrap the loop in `ic.apply(fn, value)`",
    "len": "use `value.shape[0]` (available inside the block) or `ic.apply(len, value)`",
    "index": "index with a tensor instead of a Python int, or wrap the code in `ic.apply(fn, value)`",
}


def _control_flow_error(kind: str, what: str) -> ProxyControlFlowError:
    return ProxyControlFlowError(
        f"{what} needs the value, but inside a tracing block it does not exist yet "
        "(the model runs when the block exits)",
        user_location(),
        _CONTROL_FLOW_HINT[kind],
    )


def _same(value: Any) -> Any:
    """What an unpickled (or copied) saved proxy becomes: its value."""
    return value


class Proxy:
    """A deferred value: node ``_id`` of tracer ``_tracer`` (or a not yet recorded attribute of ``_base``).

    ``_tracer`` is the :class:`~.recorder.Recorder` that recorded it: a tracer, or a session for a session value.
    """

    __slots__ = ("_tracer", "_id", "_base", "_attr")

    def __init__(
        self, tracer: Recorder, node_id: int | None, base: Proxy | None = None, attr: str | None = None
    ):
        _set_tracer(self, tracer)  # the slots' own setters (__setattr__ is overridden)
        _set_id(self, node_id)
        _set_base(self, base)
        _set_attr(self, attr)

    # -- identity -------------------------------------------------------------------------------------------
    def _node_id(self) -> int:
        """The node this proxy stands for, recording a pending attribute access first if needed."""
        nid = self._id
        if nid is None:
            proxy = self._tracer._record(Op.GETATTR, self._attr, (self._base,))
            nid = proxy._id
            _set_id(self, nid)
        return nid

    def _live(self) -> bool:
        return not self._tracer._finished

    @property
    def value(self) -> Any:
        """The value this proxy took when the model ran (only for saved values, after the block)."""
        return self._tracer._value_of(self)

    def save(self) -> Proxy:
        """Keep this value after the block exits; returns the proxy itself."""
        tracer = self._tracer
        if not tracer._finished:  # self._live()
            tracer._save(self)
        return self

    def stop(self) -> None:
        """End the forward pass as soon as this value is computed."""
        self._tracer._record(Op.STOP, "user", (self,))

    # -- shape information from fake tensors -------------------------------------------------------------------
    @property
    def shape(self):
        return self._tracer._meta(self, "shape")

    @property
    def dtype(self):
        return self._tracer._meta(self, "dtype")

    @property
    def device(self):
        return self._tracer._meta(self, "device")

    @property
    def ndim(self):
        return self._tracer._meta(self, "ndim")

    # -- gradients -------------------------------------------------------------------------------------------
    @property
    def grad(self):
        if not self._live():
            return self.value.grad
        return self._tracer._record(Op.GRAD, None, (self,))

    @grad.setter
    def grad(self, value):
        if not self._live():
            self.value.grad = value
            return
        self._tracer._record(Op.SET_GRAD, None, (self, value))

    def backward(self, *args, **kwargs):
        """Record ``value.backward(...)``; also usable as ``with loss.backward(): ...``."""
        if not self._live():
            return self.value.backward(*args, **kwargs)
        from .contexts import BackwardContext

        if args:
            kwargs = {"gradient": args[0], **kwargs}
        proxy = self._tracer._record(Op.BACKWARD, None, (self,), kwargs)
        return BackwardContext(self._tracer, proxy._id)

    # -- pickling and copying -------------------------------------------------------------------------------
    def __reduce_ex__(self, protocol):
        """Inside the block there is no value to pickle or copy (an error naming the line); after it, a saved
        proxy pickles (and copies) as its value."""
        if self._live():
            raise TracingError(
                "a value inside a tracing block cannot be pickled or copied: it does not exist until the model "
                "runs",
                user_location(),
                "save it (`h = value.save()`) and pickle or copy `h` after the block",
            )
        return (_same, (self.value,))

    # -- attribute access -----------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if not self._tracer._finished:
            return Proxy(self._tracer, None, self, name)
        return getattr(self.value, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Proxy.__slots__:
            object.__setattr__(self, name, value)
        elif name == "grad":
            # the property's setter (mypy sees a property with a setter, read on the class, as an overload)
            Proxy.grad.fset(self, value)  # type: ignore[attr-defined]
        elif not self._live():
            setattr(self.value, name, value)
        else:
            self._tracer._record(Op.SETATTR, name, (self, value))

    def __call__(self, *args, **kwargs):
        if not self._live():
            return self.value(*args, **kwargs)
        if self._id is None:  # a method: x.sum(dim=0)
            return self._tracer._record(Op.METHOD, self._attr, (self._base, *args), kwargs)
        return self._tracer._record(Op.METHOD, "__call__", (self, *args), kwargs)

    # -- indexing --------------------------------------------------------------------------------------------
    def __getitem__(self, index):
        if not self._live():
            return self.value[_unwrap(index)]
        return self._tracer._record(Op.GETITEM, None, (self, index))

    def __setitem__(self, index, value) -> None:
        if not self._live():
            self.value[_unwrap(index)] = _unwrap(value)
            return
        self._tracer._record(Op.SETITEM, None, (self, index, value))

    # -- torch functions -------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = _find_live_tracer(args, kwargs)
        if tracer is None:
            return func(*_unwrap(args), **_unwrap(kwargs))
        return tracer._record(Op.CALL, func, args, kwargs)

    # -- Python control flow needs a value that does not exist yet ---------------------------------------------
    def __bool__(self) -> bool:
        if self._live():
            raise _control_flow_error(
                "bool", "Using a traced value as a condition (`if`, `while`, `and`, `or`)"
            )
        return bool(self.value)

    def __int__(self) -> int:
        if self._live():
            raise _control_flow_error("int", "`int()` of a traced value")
        return int(self.value)

    def __float__(self) -> float:
        if self._live():
            raise _control_flow_error("float", "`float()` of a traced value")
        return float(self.value)

    def __index__(self) -> int:
        if self._live():
            raise _control_flow_error("index", "Using a traced value as a Python index")
        return operator.index(self.value)

    def __iter__(self):
        if self._live():
            raise _control_flow_error("iter", "Iterating over a traced value (`for x in value`, unpacking)")
        return iter(self.value)

    def __len__(self) -> int:
        if self._live():
            raise _control_flow_error("len", "`len()` of a traced value")
        return len(self.value)

    def __contains__(self, item) -> bool:
        if self._live():
            raise _control_flow_error("bool", "`in` on a traced value")
        return _unwrap(item) in self.value

    # -- printing --------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        if self._live():
            return self._tracer._describe(self)
        return repr(self.value)

    def __str__(self) -> str:
        if self._live():
            return self._tracer._describe(self)
        return str(self.value)

    def __format__(self, spec: str) -> str:
        if self._live():
            return format(str(self), spec)
        return format(self.value, spec)

    __hash__ = object.__hash__


def _find_live_tracer(args, kwargs) -> Tracer | Session | None:
    stack = [args, kwargs]
    while stack:
        v = stack.pop()
        if isinstance(v, Proxy):
            if v._live():
                return v._tracer
        elif type(v) in (tuple, list):
            stack.extend(v)
        elif type(v) is dict:
            stack.extend(v.values())
        elif type(v) is slice:
            stack.extend((v.start, v.stop, v.step))
    return None


def _unwrap(v: Any) -> Any:
    """Replace finished proxies by their values, recursively through containers."""
    t = type(v)
    if t is Proxy:
        return v.value
    if t is tuple or t is list:
        return t(_unwrap(x) for x in v)
    if t is dict:
        return {k: _unwrap(x) for k, x in v.items()}
    if t is slice:
        return slice(_unwrap(v.start), _unwrap(v.stop), _unwrap(v.step))
    return v


def _binary(fn, reflected: bool = False):
    def method(self, other):
        if not self._live():
            a, b = self.value, _unwrap(other)
            return fn(b, a) if reflected else fn(a, b)
        args = (other, self) if reflected else (self, other)
        return self._tracer._record(Op.CALL, fn, args)

    return method


def _unary(fn):
    def method(self):
        if not self._live():
            return fn(self.value)
        return self._tracer._record(Op.CALL, fn, (self,))

    return method


_BINARY = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
    "and", "or", "xor", "lshift", "rshift",
)  # fmt: skip
for _name in _BINARY:
    _fn = getattr(operator, _name + "_" if _name in ("and", "or") else _name)
    setattr(Proxy, f"__{_name}__", _binary(_fn))
    setattr(Proxy, f"__r{_name}__", _binary(_fn, reflected=True))
    setattr(Proxy, f"__i{_name}__", _binary(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(Proxy, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(getattr(operator, _name)))
# __eq__ above would otherwise drop hashing (re-set on purpose after the class body, hence the ignore)
Proxy.__hash__ = object.__hash__  # type: ignore[method-assign,assignment]
_set_tracer, _set_id, _set_base, _set_attr = (Proxy.__dict__[name].__set__ for name in Proxy.__slots__)
_new_object = object.__new__


def new_proxy(tracer: Recorder, node_id: int) -> Proxy:
    """``Proxy(tracer, node_id)``, without the call of ``__init__`` (tracers make one per recorded value)."""
    proxy = _new_object(Proxy)
    _set_tracer(proxy, tracer)
    _set_id(proxy, node_id)
    _set_base(proxy, None)
    _set_attr(proxy, None)
    return proxy


def _install_einops_backend() -> None:
    """Let einops functions take proxies, through einops' own backend plugin mechanism (no patching)."""
    try:
        from einops._backends import TorchBackend
    except ImportError:  # einops is optional at runtime
        return

    class ProxyEinopsBackend(TorchBackend):
        framework_name = "intervene_compiler"

        def is_appropriate_type(self, tensor) -> bool:
            return isinstance(tensor, Proxy)

        def shape(self, x):
            return tuple(x.shape)

        def is_float_type(self, x) -> bool:
            return x.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16)

        def stack_on_zeroth_dimension(self, tensors: list):
            return torch.stack(tensors)

    globals()["ProxyEinopsBackend"] = ProxyEinopsBackend


_install_einops_backend()
