"""``tracer.all()`` and ``tracer.iter[...]``: interventions that run once per generation step.

A step is one call of the root module (one forward pass; in ``model.generate`` one new token). The block's
operations are recorded into a nested graph held by one ``ITER`` node, whose target says which steps run it:
``None`` (every step), a tuple of step indices, or a slice. Inside the block, module sites address the calls made
during the current step (``Site.call < 0``: ``-1`` is a module's first call in the step), and the value the block
yields (``with tracer.iter[1:3] as step:``, ``for step in tracer.iter[1:3]:``) is the current step index.

Values from before the block can be read inside it; a list created before it and appended to inside it
accumulates across steps; a value saved inside it holds its last step's value after the trace. Values computed
inside the block cannot be used after it inside the same trace (save them, or move the work into the block).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ..errors import SourceLoc, TracingError, user_location
from ..ir import Graph, Node, Op
from .proxy import Proxy

if TYPE_CHECKING:
    from .state import Guards, SiteKey, TracerState
    from .tracer import Tracer


class Iteration:
    """The block ``tracer.all()`` / ``tracer.iter[...]`` returns; usable with ``with`` or as a one-pass ``for``."""

    def __init__(self, tracer: Tracer, steps: Any, loc: SourceLoc | None):
        self.tracer = tracer
        self.steps = steps  # None, a tuple of step indices, or a slice
        self.loc = loc
        self.id: int | None = None  # set when the block is entered
        # what the block replaces while it is open: the tracer's nodes, site cache, calls addressed and guards
        self._saved: tuple[list[Node], dict[SiteKey, Proxy], Mapping[str, int], Guards] | None = None

    def __enter__(self) -> Proxy:
        tracer = self.tracer
        if tracer._mode == "edit":
            raise TracingError(
                "`tracer.all()` / `tracer.iter[...]` cannot be used in model.edit()",
                self.loc,
                "edits already apply to every later trace; put per-step interventions in the generate block",
            )
        if tracer._frame is not None:
            raise TracingError(
                "`tracer.all()` / `tracer.iter[...]` blocks cannot be nested",
                self.loc,
                "use one block whose steps are what you need (e.g. `tracer.iter[[1, 3]]`), or `tracer.cond`",
            )
        self.id = next(tracer._ids)
        self._saved = (tracer._nodes, tracer._site_cache, tracer._call_idx, tracer._guards)
        tracer._nodes, tracer._site_cache, tracer._call_idx = [], {}, {}
        tracer._frame = self
        if tracer._fakes is not None:
            tracer._fakes.values[self.id] = 0  # shapes inside the block are step 0's (the prompt)
        return Proxy(tracer, self.id)

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        tracer = self.tracer
        if tracer._frame is not self:
            return False
        assert self.id is not None and self._saved is not None  # set by __enter__, which opened this frame
        body = tracer._nodes
        tracer._nodes, tracer._site_cache, tracer._call_idx, guards = self._saved
        tracer._frame = None
        if exc_type is not None or tracer._finished:
            return False
        inner = {n.id for n in body}
        if type(tracer._body_of) is not dict:  # the class-level default is an empty read-only mapping
            tracer._body_of = {}
        for nid in inner | {self.id}:
            tracer._body_of[nid] = self.id
        for obj, last in list(tracer._last_mut.items()):  # later readers of an object mutated inside wait for
            if last in inner:  # the whole block (its last step); a dict, as it has items
                tracer._last_mut[obj] = self.id  # type: ignore[index]
        node = Node(
            self.id,
            Op.ITER,
            self.steps,
            guards=guards,
            invoke=tracer._invoke,
            body=(Graph(nodes=tuple(body), kind="iter"),),
            loc=self.loc,
        )
        tracer._nodes.append(node)
        return False

    def __iter__(self):
        """``for step in tracer.iter[1:3]:`` runs the loop body once per step, as Python runs a loop: each pass
        records a block of its one step and yields that step's index (a Python int), so a Python list appended in
        the body gets one item per step and ``if step == 2:`` works. The steps of ``tracer.all()`` or an open
        slice are known from ``max_new_tokens`` (one step in a trace)."""
        for step in self._step_list():
            block = Iteration(self.tracer, (step,), self.loc)
            block.__enter__()
            try:
                yield step
            except BaseException:
                block.__exit__(*sys.exc_info())
                raise
            block.__exit__(None, None, None)

    def _step_list(self) -> list[int]:
        steps = self.steps
        if isinstance(steps, tuple):
            return list(steps)
        total = self.tracer._step_count()
        if isinstance(steps, slice) and steps.stop is not None:
            return list(range(steps.start or 0, steps.stop, steps.step or 1))
        if total is None:
            raise TracingError(
                "`for step in tracer.all()` (or an open slice) needs to know how many steps the run has, and "
                "it cannot: generate was given no `max_new_tokens`",
                self.loc,
                "pass `max_new_tokens=` to generate, iterate a closed slice (`tracer.iter[0:5]`), or use "
                "`with tracer.all():` (its body runs at every step; append to `list().save()` to keep each)",
            )
        start, step = (steps.start or 0, steps.step or 1) if isinstance(steps, slice) else (0, 1)
        return list(range(start, total, step))


class IterSelector:
    """``tracer.iter``: index it with a step, a slice of steps, or a list of steps."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __getitem__(self, item: Any) -> Iteration:
        loc = user_location()
        return Iteration(self.tracer, normalize_steps(item, loc), loc)


