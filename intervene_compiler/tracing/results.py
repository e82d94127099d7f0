"""What a user reads from a tracer: saved values after the run, the graphs and how they ran, proxy reprs.

:class:`Results` is the part of :class:`~intervene_compiler.tracing.Tracer` behind ``proxy.value``
(``_value_of``: the saved value, or an error saying why there is none: read too early, never saved, skipped by a
false condition, cut off by a stop, or lost to an error in the block), ``tracer.explain()`` and ``tracer.steps``
(the graph as traced and after each pass, and the backend's account of the run) and a live proxy's repr
(``_describe``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SourceLoc, TracingError, ValueNotReadyError, user_location
from ..ir import Graph, format_graph, format_node
from ..ir.nodes import walk_nodes

if TYPE_CHECKING:
    from .proxy import Proxy
    from .state import TracerState
else:
    TracerState = object  # declarations for the type checker only (see state.py)


class Results(TracerState):
    """Reading a tracer's values and graphs (a part of :class:`~intervene_compiler.tracing.Tracer`)."""

    def _describe(self, proxy: Proxy) -> str:
        nid = proxy._node_id()
        node = next((n for n in reversed(self._nodes) if n.id == nid), None)
        text = format_node(node) if node is not None else f"%{nid}"
        return f"<Proxy {text}>"

    def explain(self, file=None) -> str:
        """Print (and return) the graph as traced and after each pass, and how the run was executed.

        For ``compile=True`` it says whether the program was compiled, reused from the cache or fell back to the
        eager backend (and why), and shows the spliced FX graph (model and interventions) Inductor compiled.
        """
        if self.graph is None:
            raise TracingError(
                "explain() needs a trace that has run", user_location(), "call it after the block"
            )
        parts = [f"-- {name}:\n{format_graph(graph)}" for name, graph in self.steps]
        if self._reuse_note:
            parts.append(f"-- reuse across traces: {self._reuse_note}")
        entry = self._entry
        if self._compile == "auto" and entry is None:
            from ..execute import AUTO_COMPILE_AFTER

            parts.append(
                f"-- backend: eager (hooks); compile='auto' compiles a structure at its run {AUTO_COMPILE_AFTER} "
                "(same shapes and grad mode), eager before"
            )
        elif not self._compile:
            parts.append("-- backend: eager (hooks)")
        elif entry is None:
            parts.append("-- backend: compiled, fell back to eager: unknown")
        else:
            parts.extend(entry.describe())
        text = "\n".join(parts)
        print(text, file=file)
        return text

    @property
    def steps(self) -> list[tuple[str, Graph]]:
        """The graph as traced and after each pass: ``[("traced", g), ("dead_values", g), ...]``."""
        optimized = self._optimized_graph
        if optimized is None:  # not run yet (or an edit, which records and does not run)
            raise TracingError("steps needs a trace that has run", user_location(), "read it after the block")
        return [(name, optimized.traced.replace(nodes=nodes)) for name, nodes in optimized.steps]

    def _value_of(self, proxy: Proxy) -> Any:
        nid = proxy._node_id() if not self._finished else proxy._id
        if self._session is not None:  # saved values of a session's traces are the session's
            return self._session._session_value(nid)
        if not self._finished:
            raise ValueNotReadyError(
                "`.value` was read inside the tracing block, before the model ran",
                user_location(),
                "read it after the `with` block ends; inside the block, use the proxy itself",
            )
        results = self._results or {}
        if nid is not None and nid in results:
            return results[nid]
        made = self._loc_of(nid)
        made_text = f" (the value recorded at {made.filename}:{made.lineno})" if made else ""
        if self._error is not None:
            raise ValueNotReadyError(
                f"this value{made_text} was never computed: the trace raised {type(self._error).__name__}",
                user_location(),
                "fix the error the tracing block raised, then run it again",
            )
        if nid in self._skipped:
            cond = self._skipped[nid]
            where = f" (at {cond.filename}:{cond.lineno})" if cond else ""
            raise ValueNotReadyError(
                f"this value{made_text} was never computed: the `tracer.cond` condition guarding it{where} was false",
                user_location(),
                "read it only when the condition holds, or save a value computed outside the condition",
            )
        if nid in self._saved_ids:
            where = f" at {self._stop_loc.filename}:{self._stop_loc.lineno}" if self._stop_loc else ""
            raise ValueNotReadyError(
                f"this value{made_text} was never computed: the forward pass was stopped{where} before it",
                user_location(),
                "stop after the module it needs, or drop the stop",
            )
        raise ValueNotReadyError(
            f"this value{made_text} was not saved, so it is gone after the tracing block",
            user_location(),
            "call `.save()` on it inside the block",
        )

    def _loc_of(self, nid: int | None) -> SourceLoc | None:
        for n in walk_nodes(self._nodes):
            if n.id == nid:
                return n.loc
        return None


__all__ = ["Results"]
