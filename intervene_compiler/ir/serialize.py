"""Graphs as plain data (JSON-able structure + a list of tensors), with no pickle, and a structural hash.

``to_data``/``from_data`` give the JSON-able form; ``dumps``/``loads`` pack it with the tensors into bytes
(safetensors for tensors). ``structure_key`` hashes the structure with runtime values abstracted: tensors by
dtype and rank (and shape unless ``shapes=False``), so two graphs that differ only in the values they carry share
a key. It is what the compile cache and the remote service key on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

from ..errors import SerializationError, SourceLoc
from .nodes import Graph, InvokeRows, Node, Op, ParamRef, Ref, Site, SiteKind
from .targets import resolve_target, target_name
from .verifier import verify

_SCALARS = (int, float, str, bool, type(None))


def to_data(graph: Graph) -> tuple[dict, list[torch.Tensor]]:
    """The graph as a JSON-able dict plus the tensors it refers to (by position)."""
    tensors: list[torch.Tensor] = []
    return _graph_data(graph, tensors, abstract=False), tensors


def from_data(
    data: dict, tensors: list[torch.Tensor], resolve: Callable[[str], Any] = resolve_target
) -> Graph:
    """Rebuild (and verify) a graph from :func:`to_data`'s output. ``resolve`` turns a callable's name into the
    callable (a server passes its allowlist: ``remote.allowlist.safe_target``)."""
    graph = _graph_from(data, tensors, resolve)
    return verify(graph, where="deserialization")


def dumps(graph: Graph) -> bytes:
    """Serialize to bytes: a length-prefixed JSON header followed by a safetensors blob."""
    from safetensors.torch import save

    data, tensors = to_data(graph)
    header = json.dumps(data, sort_keys=True).encode()
    blob = save({str(i): t.contiguous() for i, t in enumerate(tensors)}) if tensors else b""
    return len(header).to_bytes(8, "little") + header + blob


def loads(payload: bytes) -> Graph:
    from safetensors.torch import load

    n = int.from_bytes(payload[:8], "little")
    data = json.loads(payload[8 : 8 + n])
    blob = payload[8 + n :]
    loaded = load(blob) if blob else {}
    return from_data(data, [loaded[str(i)] for i in range(len(loaded))])


def structure_key(graph: Graph, shapes: bool = True) -> str:
    """A hex digest of the graph's structure with runtime values abstracted (see module docstring)."""
    data = _graph_data(graph, [], abstract=True, shapes=shapes)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def _graph_data(graph: Graph, tensors: list, abstract: bool, shapes: bool = True) -> dict:
    params = [_param_data(p, tensors, abstract, shapes) for p in graph.params]
    return {
        "kind": graph.kind,
        "needs_output": graph.needs_output,
        "invokes": [[r.start, r.stop] for r in graph.invokes] if not abstract else len(graph.invokes),
        "params": params,
        "nodes": [_node_data(n, tensors, abstract, shapes) for n in graph.nodes],
    }


def _param_data(p: Any, tensors: list, abstract: bool, shapes: bool) -> Any:
    if isinstance(p, torch.Tensor):
        if abstract:
            return {
                "tensor": str(p.dtype),
                "shape": list(p.shape) if shapes else p.dim(),
                "grad": p.requires_grad,
            }
        tensors.append(p.detach())
        return {"tensor": len(tensors) - 1, "requires_grad": p.requires_grad}
    if abstract:
        return {"object": type(p).__qualname__}
    return {"value": _value_data(p, tensors, abstract)}


def _node_data(node: Node, tensors: list, abstract: bool, shapes: bool) -> dict:
    target = node.target
    t: dict[str, Any]
    if isinstance(target, Site):
        t = {"site": [target.path, target.kind.value, target.call, target.invoke]}
    elif node.op is Op.CALL:
        name = target_name(target)
        if name is None:
            if abstract:  # local callables still key by identity of their code
                name = f"<local {getattr(target, '__qualname__', type(target).__name__)}@{id(target)}>"
            else:
                raise SerializationError(
                    f"cannot serialize the callable {target!r}: it has no importable name",
                    node.loc,
                    "define it at module level in an importable module, or run the trace locally",
                )
        t = {"fn": name}
    else:
        t = _value_data(target, tensors, abstract)
    out = {
        "id": node.id,
        "op": node.op.value,
        "target": t,
        "args": _value_data(node.args, tensors, abstract),
        "kwargs": [[k, _value_data(v, tensors, abstract)] for k, v in node.kwargs],
    }
    if node.guards:
        out["guards"] = [[g, b] for g, b in node.guards]
    if node.after:
        out["after"] = list(node.after)
    if node.invoke is not None:
        out["invoke"] = node.invoke
    if node.body:
        out["body"] = [_graph_data(g, tensors, abstract, shapes) for g in node.body]
    if node.loc is not None and not abstract:
        out["loc"] = [node.loc.filename, node.loc.lineno, node.loc.function]
    return out


