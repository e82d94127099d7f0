"""Dead-value elimination: keep only what feeds a save, a set, a log, a stop, a backward, a visible mutation or a
call that may act.

A mutation (setitem, in-place method, list append) is kept when the object it changes is visible: a module's
activation, a gradient, a runtime param, or any value some kept node reads. A mutation of a value that was created
fresh inside the graph (``ic.list()``, ``.clone()``, ``torch.zeros``) and that nothing kept reads is dead with it.
A call of a function that is not known to be pure (``ic.apply(seen.append, h)``, a user's function: it may act
through its arguments or the world) is kept even when nothing reads its result, as Python would run it.
"""

from __future__ import annotations

from ..ir import NO_FACTS, Graph, ModelFacts, Node, Op, Ref, is_mutation, is_pure
from ._base import PassResult

_ROOTS = frozenset({Op.SAVE, Op.SET, Op.SET_GRAD, Op.LOG, Op.STOP, Op.BACKWARD, Op.CACHE, Op.UPDATE, Op.ITER})
_FRESH_METHODS = frozenset(
    {"clone", "detach_clone", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
)
_FRESH_CALLS = frozenset(
    {
        "list",
        "dict",
        "set",
        "zeros",
        "ones",
        "empty",
        "full",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "rand",
        "randn",
        "randint",
        "rand_like",
        "randn_like",
        "tensor",
        "arange",
        "clone",
    }
)
_VIEW_OPS = frozenset({Op.GETITEM, Op.GETATTR, Op.METHOD})


def eliminate_dead_values(graph: Graph, facts: ModelFacts = NO_FACTS) -> PassResult:
    by_id = {n.id: n for n in graph.nodes}
    mutations_of: dict[int, list[int]] = {}
    live: set[int] = set()
    stack: list[int] = []
    for node in graph.nodes:
        if node.op in _ROOTS or node.op is Op.CALL and not is_pure(node.target):
            stack.append(node.id)
        elif is_mutation(node):
            root = _alias_root(node, by_id)
            if root is not None and _is_fresh(by_id[root]):
                mutations_of.setdefault(root, []).append(node.id)
            else:
                stack.append(node.id)
    while stack:
        nid = stack.pop()
        if nid in live or nid not in by_id:
            continue
        live.add(nid)
        stack.extend(by_id[nid].deps)
        if by_id[nid].body:  # a nested graph keeps alive every enclosing value it reads
            stack.extend(_outer_reads(by_id[nid]))
        stack.extend(mutations_of.get(nid, ()))
    kept = tuple(n for n in graph.nodes if n.id in live)
    if len(kept) == len(graph.nodes):
        return PassResult(graph, False)
    return PassResult(graph.replace(nodes=kept), True)


def _outer_reads(node: Node) -> list[int]:
    """Ids that ``node``'s nested graphs depend on without defining them (values of the enclosing graph)."""
    out: list[int] = []
    for body in node.body:
        inner = {n.id for n in body.nodes}
        for n in body.nodes:
            out.extend(d for d in n.deps if d not in inner)
            if n.body:
                out.extend(_outer_reads(n))
    return out


def _alias_root(node: Node, by_id: dict[int, Node]) -> int | None:
    """The node whose object ``node`` mutates, following getitem/getattr/method chains back to their base."""
    obj = node.args[0] if node.args else None
    while type(obj) is Ref:
        base = by_id.get(obj.id)
        if base is None or base.op not in _VIEW_OPS or _is_fresh(base) or not base.args:
            return obj.id
        obj = base.args[0]
    return None


def _is_fresh(node: Node) -> bool:
    if node.op is Op.METHOD:
        return node.target in _FRESH_METHODS
    if node.op is Op.CALL:
        return getattr(node.target, "__name__", None) in _FRESH_CALLS
    return False
