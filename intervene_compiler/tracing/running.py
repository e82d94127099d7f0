"""Running a recorded block: build its graph, optimize it, hand it to ``execute``, keep what comes back.

:class:`Running` is the part of :class:`~intervene_compiler.tracing.Tracer` that runs when a block exits:
``_run`` (an edit block adds its graph to the model instead; a scan runs on fakes), the optimized graph for the run
(``_optimized``, with the front-end's memo of simple traces, ``_simple_key``, in front of the pass pipeline's own),
``_execute`` (the seam: ``execute(graph, inputs, target, options)``; the result's values, output and notes stay on
the tracer), and the session path: ``_defer_to_session`` hands the block to the open session instead of running
it, which runs it with ``_run_bound`` and hands its values back with ``_finish_in_session``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import PACKAGE_DIR, InterventionError, InvokeError, add_note, model_error, user_location
from ..execute import RunOptions, execute
from ..ir import Graph, InvokeRows, ModelFacts
from ..pipeline import Optimized, optimize
from ..runtime import Target
from ..runtime.devices import offloaded

if TYPE_CHECKING:
    from .model import NNsight
    from .state import TracerState
else:
    TracerState = object  # declarations for the type checker only (see state.py)


class Running(TracerState):
    """Running a tracer's recorded block (a part of :class:`~intervene_compiler.tracing.Tracer`)."""

    def _build_graph(self) -> Graph:
        rows = tuple([InvokeRows(inv.start, inv.start + inv.batch_size) for inv in self._invokers])
        return Graph(tuple(self._nodes), tuple(self._params), rows, self._mode, self._needs_output)

    def _run(self) -> None:
        model = self.model
        for barrier in self._barriers:
            barrier.check()
        if self._mode == "edit":
            self.graph = graph = self._build_graph()
            model._add_edit(graph)
            return
        invokers = self._invokers
        if not invokers:
            self._check_has_input()
        prepared = [invokers[0].inputs] if len(invokers) == 1 else [inv.inputs for inv in invokers]
        if self._remote is not None:  # the service runs it (remote/client.py): no weights needed here
            from .remote import run_remote

            options = getattr(self, "_generate_kwargs", None)
            kind = "trace" if options is None else "generate"
            graph = model._with_edits(self._build_graph())
            self.graph = graph
            run_remote(self, graph, prepared, kind, options or {}, self._remote["blocking"])
            return
        fake = self._mode == "scan"
        target = model._target(fake)
        self._execute(self._optimized(model, target), prepared, target, fake)

    def _run_bound(self, graph: Graph, prepared: list[tuple[tuple, dict]]) -> dict[int, Any]:
        """Run as a session's trace: ``graph`` has the session's values bound as params (backends/session.py).
        Returns the saved values."""
        model = self.model
        with self._state.lock:  # as a trace's block holds it: one run per model at a time
            target = model._target(False)
            optimized = optimize(model._with_edits(graph), target.facts, target.caches.optimized)
            self._execute(optimized, prepared, target, False)
        return self._results or {}

    def _execute(self, optimized: Optimized, prepared: list, target: Target, fake: bool) -> None:
        self._optimized_graph = optimized
        self.graph = optimized.graph
        options = RunOptions.of(self._compile, self._reuse, fake)
        try:
            result = execute(optimized, prepared, target, options)
        except InterventionError as e:
            _forget_failed_edit(self.model, e)
            raise
        except Exception as e:
            _forget_failed_edit(self.model, e)
            if not _raised_by_model(e):
                raise
            loc = self._loc if self._session is not None else user_location()
            raise model_error(e, loc, _has_meta_weights(target.module)) from e
        except BaseException as e:
            _forget_failed_edit(self.model, e)
            raise
        self._entry = result.explain
        self._results = result.values
        self._stop_loc = result.stop_loc
        self._skipped = result.skipped
        if result.reuse is not None:
            self._reuse_note = result.reuse
        self.output = result.output

    def _optimized(self, model: NNsight, target: Target) -> Optimized:
        """The graph as traced (with the model's edits), optimized, with the pass steps (see ``optimize``).

        A trace of only site reads and saves (the common ``model.layer.output.save()``) has a cheap key of its
        structure (``_simple_key``): repeating it reuses what the first such trace built and optimized (graphs
        that are immutable and hold no params: nothing to bind per trace) instead of building a graph to have the
        pass memo key it again. That memo is the model's (``ModelState.simple``); the last such trace's notes are
        kept beside it (``ModelState.last_simple``), so that a loop repeating one trace compares its notes with them
        instead of building and hashing the key.
        """
        facts = target.facts
        state = self._state
        memo = state.simple
        key = None
        if model._edits is None and not self._params and not self._node_list:  # only noted reads and saves
            invokers = self._invokers
            if len(invokers) == 1:
                inv = invokers[0]
                rows: tuple[tuple[int, int], ...] = ((inv.start, inv.start + inv.batch_size),)
            else:
                rows = tuple([(inv.start, inv.start + inv.batch_size) for inv in invokers])
            notes = (self._lazy, rows, self._mode, self._needs_output, facts)
            last = state.last_simple
            if last is not None and last[0] == notes:  # the last simple trace again (a loop): no key built
                return last[1]
            key = _simple_key(*notes)
            hit = memo.get(key)
            if hit is not None:
                state.last_simple = (notes, hit)
                return hit
        traced = model._with_edits(self._build_graph())
        optimized = optimize(traced, facts, target.caches.optimized)
        if key is not None:
            if len(memo) >= _SIMPLE_SIZE:
                del memo[next(iter(memo))]  # the oldest entry
            memo[key] = optimized
            state.last_simple = (notes, optimized)
        return optimized

    def _check_has_input(self) -> None:
        if not self._invokers:
            raise InvokeError(
                "the trace has no input"
                + (
                    ": `tracer.invoke()` without an input acts on the other invokes' rows"
                    if self._promptless
                    else ""
                ),
                self._promptless,
                "pass the input to `model.trace(x)`, or add `with tracer.invoke(x):` blocks",
            )

    def _defer_to_session(self) -> None:
        """Hand the recorded block to the open session as one TRACE node; it runs when the session does."""
        assert self._session is not None  # Tracer.__exit__ defers to the session it records into
        for barrier in self._barriers:
            barrier.check()
        self._check_has_input()
        graph = self._build_graph()
        inputs = tuple((inv.args, inv.kwargs) for inv in self._invokers)
        self._closed = True
        self._session._add_trace(self, graph, inputs, self._loc)

    def _finish_in_session(self, results: dict[int, Any], error: BaseException | None) -> None:
        """The session ran (or failed): saved values are the session's, keyed by this trace's node ids."""
        self._closed = False
        self._finished = True
        self._results = results
        self._skipped = {}
        self._stop_loc = None
        if error is not None and self._error is None:
            self._error = error


