"""The IR's invariants, checked after tracing, after every pass and after decoding a serialized graph."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import IRVerificationError
from .nodes import Graph, Node, Op, ParamRef, Ref, Site, SiteKind, map_args, walk_nodes

_ARITY: dict[Op, int] = {
    Op.SET: 1,
    Op.GETATTR: 1,
    Op.SETATTR: 2,
    Op.GETITEM: 2,
    Op.SETITEM: 3,
    Op.UPDATE: 2,
    Op.SAVE: 1,
    Op.COND: 1,
    Op.GRAD: 1,
    Op.SET_GRAD: 2,
    Op.BACKWARD: 1,
    Op.SITE: 0,
    Op.CACHE: 0,
    Op.ITER: 0,
    Op.LOOP: 1,
    Op.EXIT: 0,
}


def verify(
    graph: Graph, outer: frozenset[int] = frozenset(), where: str = "tracing", params: tuple | None = None
) -> Graph:
    """Check ``graph`` and return it unchanged; raise :class:`IRVerificationError` naming ``where``.

    Invariants: ids strictly increase in program order; every dependency names an earlier node of this graph
    or of an enclosing one (``outer``); guards name COND nodes; params and invoke indices are in range (a
    nested graph's ParamRefs index the outermost graph's params: ``params``); each op has its arity and target
    type; an UPDATE's base value has no other reader. In a session graph, the values a TRACE or LOOP body
    computes are visible to the nodes after it (a later trace reads an earlier trace's values), and a TRACE body
    is verified against its own params.
    """
    outermost = params is None
    if params is None:
        params = graph.params
    seen: dict[int, Node] = {}
    visible: set[int] = set()  # values of earlier TRACE/LOOP bodies
    last = None  # ids may be negative: edits are prepended below a trace's ids
    for node in graph.nodes:
        fail = _failer(node, where)
        if last is not None and node.id <= last:
            fail(f"id {node.id} is not greater than the previous id {last}")
        last = node.id
        for dep in node.deps:
            if dep not in seen and dep not in outer and dep not in visible:
                fail(f"depends on %{dep}, which is not an earlier node")
        for guard, _ in node.guards:
            if guard in seen and seen[guard].op is not Op.COND:
                fail(f"is guarded by %{guard}, which is not a cond")
        map_args((node.args, node.kwargs), lambda leaf, fail=fail: _check_param(leaf, params, fail))
        _check_op(node, graph, fail)
        seen[node.id] = node
        if node.body:
            inner_outer = outer | frozenset(seen) | frozenset(visible)
            for sub in node.body:
                verify(sub, inner_outer, where, sub.params if node.op is Op.TRACE else params)
            if node.op in (Op.TRACE, Op.LOOP):
                visible.update(n.id for n in walk_nodes(sub.nodes))
    _check_updates(graph, where)
    if outermost:  # ids are unique across the graph and every nested graph
        _check_unique_ids(graph, where)
    return graph


def _check_unique_ids(graph: Graph, where: str) -> None:
    seen: set[int] = set()
    for node in walk_nodes(graph.nodes):
        if node.id in seen:
            _failer(node, where)(f"reuses id {node.id} (ids are unique across nested graphs)")
        seen.add(node.id)


def _failer(node: Node, where: str) -> Callable[[str], None]:
    def fail(msg: str) -> None:
        raise IRVerificationError(
            f"invalid graph after {where}: node %{node.id} ({node.op.value}) {msg}", node.loc
        )

    return fail


def _check_param(leaf, params: tuple, fail) -> object:
    if type(leaf) is ParamRef and not 0 <= leaf.index < len(params):
        fail(f"refers to param {leaf.index}, but the graph has {len(params)}")
    return leaf


def _check_op(node: Node, graph: Graph, fail) -> None:
    op = node.op
    want = _ARITY.get(op)
    if want is not None and len(node.args) != want:
        fail(f"has {len(node.args)} args, expected {want}")
    if op in (Op.SITE, Op.SET):
        site = node.target
        if not isinstance(site, Site) or not isinstance(site.kind, SiteKind):
            fail("has no Site target")
        if site.invoke is not None and graph.invokes and not 0 <= site.invoke < len(graph.invokes):
            fail(f"names invoke {site.invoke}, but the graph has {len(graph.invokes)}")
    elif op is Op.CALL and not callable(node.target):
        fail("has a target that is not callable")
    elif op in (Op.METHOD, Op.GETATTR, Op.SETATTR, Op.MODULE) and not isinstance(node.target, str):
        fail("needs a string target")
    elif op is Op.METHOD and not node.args:
        fail("has no receiver")
    elif op is Op.STOP and node.target not in ("user", "truncate"):
        fail(f"has unknown stop kind {node.target!r}")
    elif op is Op.ITER:
        _check_iter(node, fail)
    elif op in (Op.TRACE, Op.LOOP) and len(node.body) != 1:
        fail(f"needs exactly one body graph, has {len(node.body)}")
    elif op is Op.TRACE and type(node.target) is not int:
        fail("needs an int target (the session's model slot)")
    elif op is Op.UPDATE:
        writes = node.args[1]
        if not isinstance(writes, tuple) or not all(isinstance(w, tuple) and len(w) == 2 for w in writes):
            fail("needs a tuple of (index, value) writes")


def _check_iter(node: Node, fail) -> None:
    """An ITER node: one nested body graph and a step selection (None, a tuple of ints, or a slice of ints)."""
    steps = node.target
    if len(node.body) != 1:
        fail(f"needs exactly one body graph, has {len(node.body)}")
    if isinstance(steps, tuple):
        ok = all(type(s) is int and s >= 0 for s in steps)
    elif isinstance(steps, slice):
        ok = all(v is None or type(v) is int and v >= 0 for v in (steps.start, steps.stop, steps.step))
        ok = ok and steps.step != 0
    else:
        ok = steps is None
    if not ok:
        fail(f"has step selection {steps!r}; expected None, a tuple of step indices or a slice of them")


def _check_updates(graph: Graph, where: str) -> None:
    users = graph.users()
    for node in graph.nodes:
        if node.op is Op.UPDATE and type(node.args[0]) is Ref:
            base = node.args[0].id
            others = [u for u in users.get(base, []) if u != node.id]
            if others:
                _failer(node, where)(f"updates %{base}, which is also read by %{others[0]}")