def _value_data(v: Any, tensors: list, abstract: bool) -> Any:
    t = type(v)
    if t is Ref:
        return {"ref": v.id}
    if t is ParamRef:
        return {"param": v.index}
    if t in _SCALARS:
        if t is float and abstract:
            return {"float": None}
        if t is float and (v != v or v in (float("inf"), float("-inf"))):
            return {"float": repr(v)}
        return v
    if t is tuple:
        return {"tuple": [_value_data(x, tensors, abstract) for x in v]}
    if t is list:
        return {"list": [_value_data(x, tensors, abstract) for x in v]}
    if t is dict:
        return {
            "dict": [
                [_value_data(k, tensors, abstract), _value_data(x, tensors, abstract)] for k, x in v.items()
            ]
        }
    if t is slice:
        return {"slice": [_value_data(x, tensors, abstract) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, torch.Tensor):
        if abstract:
            return {"tensor": str(v.dtype), "shape": list(v.shape)}
        tensors.append(v.detach())
        return {"tensor": len(tensors) - 1}
    if isinstance(v, SiteKind):
        return {"sitekind": v.value}
    raise SerializationError(f"cannot serialize a value of type {type(v).__name__}: {v!r}")


def _graph_from(data: dict, tensors: list, resolve: Callable[[str], Any] = resolve_target) -> Graph:
    params = tuple(_param_from(p, tensors) for p in data["params"])
    return Graph(
        nodes=tuple(_node_from(n, tensors, resolve) for n in data["nodes"]),
        params=params,
        invokes=tuple(InvokeRows(a, b) for a, b in data["invokes"]),
        kind=data["kind"],
        needs_output=data["needs_output"],
    )


def _param_from(p: dict, tensors: list) -> Any:
    if "tensor" in p:
        t = _value_from({"tensor": p["tensor"]}, tensors)
        return t.requires_grad_(True) if p.get("requires_grad") else t
    return _value_from(p["value"], tensors)


def _node_from(d: dict, tensors: list, resolve: Callable[[str], Any]) -> Node:
    op = Op(d["op"])
    t = d["target"]
    if isinstance(t, dict) and "site" in t:
        path, kind, call, invoke = t["site"]
        target: Any = Site(path, SiteKind(kind), call, invoke)
    elif isinstance(t, dict) and "fn" in t:
        target = resolve(t["fn"])
    else:
        target = _value_from(t, tensors)
    loc = SourceLoc(*d["loc"]) if "loc" in d else None
    return Node(
        id=d["id"],
        op=op,
        target=target,
        args=_value_from(d["args"], tensors),
        kwargs=tuple((k, _value_from(v, tensors)) for k, v in d["kwargs"]),
        guards=tuple((g, b) for g, b in d.get("guards", ())),
        after=tuple(d.get("after", ())),
        invoke=d.get("invoke"),
        body=tuple(_graph_from(g, tensors, resolve) for g in d.get("body", ())),
        loc=loc,
    )


def _value_from(v: Any, tensors: list) -> Any:
    if not isinstance(v, dict):
        return v
    (key, x), *_ = v.items()
    if key == "ref":
        return Ref(x)
    if key == "param":
        return ParamRef(x)
    if key == "float":
        return float(x)
    if key == "tuple":
        return tuple(_value_from(e, tensors) for e in x)
    if key == "list":
        return [_value_from(e, tensors) for e in x]
    if key == "dict":
        return {_value_from(k, tensors): _value_from(e, tensors) for k, e in x}
    if key == "slice":
        return slice(*(_value_from(e, tensors) for e in x))
    if key == "ellipsis":
        return Ellipsis
    if key == "dtype":
        dtype = getattr(torch, x, None) if isinstance(x, str) else None
        if not isinstance(dtype, torch.dtype):
            raise SerializationError(f"{x!r} is not a torch dtype")
        return dtype
    if key == "device":
        return torch.device(x)
    if key == "size":
        return torch.Size(x)
    if key == "tensor":
        if type(x) is not int or not 0 <= x < len(tensors):
            raise SerializationError(f"tensor reference {x!r} names no tensor of the payload")
        return tensors[x]
    if key == "sitekind":
        return SiteKind(x)
    raise SerializationError(f"unknown value tag {key!r} in serialized graph")


def value_to_data(value: Any, tensors: list[torch.Tensor]) -> Any:
    """One value (a literal, container, tensor, dtype, ...) as JSON-able data, its tensors appended to ``tensors``
    (the remote wire format encodes inputs and results with it)."""
    return _value_data(value, tensors, abstract=False)


def value_from_data(data: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`value_to_data` (raises ``SerializationError`` on a malformed value)."""
    return _value_from(data, tensors)
