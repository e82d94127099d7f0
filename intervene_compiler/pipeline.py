"""The IR pass pipeline: one straight-line function naming each step. The only importer of ``passes``.

Every graph is verified after tracing and after each pass; a failing pass is named in the error.
``IC_DEBUG=2`` prints the graph after each pass.
"""

from __future__ import annotations

import os
import weakref
from functools import partial
from typing import Any

from passes import eliminate_dead_values, fuse_setitems, narrow_to_last_position, truncate_after_last_use

from .ir import Graph, Node, ParamRef, Ref, Site, format_graph, structure_tuple, verify

PIPELINE = (
    ("dead_values", eliminate_dead_values),
    ("setitem_fusion", fuse_setitems),
    ("last_position", narrow_to_last_position),  # needs the model's last position-wise module (or None)
    ("early_stop", truncate_after_last_use),
)


_memo: dict[tuple, tuple[tuple[tuple[str, tuple[Node, ...]], ...], tuple]] = {}
_MEMO_SIZE = 512


def optimize(
    graph: Graph, last_module: str | None = None, unembedding: weakref.ref | None = None
) -> tuple[Graph, tuple[tuple[str, tuple[Node, ...]], ...]]:
    """Run every pass in order; return the optimized graph and ``(step name, nodes)`` after each step.

    Passes read only a graph's structure (ops, targets, literals, which param a node uses), never param values,
    so results are memoized by structure: a loop that traces the same code with new tensors (a sweep, a
    training loop) verifies and optimizes once. Source locations are part of the key, so errors keep naming
    the right line. ``last_module`` is the model's last, position-wise module (a causal LM's unembedding), for
    last-position narrowing; None turns that pass off. ``unembedding``, a weak reference to the model wrapper
    (whose ``_unembedding_module()`` is that Linear), lets the pass compute only the vocabulary columns the
    readers pick; it is part of the memo key (a dead reference equals no live one).
    """
    key = (_memo_key(graph), last_module, unembedding)
    hit = _memo.get(key)
    if hit is None:
        steps = _optimize(graph, last_module, unembedding)
        hit = (steps, tuple(n.loc for n in graph.nodes))  # keeps the locations whose ids are in the key alive
        if len(_memo) >= _MEMO_SIZE:
            del _memo[next(iter(_memo))]  # the oldest entry
        _memo[key] = hit
    return graph.replace(nodes=hit[0][-1][1]), hit[0]


# -- the memo key -------------------------------------------------------------------------------------------------
# What ``structure_tuple`` captures, built to be cheap to hash and compare on every trace: IR leaves (Ref,
# ParamRef, Site) become plain tuples, literals keep their type (``1``, ``1.0`` and ``True`` are equal in Python but
# not as arguments), and source locations count by identity (``errors.user_location`` hands out one SourceLoc
# object per line; the memo entry keeps the traced graph's locations alive, so an id is never reused while its
# entry exists). Private markers keep the encoded forms from colliding with user values.
_REF, _PARAM, _SITE, _LIST, _DICT, _SLICE, _TYPED = (object() for _ in range(7))
_TYPED_LITERALS = frozenset({float, bool, complex})
_KEYED = _TYPED_LITERALS | {tuple, list, dict, slice, Ref, ParamRef, Site}  # types _leaf_key changes


def _memo_key(graph: Graph) -> tuple:
    keyed = _KEYED
    nodes = tuple(
        [
            (
                n.id,
                n.op,
                _leaf_key(n.target) if type(n.target) in keyed else n.target,
                _leaf_key(n.args) if n.args else (),
                _leaf_key(n.kwargs) if n.kwargs else (),
                n.guards,
                n.after,
                n.invoke,
                tuple([structure_tuple(g) for g in n.body]) if n.body else (),
                id(n.loc),
            )
            for n in graph.nodes
        ]
    )
    rows = tuple([(r.start, r.stop) for r in graph.invokes])
    return (nodes, rows, graph.kind, graph.needs_output, len(graph.params))


def _leaf_key(value: Any) -> Any:
    t = type(value)
    if t is tuple:
        keyed = _KEYED
        return tuple([_leaf_key(v) if type(v) in keyed else v for v in value])
    if t is Ref:
        return (_REF, value.id)
    if t is ParamRef:
        return (_PARAM, value.index)
    if t is Site:
        return (_SITE, value.path, value.kind, value.call, value.invoke)
    if t in _TYPED_LITERALS:
        return (_TYPED, t, repr(value))  # repr: -0.0 and nan are told apart from 0.0 and from each other
    if t is list:
        return (_LIST, *[_leaf_key(v) for v in value])
    if t is dict:
        return (_DICT, *[(k, _leaf_key(v)) for k, v in value.items()])
    if t is slice:
        return (_SLICE, _leaf_key(value.start), _leaf_key(value.stop), _leaf_key(value.step))
    return value


def _optimize(
    graph: Graph, last_module: str | None, unembedding: weakref.ref | None = None
) -> tuple[tuple[str, tuple[Node, ...]], ...]:
    debug = os.environ.get("IC_DEBUG", "") >= "2"
    steps = []
    graph = verify(graph, where="tracing")
    steps.append(("traced", graph.nodes))
    for name, run_pass in PIPELINE:
        if run_pass is narrow_to_last_position:
            run_pass = partial(narrow_to_last_position, module=last_module, unembedding=unembedding)
        result = run_pass(graph)
        graph = verify(result.graph, where=f"pass {name!r}")
        steps.append((name, graph.nodes))
        if debug and result.modified:
            print(f"-- after {name}:\n{format_graph(graph)}")
    return tuple(steps)
