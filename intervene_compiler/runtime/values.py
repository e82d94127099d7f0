"""Value ops of the IR, one function per op, shared by every backend, the session runner and fake-tensor validation.

Ops that touch the running model (SITE, SET, UPDATE's write-back, GRAD, SET_GRAD, STOP, CACHE, MODULE) are
the runner's; everything here only computes on values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..ir import Node, Op, ParamRef, Ref


def resolve(value: Any, lookup: Callable[[int], Any], param: Callable[[int], Any]) -> Any:
    """Replace Ref/ParamRef leaves of an argument structure by their values."""
    t = type(value)
    if t is Ref:
        return lookup(value.id)
    if t is ParamRef:
        return param(value.index)
    if t is tuple:
        return tuple(resolve(v, lookup, param) for v in value)
    if t is list:
        return [resolve(v, lookup, param) for v in value]
    if t is dict:
        return {k: resolve(v, lookup, param) for k, v in value.items()}
    if t is slice:
        return slice(
            resolve(value.start, lookup, param),
            resolve(value.stop, lookup, param),
            resolve(value.step, lookup, param),
        )
    return value


def _call(node: Node, a: tuple, kw: dict) -> Any:
    return node.target(*a, **kw)


def _method(node: Node, a: tuple, kw: dict) -> Any:
    return getattr(a[0], node.target)(*a[1:], **kw)


def _getattr(node: Node, a: tuple, kw: dict) -> Any:
    return getattr(a[0], node.target)


def _setattr(node: Node, a: tuple, kw: dict) -> None:
    setattr(a[0], node.target, a[1])


def _getitem(node: Node, a: tuple, kw: dict) -> Any:
    return a[0][a[1]]


def _setitem(node: Node, a: tuple, kw: dict) -> None:
    a[0][a[1]] = a[2]


def _update(node: Node, a: tuple, kw: dict) -> Any:
    base = a[0]
    for index, value in a[1]:
        base[index] = value
    return base


def _save(node: Node, a: tuple, kw: dict) -> Any:
    return a[0]


class _LogSink(threading.local):
    """Where LOG nodes (``session.log``, ``tracer.log``) write: ``print`` unless this thread set a sink (a remote
    worker sends each line to the job's log)."""

    sink: Callable[[str], None] | None = None


LOG_SINK = _LogSink()


def _log(node: Node, a: tuple, kw: dict) -> None:
    sink = LOG_SINK.sink
    if sink is None:
        print(*a)
    else:
        sink(" ".join(str(x) for x in a))


def _cond(node: Node, a: tuple, kw: dict) -> bool:
    return bool(a[0])


def _backward(node: Node, a: tuple, kw: dict) -> None:
    a[0].backward(**kw)


VALUE_OPS: dict[Op, Callable[[Node, tuple, dict], Any]] = {
    Op.CALL: _call,
    Op.METHOD: _method,
    Op.GETATTR: _getattr,
    Op.SETATTR: _setattr,
    Op.GETITEM: _getitem,
    Op.SETITEM: _setitem,
    Op.UPDATE: _update,
    Op.SAVE: _save,
    Op.LOG: _log,
    Op.COND: _cond,
    Op.BACKWARD: _backward,
}
