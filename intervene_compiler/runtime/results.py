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


class ModuleCache(dict):
    """What ``tracer.cache()`` gives: ``"model.path" -> CacheEntry``, also reachable by attribute path, as the
    model is: ``cache.model.transformer.h[0].output`` is ``cache["model.transformer.h.0"].output``. A module that
    ran more than once (each step of ``generate``) has a list of entries, one per call."""

    def add(self, name: str, entry: CacheEntry) -> None:
        """Record one call of module ``name``: its entry, or one more item in its list of entries."""
        held = self.get(name)
        if held is None:
            self[name] = entry
        elif isinstance(held, list):
            held.append(entry)
        else:
            self[name] = [held, entry]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _CachePath(self, name)


class _CachePath:
    """A dotted path into a :class:`ModuleCache`, built by attribute access and indexing."""

    __slots__ = ("_cache", "_path")

    def __init__(self, cache: ModuleCache, path: str):
        self._cache = cache
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("output", "inputs", "input"):
            entry = self._cache.get(self._path)
            if entry is None:
                raise KeyError(
                    f"{self._path} is not in the cache (cached: {', '.join(self._cache) or 'nothing'})"
                )
            if isinstance(entry, list):
                raise AttributeError(
                    f"{self._path} ran {len(entry)} times, so the cache holds one entry per call: read "
                    f'cache["{self._path}"][k].{name} for call k'
                )
            return getattr(entry, name)
        return _CachePath(self._cache, f"{self._path}.{name}")

    def __getitem__(self, index: Any) -> _CachePath:
        return _CachePath(self._cache, f"{self._path}.{index}")

    def __repr__(self) -> str:
        return f"<cache path {self._path}>"


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
