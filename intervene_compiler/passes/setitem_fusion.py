"""Setitem fusion: in-place setitems on a site's value that nothing else reads become one UPDATE node.

``out = model.h[5].output; out[:, 0] = a; out[:, 1] = b`` records SITE, SETITEM, SETITEM; this pass turns them
into ``UPDATE site(%site, ((idx0, a), (idx1, b)))``, which the eager backend applies in place and the compiled
backend lowers to one functional update (``index_put``/``select_scatter``) that Inductor fuses into the producer.
Only sites whose value has no reader besides the setitems qualify, so no alias can observe the difference.
"""

from __future__ import annotations

from dataclasses import replace

from ..ir import NO_FACTS, Graph, ModelFacts, Node, Op, Ref
from ._base import PassResult


def fuse_setitems(graph: Graph, facts: ModelFacts = NO_FACTS) -> PassResult:
    users = graph.users()
    by_id = {n.id: n for n in graph.nodes}
    fused: dict[int, Node] = {}  # id of the last setitem of a group -> the UPDATE node replacing the group
    removed: set[int] = set()
    for node in graph.nodes:
        if node.op is not Op.SITE:
            continue
        readers = [by_id[u] for u in users[node.id]]
        if not readers or not all(_is_setitem_on(r, node.id) for r in readers):
            continue
        if any(
            node.id in r.refs[1:] for r in readers
        ):  # the value also appears as an index or a written value
            continue
        group = sorted(readers, key=lambda r: r.id)
        group_ids = {r.id for r in group}
        after = tuple(sorted({a for r in group for a in r.after if a not in group_ids}))
        last = group[-1]
        fused[last.id] = Node(
            id=last.id,
            op=Op.UPDATE,
            target=node.target,
            args=(Ref(node.id), tuple((r.args[1], r.args[2]) for r in group)),
            guards=last.guards,
            after=after,
            invoke=last.invoke,
            loc=last.loc,
        )
        if any(r.guards != last.guards for r in group):  # conditional writes keep their own guards: skip
            del fused[last.id]
            continue
        removed |= group_ids - {last.id}
    if not fused:
        return PassResult(graph, False)
    remap = {rid: max(g for g in fused if g >= rid) for rid in removed}
    nodes = []
    for n in graph.nodes:
        if n.id in removed:
            continue
        n = fused.get(n.id, n)
        if any(a in remap for a in n.after):
            n = replace(n, after=tuple(sorted({remap.get(a, a) for a in n.after} - {n.id})))
        nodes.append(n)
    return PassResult(graph.replace(nodes=tuple(nodes)), True)


def _is_setitem_on(node: Node, base: int) -> bool:
    return node.op is Op.SETITEM and type(node.args[0]) is Ref and node.args[0].id == base
