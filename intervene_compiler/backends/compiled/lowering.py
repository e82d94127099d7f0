"""Lift runtime values out of a graph's structure so one compiled program serves a whole sweep.

A Python int used as an index (``out[:, pos]``) or a float operand (``out * alpha``, ``x.mean() > t``) would be
a constant in the traced program, so each new value would recompile. This pass replaces them with params: an
index int becomes a 1-element int64 tensor consumed by :func:`take` / :func:`put` (which normalize negative
positions and keep the dimension bookkeeping), a float operand of arithmetic or an ordering comparison becomes a
0-d tensor. Tensor params are program inputs, so sweeping positions, values, scales or thresholds reuses the
program.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ...errors import execution_error
from ...ir import Graph, Node, Op, ParamRef, Ref, Site, format_node
from ...runtime.source import HOOKED, owner_and_call

_ARITHMETIC = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        # comparisons: a threshold in ``tracer.cond(x.mean() > t)`` is a runtime value too
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
    }
)


def take(x: torch.Tensor, index: tuple, lifted: tuple[int, ...]) -> torch.Tensor:
    """``x[index]`` where the positions in ``lifted`` hold 1-element int64 tensors standing for Python ints."""
    for pos in reversed(lifted):
        x = x.index_select(pos, index[pos] % x.shape[pos])
    rest = tuple(slice(None) if i in lifted else v for i, v in enumerate(index))
    x = x[rest]
    for pos in reversed(lifted):
        x = x.squeeze(pos)
    return x


def put(x: torch.Tensor, index: tuple, lifted: tuple[int, ...], value: Any) -> None:
    """``x[index] = value`` in place, with one lifted int position (see :func:`take`)."""
    (pos,) = lifted
    full = index[:pos] + (index[pos] % x.shape[pos],) + index[pos + 1 :]  # no generator: Dynamo inlines this
    if isinstance(value, torch.Tensor) and value.dim() >= x.dim() - pos - 1 and value.dim() > 0:
        value = value.unsqueeze(pos - x.dim())
    x[full] = value


def apply_writes(x: torch.Tensor, writes: tuple) -> torch.Tensor:
    """A fused UPDATE: ``x[index] = value`` for each ``(index, lifted, value)``, in place; returns ``x``."""
    for index, lifted, value in writes:
        if lifted:
            put(x, index, lifted, value)
        else:
            x[index] = value
    return x


# what the IR's ``is_mutation`` reads: these write into their first argument (a site's value, in place)
put.mutates_first_argument = True  # type: ignore[attr-defined]
apply_writes.mutates_first_argument = True  # type: ignore[attr-defined]


def lift_values(graph: Graph, device: torch.device | None = None, ints: list | None = None) -> Graph:
    """Return ``graph`` with index ints and arithmetic float operands turned into tensor params (on ``device``,
    the model's: an index on the CPU cannot index a CUDA activation).

    ``ints``, when given, gets ``(param index, value)`` for every lifted index (an int, or a tuple of token ids):
    the host checks them against the indexed dimension before each compiled call (:func:`index_bounds`), since
    :func:`take` and :func:`put` wrap an index where eager indexing raises.
    """
    params = list(graph.params)
    move = device is not None and device.type != "cpu"

    def new_param(value: torch.Tensor, host: Any = None) -> ParamRef:
        params.append(value.to(device) if move else value)
        if ints is not None and host is not None:
            ints.append((len(params) - 1, host))
        return ParamRef(len(params) - 1)

    nodes = []
    changed = False
    for node in graph.nodes:
        new = _lift_node(node, new_param)
        changed |= new is not node
        nodes.append(new)
    if not changed:
        return graph
    return graph.replace(nodes=tuple(nodes), params=tuple(params))


def _lift_node(node: Node, new_param) -> Node:
    op = node.op
    if op is Op.GETITEM:
        lifted = _liftable(node.args[1], max_ints=4)
        if lifted:
            index, positions = _lift_index(node.args[1], lifted, new_param)
            return _as_call(node, take, (node.args[0], index, positions))
    elif op is Op.SETITEM:
        lifted = _liftable(node.args[1], max_ints=1)
        if lifted:
            index, positions = _lift_index(node.args[1], lifted, new_param)
            return _as_call(node, put, (node.args[0], index, positions, _lift_float(node.args[2], new_param)))
        value = _lift_float(node.args[2], new_param)  # an index of slices only: the value still varies
        if value is not node.args[2]:
            return replace(node, args=(node.args[0], node.args[1], value))
    elif op is Op.UPDATE:
        writes = []
        for index, value in node.args[1]:
            lifted = _liftable(index, max_ints=1)
            if lifted:
                index, lifted = _lift_index(index, lifted, new_param)
            writes.append((index, lifted, _lift_float(value, new_param)))
        return _as_call(node, apply_writes, (node.args[0], tuple(writes)))
    elif op is Op.CALL and getattr(node.target, "lifts_tokens", False) is True:  # last_position's columns
        x, index = node.args
        tokens = index[2]
        one = type(tokens) is int
        picked = (tokens,) if one else tuple(tokens)
        lifted = new_param(torch.tensor(list(picked), dtype=torch.long), picked)
        return replace(node, args=(x, (index[0], -1, None), lifted, one))
    elif op is Op.CALL and node.target in _ARITHMETIC:
        args = tuple(_lift_float(a, new_param) for a in node.args)
        if args != node.args:
            return _as_call(node, node.target, args)
    return node


def _liftable(index: Any, max_ints: int) -> tuple[int, ...]:
    """Positions of Python ints in an index made only of ints and plain slices (else nothing is lifted).

    Only tuple indices (``[:, p]``) are lifted: a bare int indexes tuples, lists and model outputs as often as
    tensors (``attn.output[0]``), and :func:`take` / :func:`put` work on tensors only.
    """
    if type(index) is not tuple:
        return ()
    items = index
    ints = tuple(i for i, v in enumerate(items) if type(v) is int)
    plain = all(type(v) is int or type(v) is slice and _literal_slice(v) for v in items)
    return ints if plain and 0 < len(ints) <= max_ints else ()


def _literal_slice(s: slice) -> bool:
    return all(v is None or type(v) is int for v in (s.start, s.stop, s.step))


def _lift_index(index: Any, positions: tuple[int, ...], new_param) -> tuple[tuple, tuple[int, ...]]:
    items = index if type(index) is tuple else (index,)
    lifted = tuple(
        new_param(torch.tensor([v], dtype=torch.long), v) if i in positions else v
        for i, v in enumerate(items)
    )
    return lifted, positions


def index_bounds(graph: Graph, env: dict, target: Any) -> dict[int, tuple[int, int, int]]:
    """For each lifted index param of ``graph`` (lowered): ``(size, dim, node id)`` of the dimension it indexes,
    read from the schedule's fake values ``env`` (shapes are fixed for a compiled entry). A node the schedule did
    not run (a false condition on a Python value) has none: eager mode does not run it either."""
    bounds: dict[int, tuple[int, int, int]] = {}

    def note(base: Any, index: tuple, positions: tuple[int, ...], nid: int) -> None:
        shape = _shape_of(base, env, graph.params)
        if shape is None:
            return
        for pos in positions:
            p = index[pos]
            if type(p) is ParamRef and pos < len(shape):
                bounds[p.index] = (int(shape[pos]), pos, nid)

    for node in graph.nodes:
        if node.op is not Op.CALL:
            continue
        fn = node.target
        if fn is take or fn is put:
            note(node.args[0], node.args[1], node.args[2], node.id)
        elif fn is apply_writes:
            for index, positions, _ in node.args[1]:
                if positions:
                    note(node.args[0], index, positions, node.id)
        elif getattr(fn, "lifts_tokens", False) is True and type(node.args[2]) is ParamRef:
            linear = fn.ref()
            if linear is not None:
                bounds[node.args[2].index] = (int(linear.out_features), 0, node.id)
    return bounds


def _shape_of(value: Any, env: dict, params: tuple) -> tuple | None:
    if type(value) is Ref:
        value = env.get(value.id)
    elif type(value) is ParamRef:
        value = params[value.index]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_bounds(graph: Graph, ints: Sequence, bounds: dict[int, tuple[int, int, int]]) -> None:
    """Raise, before a compiled call, the IndexError eager indexing raises for a lifted index outside its dimension
    (the compiled take/put would wrap it), at the same user line and with the same type."""
    bad = out_of_bounds(ints, bounds)
    if bad is None:
        return
    nid, message = bad
    node = next(n for n in graph.nodes if n.id == nid)
    error = IndexError(message)
    raise execution_error(error, node.loc, format_node(node)) from error


def out_of_bounds(ints: Sequence, bounds: dict[int, tuple[int, int, int]]) -> tuple[int, str] | None:
    """The first lifted index outside its dimension: ``(node id, the message eager indexing gives)``, else None."""
    for index, value in ints:
        bound = bounds.get(index)
        if bound is None:
            continue
        size, dim, nid = bound
        for v in value if type(value) is tuple else (value,):
            if not -size <= v < size:
                return nid, f"index {v} is out of bounds for dimension {dim} with size {size}"
    return None


def _lift_float(value: Any, new_param) -> Any:
    if type(value) is float:
        return new_param(torch.tensor(value))
    return value


def _as_call(node: Node, fn, args: tuple) -> Node:
    return replace(node, op=Op.CALL, target=fn, args=args)


@dataclass(frozen=True)
class Family:
    """Sites on one member of a ModuleList, lifted so the member index is a runtime input.

    ``prefix`` is the ModuleList's path (``transformer.h``), ``size`` its length, ``param`` the index of the
    1-element int64 param holding the member. In the lowered graph's structure the member's path component is
    ``*``, so every member shares one structure key (and one compiled program).
    """

    prefix: str
    size: int
    param: int
    member: int  # the member the graph that built the program named (its schedule was recorded there)


def lift_family(
    graph: Graph, module: torch.nn.Module, device: torch.device | None = None
) -> tuple[Graph, Family | None]:
    """Give a graph whose sites sit on one member of one ModuleList a runtime member index (see Family).

    Returns the graph unchanged (and None) when the sites touch no ModuleList member, several members, when
    the graph reads gradients (probes are per site), or when a site is a call inside a forward (``.source``: its
    events come from that member's rewritten forward alone).
    """
    members: set[tuple[str, int]] = set()
    for node in graph.nodes:
        if node.op in (Op.GRAD, Op.SET_GRAD, Op.BACKWARD) or node.body:
            return graph, None
        if node.op is Op.MODULE and node.target.endswith(HOOKED):  # an attached module: that member's alone
            return graph, None
        if isinstance(node.target, Site):
            if owner_and_call(node.target.path) is not None:
                return graph, None
            member = _member(node.target.path, module)
            if member is not None:
                members.add(member)
    if len(members) != 1:
        return graph, None
    ((prefix, index),) = members
    container: Any = module.get_submodule(prefix)  # a ModuleList (``_member``)
    size = len(container)
    params = graph.params + (torch.tensor([index], dtype=torch.long, device=device),)
    concrete = f"{prefix}.{index}"

    def wild(site: Site) -> Site:
        if site.path == concrete or site.path.startswith(concrete + "."):
            return Site(prefix + ".*" + site.path[len(concrete) :], site.kind, site.call, site.invoke)
        return site

    nodes = tuple(
        Node(n.id, n.op, wild(n.target), n.args, n.kwargs, n.guards, n.after, n.invoke, n.body, n.loc)
        if isinstance(n.target, Site)
        else n
        for n in graph.nodes
    )
    return graph.replace(nodes=nodes, params=params), Family(prefix, size, len(params) - 1, index)


def _member(path: str, module: torch.nn.Module) -> tuple[str, int] | None:
    """(ModuleList path, index) if ``path`` is inside a member of a ModuleList, else None."""
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit():
            parent = ".".join(parts[:i])
            if isinstance(module.get_submodule(parent), torch.nn.ModuleList):
                return parent, int(parts[i])
    return None
