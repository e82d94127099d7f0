"""Runs a session graph: its nodes in program order, loops once per item, each trace on its model's backend.

Session-level nodes are plain values (lists, optimizers, arithmetic), so they run one after another through the
same value ops as the eager backend (no model is running). A TRACE node runs its body on its model through the
trace's own backend (eager, or compiled when the trace asked for it). Before that, the body is made
self-contained once per TRACE node: its ids are shifted to start at 0 and every value it reads from the session
(or from an earlier trace) becomes a runtime param. Re-running it in a loop therefore only swaps param values, so
the pass memo and the compile cache see the same structure every iteration (and in every session that records
the same code). The values a trace hands back (its saves, including the plumbing saves that feed later nodes)
are stored under their session ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..errors import InterventionError, SourceLoc, add_note, execution_error
from ..ir import Graph, InvokeRows, Node, Op, ParamRef, Ref, format_node
from ..ir.nodes import map_args, walk_nodes
from ..runtime import VALUE_OPS, resolve


class SessionTrace(Protocol):
    """One trace of a session (a TRACE node's ``target`` indexes them), as the front-end hands it over."""

    loc: SourceLoc | None  # where the trace was opened, for errors

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, int]:
        """One invoke's input as model ``(args, kwargs)`` and its batch size."""
        ...

    def run(self, graph: Graph, prepared: list[tuple[tuple, dict]]) -> dict[int, Any]:
        """Run the trace's ``graph`` (ids from 0, session values bound as params) on the prepared invokes;
        return its saved values by node id."""
        ...


class _Exit(Exception):
    """iterator.exit() / session.exit(): leave the LOOP ``loop`` (or the session when None)."""

    def __init__(self, loop: int | None):
        self.loop = loop


def run_session(
    graph: Graph, traces: Sequence[SessionTrace], saved: Iterable[int], out: dict[int, Any] | None = None
) -> dict[int, Any]:
    """Run a session's ``graph`` whose TRACE nodes run ``traces[node.target]``; return the ``saved`` values.

    ``out``, when given, receives them too, also when the run raises: what completed before the error (an
    earlier trace's saves) is never lost.
    """
    run = _SessionRun(traces, graph)
    saved = set(saved)
    try:
        run.block(graph.nodes)
    except _Exit as e:
        if e.loop is not None:  # an exit of a loop that is not running: a bug, not a user error
            raise RuntimeError(f"exit of loop %{e.loop} escaped its loop") from None
    finally:
        values = {nid: run.env[nid] for nid in saved if nid in run.env}
        if out is not None:
            out.update(values)
    return values


