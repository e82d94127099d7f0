"""The IR pass pipeline: one straight-line list naming each step. The only importer of ``passes``.

Every graph is verified after tracing and after each pass; a pass that raises is named in the error, as a
verifier failure is. ``IC_DEBUG=2`` prints the graph after each pass that changed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import debug
from .errors import InterventionError, PassError
from .ir import NO_FACTS, Graph, ModelFacts, Node, ParamRef, Ref, Site, format_graph, structure_tuple, verify
from .passes import (
    Pass,
    eliminate_dead_values,
    fuse_setitems,
    narrow_to_last_position,
    truncate_after_last_use,
)

PIPELINE: tuple[tuple[str, Pass], ...] = (
    ("dead_values", eliminate_dead_values),
    ("setitem_fusion", fuse_setitems),
    ("last_position", narrow_to_last_position),  # uses facts.last_module / facts.unembedding
    ("early_stop", truncate_after_last_use),
)

Steps = tuple[tuple[str, tuple[Node, ...]], ...]


@dataclass(frozen=True)
class Optimized:
    """A traced graph, the graph the pipeline made of it, and the nodes after each step (``("traced", ...)``
    first), which ``tracer.explain()`` prints."""

    traced: Graph
    graph: Graph
    steps: Steps


_MEMO_SIZE = 512


def optimize(graph: Graph, facts: ModelFacts = NO_FACTS, memo: dict | None = None) -> Optimized:
    """Run every pass in order on ``graph``.

    Passes read only a graph's structure (ops, targets, literals, which param a node uses), never param values,
    so results are memoized by structure in ``memo`` (the model's ``ModelCaches.optimized``, when given): a loop
    that traces the same code with new tensors (a sweep, a training loop) verifies and optimizes once. Source
    locations are part of the key, so errors keep naming the right line; so are the ``facts``.
    """
    key = (_memo_key(graph), facts)
    hit = memo.get(key) if memo is not None else None
    if hit is None:
        steps = _optimize(graph, facts)
        hit = (steps, tuple(n.loc for n in graph.nodes))  # keeps the locations whose ids are in the key alive
        if memo is not None:
            if len(memo) >= _MEMO_SIZE:
                del memo[next(iter(memo))]  # the oldest entry
            memo[key] = hit
    steps = hit[0]
    return Optimized(graph, graph.replace(nodes=steps[-1][1]), steps)


def _optimize(graph: Graph, facts: ModelFacts) -> Steps:
    steps = []
    graph = verify(graph, where="tracing")
    steps.append(("traced", graph.nodes))
    for name, run_pass in PIPELINE:
        try:
            result = run_pass(graph, facts)
        except InterventionError:
            raise
        except Exception as e:
            raise PassError(
                f"the optimization pass {name!r} failed on this trace ({type(e).__name__}: {e})",
                None,
                "this is a bug in intervene_compiler: please report it with the graph `IC_DEBUG=2` prints",
            ) from e
        graph = verify(result.graph, where=f"pass {name!r}")
        steps.append((name, graph.nodes))
        if debug.DEBUG >= 2 and result.modified:
            print(f"-- after {name}:\n{format_graph(graph)}")
    return tuple(steps)


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
