"""The IR pass pipeline: one straight-line function naming each step. The only importer of ``passes``.

Every graph is verified after tracing and after each pass; a failing pass is named in the error.
``IC_DEBUG=2`` prints the graph after each pass.
"""

from __future__ import annotations

import os

from passes import eliminate_dead_values, fuse_setitems, truncate_after_last_use

from .ir import Graph, format_graph, verify

PIPELINE = (
    ("dead_values", eliminate_dead_values),
    ("setitem_fusion", fuse_setitems),
    ("early_stop", truncate_after_last_use),
)


def optimize(graph: Graph, trace: list[tuple[str, Graph]] | None = None) -> Graph:
    """Run every pass in order. ``trace``, if given, receives ``(step name, graph)`` after each step."""
    debug = os.environ.get("IC_DEBUG", "") >= "2"
    graph = verify(graph, where="tracing")
    if trace is not None:
        trace.append(("traced", graph))
    for name, run_pass in PIPELINE:
        result = run_pass(graph)
        graph = verify(result.graph, where=f"pass {name!r}")
        if trace is not None:
            trace.append((name, graph))
        if debug and result.modified:
            print(f"-- after {name}:\n{format_graph(graph)}")
    return graph