class _SessionRun:
    def __init__(self, traces: Sequence[SessionTrace], graph: Graph):
        self.traces = traces
        self.params = graph.params
        self.env: dict[int, Any] = {}
        self.skipped: set[int] = set()
        self.bound: dict[int, tuple[Graph, tuple[int, ...], int, tuple[Node, ...]]] = {}

    def lookup(self, nid: int) -> Any:
        return self.env[nid]

    def param(self, index: int) -> Any:
        return self.params[index]

    def block(self, nodes: tuple[Node, ...]) -> None:
        for node in nodes:
            if not self._enabled(node):
                self.skipped.add(node.id)
                continue
            self.skipped.discard(node.id)
            op = node.op
            if op is Op.TRACE:
                self._trace(node)
            elif op is Op.LOOP:
                self._loop(node)
            elif op is Op.EXIT:
                raise _Exit(node.target)
            else:
                self._value(node)

    def _enabled(self, node: Node) -> bool:
        skipped = self.skipped
        for g, want in node.guards:
            if g in skipped or self.env.get(g) != want:
                return False
        return not any(r in skipped for r in node.refs)

    def _value(self, node: Node) -> None:
        fn = VALUE_OPS.get(node.op)
        if fn is None:
            raise InterventionError(
                f"`{format_node(node)}` can only be used inside a trace", node.loc, "move it into a trace"
            )
        try:
            a = resolve(node.args, self.lookup, self.param)
            kw = {k: resolve(v, self.lookup, self.param) for k, v in node.kwargs}
            self.env[node.id] = fn(node, a, kw)
        except InterventionError:
            raise
        except Exception as e:
            raise execution_error(e, node.loc, format_node(node)) from e

    def _loop(self, node: Node) -> None:
        try:
            items = resolve(node.args[0], self.lookup, self.param)
            iterator = iter(items)
        except Exception as e:
            raise execution_error(e, node.loc, "session.iter()") from e
        body = node.body[0].nodes
        asked = ("progress", True) in node.kwargs
        with _progress_bar(items, node) if asked else contextlib.nullcontext() as bar:
            for item in iterator:
                self.env[node.id] = item
                try:
                    self.block(body)
                except _Exit as e:
                    if e.loop == node.id:
                        break
                    raise
                if bar is not None:
                    bar.update(1)

    def _trace(self, node: Node) -> None:
        trace = self.traces[node.target]
        template, outer, base, hoisted = self._bind(node)
        for h in hoisted:
            self._value(h)
        inputs = resolve(node.args, self.lookup, self.param)
        prepared, rows, start = [], [], 0
        for args, kwargs in inputs:
            p_args, p_kwargs, size = trace.prepare(args, kwargs)
            prepared.append((p_args, p_kwargs))
            rows.append(InvokeRows(start, start + size))
            start += size
        graph = template.replace(
            params=template.params + tuple(self.env[i] for i in outer), invokes=tuple(rows)
        )
        try:
            results = trace.run(graph, prepared)
        except BaseException as e:
            loc = trace.loc
            if loc is not None:
                add_note(e, f"(in the session's trace opened at {loc.filename}:{loc.lineno})")
            raise
        for nid, value in results.items():
            self.env[nid + base] = value

    def _bind(self, node: Node) -> tuple[Graph, tuple[int, ...], int, tuple[Node, ...]]:
        """The trace body with ids from 0 and session values as params (cached per TRACE node)."""
        got = self.bound.get(node.id)
        if got is None:
            got = self.bound[node.id] = _self_contained(node.body[0])
        return got


def _self_contained(body: Graph) -> tuple[Graph, tuple[int, ...], int, tuple[Node, ...]]:
    """``body`` with ids shifted to start at 0 and reads of values it does not define turned into params.

    Indexing and attribute reads of session values (``batch[1]`` of a DataLoader batch) are hoisted out of the
    body and run by the session just before the trace, so the trace gets the tensor as its param rather than
    the container (a container param would key the compile cache by identity: one compile per batch).

    Returns the graph, the session ids whose values to append to its params (in order), the shift, and the
    hoisted nodes.
    """
    defined = {n.id for n in walk_nodes(body.nodes)}
    hoisted: list[Node] = []
    for n in body.nodes:
        if (
            n.op in (Op.GETITEM, Op.GETATTR)
            and not n.guards
            and n.deps
            and all(d not in defined for d in n.deps)
        ):
            hoisted.append(n)
            defined.discard(n.id)
    if hoisted:
        body = body.replace(nodes=tuple(n for n in body.nodes if n.id in defined))
    base = body.nodes[0].id if body.nodes else 0
    outer: list[int] = []
    slot: dict[int, int] = {}
    first = len(body.params)

    def leaf(v):
        if type(v) is Ref:
            if v.id in defined:
                return Ref(v.id - base)
            index = slot.get(v.id)
            if index is None:
                index = slot[v.id] = first + len(outer)
                outer.append(v.id)
            return ParamRef(index)
        return v

    def shift(nodes) -> tuple[Node, ...]:
        return tuple(
            Node(
                n.id - base,
                n.op,
                n.target,
                map_args(n.args, leaf),
                tuple((k, map_args(v, leaf)) for k, v in n.kwargs),
                tuple((g - base, b) for g, b in n.guards if g in defined),
                tuple(a - base for a in n.after if a in defined),
                n.invoke,
                tuple(sub.replace(nodes=shift(sub.nodes)) for sub in n.body),
                n.loc,
            )
            for n in nodes
        )

    graph = body.replace(nodes=shift(body.nodes))
    return graph, tuple(outer), base, tuple(hoisted)


def _progress_bar(items: Any, node: Node) -> Any:
    """``session.iter(..., progress=True)``'s bar over ``items``, named after the loop's line."""
    from ..runtime.progress import length_of, progress_bar

    where = f"session.iter (line {node.loc.lineno})" if node.loc is not None else "session.iter"
    return progress_bar(length_of(items), where, "item")


__all__ = ["SessionTrace", "run_session"]
