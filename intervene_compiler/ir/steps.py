"""An ITER node's step selection (``Node.target``): ``None`` (every step), a tuple of step indices, or a slice.

A step is one call of the root module (one forward pass; in ``generate``, one new token). These helpers give the
selection's meaning, shared by the printer, the front-end and every backend.
"""

from __future__ import annotations

from typing import Any


def step_matches(steps: Any, k: int) -> bool:
    """Does step ``k`` run an ITER node whose selection is ``steps``?"""
    if steps is None:
        return True
    if isinstance(steps, slice):
        start = steps.start or 0
        if k < start or steps.stop is not None and k >= steps.stop:
            return False
        return (k - start) % (steps.step or 1) == 0
    return k in steps


def last_step(steps: Any) -> int | None:
    """The last step a selection asks for (-1 for an empty slice), or None when it is open-ended."""
    if steps is None:
        return None
    if isinstance(steps, slice):
        if steps.stop is None:
            return None
        start, step = steps.start or 0, steps.step or 1
        if steps.stop <= start:
            return -1
        return start + (steps.stop - 1 - start) // step * step
    return steps[-1]


def first_step(steps: Any) -> int:
    """The first step a selection asks for."""
    if steps is None:
        return 0
    if isinstance(steps, slice):
        return steps.start or 0
    return steps[0]


def format_steps(steps: Any) -> str:
    """A selection as the user wrote it: ``all``, ``[1, 3]``, ``1:3``."""
    if steps is None:
        return "all"
    if isinstance(steps, slice):
        start = "" if steps.start is None else steps.start
        stop = "" if steps.stop is None else steps.stop
        return f"{start}:{stop}" + (f":{steps.step}" if steps.step is not None else "")
    return "[" + ", ".join(str(s) for s in steps) + "]"
