"""A deterministic text form of a graph: one line per node, params shown by shape, never by address."""

from __future__ import annotations

from typing import Any

import torch

from .nodes import Graph, Node, Op, ParamRef, Ref, Site
from .steps import format_steps
from .targets import display_name


def format_graph(graph: Graph, indent: str = "") -> str:
    """Print ``graph`` one node per line, e.g. ``%3 = call torch.argmax(%2, dim=1)``."""
    lines = []
    head = f"{indent}graph {graph.kind}"
    if graph.invokes:
        head += " invokes=" + ",".join(f"[{r.start}:{r.stop}]" for r in graph.invokes)
    if graph.needs_output:
        head += " needs_output"
    lines.append(head + ":")
    for node in graph.nodes:
        lines.append(indent + "  " + format_node(node, graph))
        for sub in node.body:
            lines.append(format_graph(sub, indent + "    "))
    return "\n".join(lines)


def format_site(node: Node) -> str:
    """The site a node reads or writes as errors name it (``model.layer1.output``); other nodes as printed."""
    return str(node.target) if isinstance(node.target, Site) else format_node(node)


def format_node(node: Node, graph: Graph | None = None) -> str:
    args = ", ".join(_fmt(a, graph) for a in node.args)
    if node.kwargs:
        kw = ", ".join(f"{k}={_fmt(v, graph)}" for k, v in node.kwargs)
        args = f"{args}, {kw}" if args else kw
    op = node.op
    if op is Op.CALL:
        body = f"call {display_name(node.target)}({args})"
    elif op is Op.METHOD:
        recv, _, rest = args.partition(", ")
        body = f"method {recv}.{node.target}({rest})"
    elif op is Op.ITER:
        body = f"iter {format_steps(node.target)}"
    elif op is Op.TRACE:
        body = f"trace model{node.target}({args})"
    elif op is Op.LOOP:
        body = f"loop over {args}"
    elif op is Op.EXIT:
        body = "exit session" if node.target is None else f"exit loop %{node.target}"
    elif op in (Op.SITE, Op.SET, Op.UPDATE, Op.MODULE, Op.CACHE, Op.STOP, Op.GETATTR, Op.SETATTR):
        target = f" {node.target}" if node.target is not None else ""
        body = f"{op.value}{target}" + (f"({args})" if args else "")
    else:
        body = f"{op.value}({args})"
    extras = []
    if node.invoke is not None:
        extras.append(f"invoke={node.invoke}")
    if node.guards:
        extras.append("if " + " and ".join(f"{'' if b else 'not '}%{g}" for g, b in node.guards))
    if node.after:
        extras.append("after " + ",".join(f"%{a}" for a in node.after))
    suffix = ("  # " + "; ".join(extras)) if extras else ""
    return f"%{node.id} = {body}{suffix}"


def _fmt(value: Any, graph: Graph | None) -> str:
    t = type(value)
    if t is Ref:
        return repr(value)
    if t is ParamRef:
        if graph is not None and value.index < len(graph.params):
            p = graph.params[value.index]
            if isinstance(p, torch.Tensor):
                return f"$p{value.index}:{_tensor_type(p)}"
            return f"$p{value.index}:{type(p).__name__}"
        return repr(value)
    if t is tuple:
        inner = ", ".join(_fmt(v, graph) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if t is list:
        return "[" + ", ".join(_fmt(v, graph) for v in value) + "]"
    if t is dict:
        return "{" + ", ".join(f"{k!r}: {_fmt(v, graph)}" for k, v in value.items()) + "}"
    if t is slice:
        parts = [_fmt(p, graph) if p is not None else "" for p in (value.start, value.stop, value.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if value.step is not None else "")
    if value is Ellipsis:
        return "..."
    if isinstance(value, torch.Tensor):  # literal tensors should have been lifted; show them safely anyway
        return f"tensor:{_tensor_type(value)}"
    return repr(value)


def _tensor_type(t: torch.Tensor) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    return f"{dtype}{list(t.shape)}"
