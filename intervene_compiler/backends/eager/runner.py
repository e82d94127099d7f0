"""The eager backend's entry: ``run_graph`` picks how a graph runs on the model and runs it.

A plain graph of site reads and saves (``plan.Reads``) runs on the reads-only path (``reads.run_reads``), without
the scheduler; every other graph runs on an :class:`~.interpreter.Interpreter`, set up here for a shared-prefix
run (repeat, suffix packing, reuse of unedited layers, the compiled backend's layer forwards).

The runner's parts, one job each: ``plan.py`` (what a run derives from a graph), ``hooks.py`` (torch hook
internals: hooks and wraps), ``reads.py`` (the reads-only path), ``interpreter.py`` (the scheduler), with its
mixins ``events.py`` (module hooks -> visits), ``prefix.py`` (shared-prefix packing glue) and ``gradients.py``;
``states.py`` (node states, the early stop), ``steps.py`` (generation steps), ``packing.py``, ``reuse.py``.
"""

from __future__ import annotations

from ...ir import Graph
from ...runtime import RunResult, Target
from . import packing
from . import reuse as _reuse
from .interpreter import Interpreter
from .plan import plan_for
from .reads import run_reads


def run_graph(
    target: Target,
    graph: Graph,
    args: tuple,
    kwargs: dict,
    repeat: int = 0,
    reuse: bool = False,
    layer_forward=None,
) -> RunResult:
    """Run ``target``'s model on ``args``/``kwargs`` with ``graph``'s interventions.

    ``repeat`` > 1: the invokes all have this same one-row input, given once; the forward runs on one row up to
    the first event any node touches, where the value is repeated to one row per invoke (the shared prefix of
    identical invokes is computed once; see ``execute._batch``). ``repeat`` = 1: one invoke whose prefix
    could be shared. ``reuse`` (with ``repeat``): replay the unedited decoder layers an earlier run on an equal
    input memoized, and memoize the ones this run computes (reuse.py). ``layer_forward(layer, *args, **kwargs)``
    (with ``repeat``): what the decoder layers that are not replayed run instead of their ``forward`` (the
    compiled backend's layered runs, ``backends/compiled/layered.py``).
    """
    if not repeat:
        plan = plan_for(graph.nodes, target.caches.plans)
        if plan.reads is not None:
            return run_reads(target, graph, plan.reads, args, kwargs)
    run = Interpreter(target, graph)
    if repeat > 1:
        run.repeat = repeat
        run.pack_plan = packing.pack_layers(target, [key[0] for key in run.site_nodes])
    note = None
    if repeat and reuse:
        found = _reuse.plan(target, run, args, kwargs, compiled=layer_forward is not None)
        if isinstance(found, str):
            note = found
        else:
            run.reuse = found
    if repeat and layer_forward is not None:
        run.layer_forward = layer_forward
    result = run.execute(args, kwargs)
    if run.reuse is not None:
        note = run.reuse.describe()
    if note:
        result.reuse = note
    return result


__all__ = ["run_graph"]
