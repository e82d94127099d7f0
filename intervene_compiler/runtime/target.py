"""The target: the model a graph runs on, as the passes and backends see it.

The front-end (``tracing``) builds a :class:`Target` for each run from its model wrapper and hands it to
:func:`~intervene_compiler.execute.execute` with the graph. Backends read the model only through it: the module,
how to call it, the per-model caches they keep between runs, and the facts about the model that passes and fast
paths need. Nothing here knows about envoys, tracers or proxies.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..ir import NO_FACTS, ModelFacts


def nodes_memo(memo: dict, nodes: Any, extra: Any, size: int, make: Callable[[], Any]) -> Any:
    """The value ``make()`` derives from a graph's ``nodes`` (and ``extra``: what else it depends on), from
    ``memo`` when made before (a repeated trace hands the same optimized nodes tuple).

    Keyed by the tuple's id, and each entry holds the tuple itself (checked by identity): its id cannot be reused
    while the entry exists, so an entry is never found for another tuple. Past ``size`` entries the oldest goes.
    """
    key = (id(nodes), extra)
    hit = memo.get(key)
    if hit is not None and hit[0] is nodes:
        return hit[1]
    value = make()
    if type(nodes) is tuple:  # immutable: safe to reuse for the same object
        if len(memo) >= size:
            del memo[next(iter(memo))]
        memo[key] = (nodes, value)
    return value


def submodule(module: torch.nn.Module, path: str) -> Any:
    """``module.get_submodule(path)``, walked through the ``_modules`` dicts (where ``nn.Module`` keeps its
    children: ``get_submodule``'s attribute lookups cost more than a small compiled call's bookkeeping); anything
    else (a path through a non-module attribute) asks ``get_submodule``."""
    found: Any = module
    try:
        for name in path.split("."):
            found = found._modules[name]
    except (AttributeError, KeyError):
        return module.get_submodule(path)
    return found


class StructureNumbers:
    """Numbers for structures (hashable tuples): equal structures, equal numbers, so a key can hold a number
    instead of hashing a structure on every call. Numbers are never reused: past ``size`` structures the table
    is forgotten, and a forgotten structure gets a new number (a key made with it is not found again)."""

    def __init__(self, size: int = 4096) -> None:
        self.table: dict[Any, int] = {}
        self.size = size
        self._counter = itertools.count()

    def of(self, structure: Any) -> int:
        number = self.table.get(structure)
        if number is None:
            if len(self.table) >= self.size:
                self.table.clear()
            number = self.table[structure] = next(self._counter)
        return number

    def clear(self) -> None:
        self.table.clear()


class ModelCaches:
    """What the runtime keeps per model between runs; shared by a model and its edited copies.

    Owned by the model (nothing here is process-wide), so entries die with it. Keys hold the objects they are
    about (graphs' node tuples, source locations), so an entry can never be found for an object it was not made
    for.
    """

    def __init__(self) -> None:
        self.optimized: dict[Any, Any] = {}  # pipeline.optimize's memo: structure and facts -> pass results
        self.plans: dict[Any, tuple[Any, Any]] = {}  # the eager runner's plans, per nodes tuple (nodes_memo)
        self.compiled: Any = None  # the compiled backend's CompileCache, made on its first use
        # unedited decoder-layer outputs of the last prompt (backends/eager/reuse.py)
        self.reuse_memo: Any = None
        # compile="auto" (execute.py): (structure number, inputs' signature, grad mode) -> runs; the number of a
        # graph's structure (numbers abstracted), per nodes tuple (nodes_memo)
        self.auto: dict[Any, int] = {}
        self.auto_nodes: dict[Any, tuple[Any, int]] = {}
        self.auto_numbers = StructureNumbers()
        # (optimized graph, inputs' signature, grad mode) of the last run that compiled
        self.auto_last: Any = None

    def clear_compiled(self) -> None:
        """Drop the compiled programs and the compiled backend's dispatcher hooks."""
        if self.compiled is not None:
            self.compiled.clear()


class Target:
    """The model one run executes on.

    Attributes:
        module: the ``torch.nn.Module`` (with real weights, except in fake runs).
        forward: ``forward(*args, **kwargs)`` runs the model on the batched inputs (a language model's adds
            position ids, or calls ``generate`` while ``generating``).
        caches: the model's :class:`ModelCaches`.
        facts: what the passes may know (``ir.ModelFacts``: the last position-wise module).
        layers: the path of the decoder layers of a known causal-LM family (``runtime.families``), else None.
        shares_prefix: identical one-row invokes may share the layers before the first edit (a known family
            whose last module is known).
        batch: ``batch(prepared)`` combines every invoke's ``(args, kwargs)`` into one batch (a language model
            left-pads).
        generating: the ``generate()`` keyword arguments while a generate block runs, else None.
    """

    __slots__ = ("batch", "caches", "facts", "forward", "generating", "layers", "module", "shares_prefix")

    def __init__(
        self,
        module: torch.nn.Module,
        forward: Callable[..., Any],
        caches: ModelCaches,
        batch: Callable[[list[tuple[tuple, dict]]], tuple[tuple, dict]],
        facts: ModelFacts = NO_FACTS,
        layers: str | None = None,
        shares_prefix: bool = False,
        generating: Mapping[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.forward = forward
        self.caches = caches
        self.batch = batch
        self.facts = facts
        self.layers = layers
        self.shares_prefix = shares_prefix
        self.generating = generating

    def decoder_layers(self) -> tuple[str, torch.nn.ModuleList] | None:
        """``(path, the ModuleList)`` of the decoder layers, or None (see ``layers``)."""
        path = self.layers
        if path is None:
            return None
        return path, submodule(self.module, path)  # a ModuleList in every DECODER_LAYERS family

    def with_forward(self, forward: Callable[..., Any]) -> Target:
        """This target, called through ``forward`` instead (a compiled generation step runs the root's own)."""
        other = copy.copy(self)
        other.forward = forward
        return other
