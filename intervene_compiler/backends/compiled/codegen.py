"""Straight-line code for plain value nodes of a compiled program: one generated function per node.

Dynamo inlines every Python call a program makes while it traces, at every event: one small function per node
with its arguments written out (``e[3].view(p[0], 2)``) costs it far less than the interpreter's generic
``evaluate`` / ``resolve`` path (recursive, one call per argument leaf). A module of its own: it is code
generation (``eval`` of an expression built from the IR), independent of how the program schedules nodes.
"""

from __future__ import annotations

from typing import Any

from ...ir import Node, Op, ParamRef, Ref
from ...ir.nodes import map_args


def straight_line(node: Node):
    """``node`` as one generated function ``(env, params) -> value`` (``e[3].view(p[0], 2)``), or None.

    Dynamo inlines every Python call a program makes while it traces: one small function per node, with the
    arguments written out, costs it far less than the generic ``evaluate`` / ``resolve`` path (recursive, one call
    per argument leaf). Only ops whose meaning is the plain Python expression: calls, methods, getattr,
    getitem, save.
    """
    consts: list[Any] = []

    def const(value: Any) -> str:
        consts.append(value)
        return f"c[{len(consts) - 1}]"

    def expr(value: Any) -> str:
        t = type(value)
        if t is Ref:
            return f"e[{value.id}]"
        if t is ParamRef:
            return f"p[{value.index}]"
        if t is tuple:
            return "(" + "".join(expr(v) + ", " for v in value) + ")"
        if t is list:
            return "[" + ", ".join(expr(v) for v in value) + "]"
        if t is slice:
            return f"slice({expr(value.start)}, {expr(value.stop)}, {expr(value.step)})"
        if value is None or t is bool or t is int:
            return repr(value)
        if t is dict or t is set:  # a fresh copy per call, as resolve builds one
            return f"{t.__name__}({const(value)})" if not _has_refs(value) else _NO
        return const(value)

    op = node.op
    args = [expr(a) for a in node.args]
    kwargs = [(k, expr(v)) for k, v in node.kwargs]
    if any(not k.isidentifier() for k, _ in kwargs):
        return None
    call = ", ".join(args + [f"{k}={v}" for k, v in kwargs])
    if op is Op.CALL:
        body = f"{const(node.target)}({call})"
    elif op is Op.METHOD and type(node.target) is str and node.target.isidentifier() and args:
        rest = ", ".join(args[1:] + [f"{k}={v}" for k, v in kwargs])
        body = f"{args[0]}.{node.target}({rest})"
    elif op is Op.GETATTR and type(node.target) is str and node.target.isidentifier() and not kwargs:
        body = f"{args[0]}.{node.target}"
    elif op is Op.GETITEM and len(args) == 2 and not kwargs:
        body = f"{args[0]}[{args[1]}]"
    elif op is Op.SAVE and len(args) == 1:
        body = args[0]
    else:
        return None
    if _NO in body:
        return None
    scope = {"slice": slice, "dict": dict, "set": set}
    return eval(f"lambda e, p, c=c: {body}", scope, {"c": tuple(consts)})  # noqa: S307


_NO = "<not straight-line>"


def _has_refs(value: Any) -> bool:
    found = []
    map_args(value, lambda leaf: found.append(leaf) if type(leaf) in (Ref, ParamRef) else None)
    return bool(found)


__all__ = ["straight_line"]
