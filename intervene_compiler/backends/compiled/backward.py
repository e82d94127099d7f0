"""What runs after the compiled forward: the backward split of a graph (gradients and host effects).

``split_backward`` separates the nodes that compile (the forward) from those that run on the host after the
compiled call: BACKWARD and what reads gradients (``.grad`` of an activation through a zero *probe* input added at
the site), and *host effects* (appending to a Python container the trace did not create, ``tracer.log``, an
``ic.list()`` only changed and saved), which inside the graph would make Dynamo guard on a container's length.
``host_only_params`` names the params only host effects use (they key the cache by type, not identity).
Gradient *edits* cross back into the backward through the custom op of ``grad_edits.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ...ir import Graph, Node, Op, ParamRef, Ref, is_mutation, is_pure
from ...ir.nodes import map_args


@dataclass
class BackwardSplit:
    """A graph with gradients split into what compiles (the forward) and what runs after ``backward()``.

    ``probes`` maps a SITE node whose ``.grad`` is read to a zero tensor input added to that activation
    (``out + probe``): the probe's gradient is the activation's gradient, inside one graph (no ``retain_grad``).
    ``edits`` maps a SITE node whose gradient is changed (``.grad = ...``, ``.grad[:] = 0``) to a slot of
    :func:`grad_edit`, an identity op whose backward hands the gradient to the host (see ``GradEdits``).
    """

    forward: Graph
    post: tuple[Node, ...] = ()
    probes: dict[int, int] = field(
        default_factory=dict
    )  # SITE node id -> index of its probe among the probes
    needed: tuple[int, ...] = ()  # forward node ids whose values the post nodes read
    edits: dict[int, int] = field(default_factory=dict)  # SITE node id -> grad_edit slot
    # SITE node ids the user made require grad (`.requires_grad = True`; dropped from the forward: the probe does it)
    made_to_require: frozenset[int] = frozenset()


def split_backward(graph: Graph) -> tuple[BackwardSplit | None, str | None]:
    """Split off GRAD/BACKWARD and what depends on them; (None, reason) when that cannot be compiled.

    Host effects go with them: appending a traced value to a Python list (or dict, set) the trace did not create
    (``losses.append(loss)`` on a list from before the trace or from a session) runs after the compiled call.
    Inside the graph it would make Dynamo guard on the list's length and recompile every time it grows.
    ``tracer.log`` is one too: it prints the values after the compiled forward (a graph cannot print).
    """
    ops = {n.op for n in graph.nodes}
    host = _host_effects(graph)
    if Op.GRAD not in ops and Op.BACKWARD not in ops and Op.SET_GRAD not in ops and not host:
        return BackwardSplit(graph), None
    by_id = {n.id: n for n in graph.nodes}
    post: set[int] = set()
    for n in graph.nodes:
        if n.op in _GRAD_OPS or n.id in host or any(d in post for d in n.refs):
            post.add(n.id)
    probes: dict[int, int] = {}
    edits: dict[int, int] = {}
    for n in graph.nodes:
        if n.id in post and n.op in (Op.SITE, Op.SET, Op.UPDATE, Op.STOP, Op.MODULE):
            return None, "the model is read or changed after a backward pass"
        if n.op is Op.GRAD or n.op is Op.SET_GRAD:
            target = by_id.get(n.args[0].id)
            if target is None or target.op is not Op.SITE:
                return None, "only `.grad` of module inputs and outputs is compiled"
            probes.setdefault(target.id, len(probes))
        edited = None
        if n.op is Op.SET_GRAD:
            edited = by_id[n.args[0].id]
        elif is_mutation(n) and type(n.args[0]) is Ref and by_id[n.args[0].id].op is Op.GRAD:
            edited = by_id[by_id[n.args[0].id].args[0].id]  # .grad[...] = v: in place on the gradient
        if edited is not None:
            edits.setdefault(edited.id, len(edits))
    needed = sorted({d for n in graph.nodes if n.id in post for d in n.refs if d not in post})
    # probes make the read activations require grad
    dropped = post | {n.id for n in graph.nodes if n.op is Op.SETATTR and n.target == "requires_grad"}
    forward = []
    for n in graph.nodes:
        if n.id in dropped:
            continue
        if any(a in dropped for a in n.after):  # waiting for a post node means waiting for what it reads
            after = tuple(sorted({a for a in n.after if a not in dropped} | {d for d in needed if d < n.id}))
            n = replace(n, after=after)
        forward.append(n)
    ordered_post = tuple(n for n in graph.nodes if n.id in post)
    forward_graph = graph.replace(nodes=tuple(forward))
    made = frozenset(
        n.args[0].id
        for n in graph.nodes
        if n.op is Op.SETATTR and n.target == "requires_grad" and type(n.args[0]) is Ref
    )
    return BackwardSplit(forward_graph, ordered_post, probes, tuple(needed), edits, made), None


_GRAD_OPS = (Op.GRAD, Op.SET_GRAD, Op.BACKWARD)


def _host_effects(graph: Graph) -> set[int]:
    """LOG nodes, calls of functions that may act (not ``ir.is_pure``) whose result nothing reads, mutations of
    non-tensor params (Python containers) that nothing else in the graph reads, and containers the trace creates
    (``ic.list()``) that it only changes and saves (with those changes and saves)."""
    found: dict[int, int] = {}  # node id -> param index
    read_ids = {d for n in graph.nodes for d in n.refs}
    logs = {
        n.id
        for n in graph.nodes
        if n.op is Op.LOG or n.op is Op.CALL and n.id not in read_ids and not is_pure(n.target)
    } | _own_containers(graph)
    for n in graph.nodes:
        if n.op is Op.METHOD and is_mutation(n) and type(n.args[0]) is ParamRef:
            if not isinstance(graph.params[n.args[0].index], torch.Tensor):
                found[n.id] = n.args[0].index
    if not found:
        return logs
    read: dict[int, int] = {}  # param index -> how many nodes mention it
    for n in graph.nodes:
        for index in _param_indices((n.args, n.kwargs)):
            read[index] = read.get(index, 0) + 1
    per_param: dict[int, int] = {}
    for index in found.values():
        per_param[index] = per_param.get(index, 0) + 1
    return logs | {nid for nid, index in found.items() if read[index] == per_param[index]}


_CONTAINERS = (list, dict, set)


def _own_containers(graph: Graph) -> set[int]:
    """``ic.list()``/``ic.dict()`` made in the trace, their mutations and saves, when nothing else reads them:
    run on the host after the compiled call, like a list from outside the trace (see ``split_backward``), so a
    ``tracer.cond`` on a tensor can skip an append, and the graph does not guard on the container's length."""
    made = {n.id for n in graph.nodes if n.op is Op.CALL and n.target in _CONTAINERS and not n.refs}
    if not made:
        return set()
    uses: dict[int, list[int]] = {c: [] for c in made}
    for n in graph.nodes:
        for d in n.refs:
            if d not in made:
                continue
            first = n.args[0] if n.args else None
            own = type(first) is Ref and first.id == d and n.refs.count(d) == 1
            if own and (n.op is Op.SAVE or n.op is Op.SETITEM or n.op is Op.METHOD and is_mutation(n)):
                uses[d].append(n.id)
            else:
                made.discard(d)
    return {i for c in made for i in (c, *uses[c])}


def host_only_params(graph: Graph) -> frozenset[int]:
    """Indices of the params that only host effects use (see ``_host_effects``)."""
    if not any(n.op is Op.METHOD for n in graph.nodes):
        return frozenset()
    host = _host_effects(graph)
    return frozenset(
        n.args[0].index
        for n in graph.nodes
        if n.id in host and n.op is Op.METHOD and type(n.args[0]) is ParamRef
    )


def _param_indices(value: Any) -> list[int]:
    out: list[int] = []
    map_args(value, lambda leaf: out.append(leaf.index) if type(leaf) is ParamRef else None)
    return out


__all__ = ["BackwardSplit", "host_only_params", "split_backward"]
