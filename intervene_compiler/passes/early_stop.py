"""Early-stop truncation: end the forward pass once every intervention has run.

Appends ``STOP("truncate")`` ordered after every sink of the graph. The eager backend then stops the model right
after the last module any node needs (the layers after it are never computed); the compiled backend cuts the
traced program there. Skipped when the caller needs the model's own output, when the graph caches every module,
when it already ends in a stop, or when it reads no module at all.
"""

from __future__ import annotations

from ..ir import NO_FACTS, Graph, ModelFacts, Node, Op
from ..ir.nodes import walk_nodes
from ._base import PassResult


def truncate_after_last_use(graph: Graph, facts: ModelFacts = NO_FACTS) -> PassResult:
    nodes = graph.nodes
    if graph.needs_output or not nodes:
        return PassResult(graph, False)
    ops = {n.op for n in nodes}
    if Op.CACHE in ops or not ops & {Op.SITE, Op.SET, Op.UPDATE, Op.ITER}:  # ITER bodies read modules too
        return PassResult(graph, False)
    users = graph.users()
    sinks = tuple(n.id for n in nodes if not users[n.id])
    if len(sinks) == 1 and nodes[-1].op is Op.STOP and not nodes[-1].guards:
        return PassResult(graph, False)
    last = max(n.id for n in walk_nodes(nodes))  # ids are unique across nested graphs (ITER bodies) too
    stop = Node(id=last + 1, op=Op.STOP, target="truncate", after=sinks)
    return PassResult(graph.replace(nodes=nodes + (stop,)), True)
