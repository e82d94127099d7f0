"""What a run hands back to the front-end, whichever backend ran it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceLoc
from ..ir import Graph, Node


@dataclass
class CacheEntry:
    """One module's values in ``tracer.cache()``: ``output`` and, when asked for, ``inputs`` (args, kwargs)."""

    output: Any = None
    inputs: Any = None

    @property
    def input(self) -> Any:
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        return args[0] if args else next(iter(kwargs.values()), None)


@dataclass
class RunResult:
    """The outcome of running one graph.

    Backends fill the first five fields; :func:`~intervene_compiler.execute.execute` adds what it decided
    (``graph``, ``steps``) and the compiled entry that ran it, for ``tracer.explain()``.
    """

    values: dict[int, Any]  # saved node id -> value
    output: Any  # the model's output (None when the forward was stopped)
    stop_loc: SourceLoc | None  # where a user stop ended the forward, if one did
    skipped: dict[int, SourceLoc | None] = field(default_factory=dict)  # saved id -> line of the false cond
    reuse: str | None = None  # what the run replayed and memoized across traces, or why not (eager/reuse.py)
    explain: Any = None  # the compiled entry that ran the graph (has ``describe()``), None for eager runs
    graph: Graph | None = None  # the optimized graph that ran
    steps: tuple[tuple[str, tuple[Node, ...]], ...] = ()  # the graph's nodes as traced and after each pass