def normalize_steps(item: Any, loc: SourceLoc | None) -> Any:
    """``tracer.iter[item]``'s step selection as the IR stores it (a tuple of ints or a slice)."""

    def bad(what: str) -> TracingError:
        return TracingError(
            f"tracer.iter[...] needs non-negative Python ints, got {what}",
            loc,
            "write e.g. `tracer.iter[2]`, `tracer.iter[1:4]`, `tracer.iter[[0, 2]]`, or `tracer.all()` for every step",
        )

    def is_step(v: Any) -> bool:
        return type(v) is int and v >= 0

    if isinstance(item, slice):
        for v in (item.start, item.stop, item.step):
            if v is not None and not is_step(v):
                raise bad(repr(item))
        if item.step == 0:
            raise bad("a slice with step 0")
        if item.start in (None, 0) and item.stop is None and item.step in (None, 1):
            return None  # tracer.iter[:] is tracer.all()
        return slice(item.start, item.stop, item.step)
    if is_step(item):
        return (item,)
    if isinstance(item, (list, tuple)) and item and all(is_step(v) for v in item):
        return tuple(sorted(set(item)))
    raise bad(repr(item) if not isinstance(item, Proxy) else "a traced value")


def check_scope(tracer: TracerState, refs: list[int], deps: set[int]) -> set[int]:
    """Raise when a value computed inside a closed iteration block is used outside it; return ``deps`` to use.

    A mutation inside an iteration block is not ordered after an earlier block's mutations of the same object
    (that would wait for the earlier block's last step): within a step, blocks run in program order.
    """
    frame = tracer._frame
    for r in refs:
        owner = tracer._body_of.get(r)
        if owner is not None and (frame is None or frame.id != owner):
            raise TracingError(
                "a value computed inside a `tracer.all()` / `tracer.iter[...]` block is used outside it",
                user_location(),
                "use it inside the block (append it to a list created before the block to keep every step's "
                "value), or `.save()` it inside the block and read it after the trace",
            )
    if frame is not None:
        deps = {d for d in deps if tracer._body_of.get(d) != d}
    return deps


def nodes_for_fakes(tracer: TracerState) -> list[Node]:
    """The recorded nodes to replay on fake tensors when fakes are turned on mid-block (ITER nodes skipped)."""
    frame = tracer._frame
    if frame is None:
        return [n for n in tracer._nodes if n.op is not Op.ITER]
    # an open block, entered (its id and the nodes outside it are set); the caller has just made the fakes
    assert frame.id is not None and frame._saved is not None and tracer._fakes is not None
    nodes = [n for n in frame._saved[0] if n.op is not Op.ITER]
    tracer._fakes.values[frame.id] = 0
    nodes += tracer._nodes
    return nodes


__all__ = [
    "IterSelector",
    "Iteration",
    "check_scope",
    "nodes_for_fakes",
    "normalize_steps",
]
