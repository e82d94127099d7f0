"""The IR pass pipeline: one straight-line function naming each step. The only importer of ``passes``.

Every graph is verified after tracing and after each pass; a failing pass is named in the error.
``IC_DEBUG=2`` prints the graph after each pass.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from passes import eliminate_dead_values, fuse_setitems, truncate_after_last_use

from .ir import Graph, Node, format_graph, structure_tuple, verify

PIPELINE = (
    ("dead_values", eliminate_dead_values),
    ("setitem_fusion", fuse_setitems),
    ("early_stop", truncate_after_last_use),
)


_memo: OrderedDict[tuple, tuple[tuple[str, tuple[Node, ...]], ...]] = OrderedDict()
_MEMO_SIZE = 512


def optimize(graph: Graph) -> tuple[Graph, tuple[tuple[str, tuple[Node, ...]], ...]]:
    """Run every pass in order; return the optimized graph and ``(step name, nodes)`` after each step.

    Passes read only a graph's structure (ops, targets, literals, which param a node uses), never param values,
    so results are memoized by structure: a loop that traces the same code with new tensors (a sweep, a
    training loop) verifies and optimizes once. Source locations are part of the key, so errors keep naming
    the right line.
    """
    key = (structure_tuple(graph), tuple(n.loc for n in graph.nodes))
    steps = _memo.get(key)
    if steps is None:
        steps = _optimize(graph)
        _memo[key] = steps
        if len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)
    else:
        _memo.move_to_end(key)
    return graph.replace(nodes=steps[-1][1]), steps


def _optimize(graph: Graph) -> tuple[tuple[str, tuple[Node, ...]], ...]:
    debug = os.environ.get("IC_DEBUG", "") >= "2"
    steps = []
    graph = verify(graph, where="tracing")
    steps.append(("traced", graph.nodes))
    for name, run_pass in PIPELINE:
        result = run_pass(graph)
        graph = verify(result.graph, where=f"pass {name!r}")
        steps.append((name, graph.nodes))
        if debug and result.modified:
            print(f"-- after {name}:\n{format_graph(graph)}")
    return tuple(steps)