def _raised_by_model(error: BaseException) -> bool:
    """Did ``error`` come from the model's code (or torch under it) rather than from this package's own?"""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return not tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR)


def _has_meta_weights(module: Any) -> bool:
    """Weights on meta that were never loaded (accelerate's offloaded weights are on meta between calls)."""
    if offloaded(module):
        return False
    return any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers())


def _forget_failed_edit(model: Any, error: BaseException) -> None:
    """A run that failed in one of the model's edits (``model.edit()``) drops that edit, so it fails once, not on
    every later trace; the error says so."""
    if model._edits is None:
        return
    loc = model._drop_failed_edit(error)
    if loc is not None:
        add_note(
            error,
            f"(the edit recorded at {loc.filename}:{loc.lineno} failed, so it was removed from the model: later "
            "traces run without it; fix it and record it again with `model.edit()`)",
        )


# -- the pass memo, in front --------------------------------------------------------------------------------------
# ``pipeline.optimize`` memoizes by a key covering every kind of node. Most traces only read module values and save
# them (SITE and SAVE nodes, no params): for those, a key of the same facts (ids, sites, dependencies, guards,
# invokes and the identity of source locations, which errors name) is built here from the tracer's notes of those
# nodes (``Tracer._lazy``) for a fraction of the cost, and maps to the traced and optimized graphs and pass steps
# of the first trace with that key. Entries keep that trace's nodes (and so the source locations whose ids are in
# the key) alive, as optimize's memo does. The memo is the model's (``ModelState.simple``).
_SIMPLE_SIZE = 512


def _simple_key(notes: list, rows: tuple, mode: str, needs_output: bool, facts: ModelFacts) -> tuple:
    """The structure of a trace whose nodes are all noted site reads and saves (``notes``, see
    ``Tracer._nodes``); see ``Tracer._optimized``."""
    parts: list[tuple] = []
    for entry in notes:
        if len(entry) == 3:  # a site read: (id, (path, kind, call, invoke, guards), loc)
            parts.append((entry[0], entry[1], id(entry[2])))
        else:  # a save: (id, saved id, after, guards, invoke, loc)
            nid, ref, after, guards, invoke, loc = entry
            parts.append((nid, ref, after, guards, invoke, id(loc)))
    return (tuple(parts), rows, mode, needs_output, facts)


__all__ = ["Running"]
