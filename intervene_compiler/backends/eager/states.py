"""The vocabulary every part of an eager run shares: how a node stands (``NodeState``) and how a run ends early
(``EarlyStop``).

Its own module (not the interpreter's) because the reads-only path (``reads.py``), the step bookkeeping
(``steps.py``) and the compiled backend's programs use these two names without the interpreter, and importing
them must not pull in the scheduler.
"""

from __future__ import annotations

import enum

from ...ir import Node


class NodeState(enum.IntEnum):
    """A node's state in a run's ``state`` dict (``Interpreter.state``: node id -> state). No entry: pending.

    An ``IntEnum`` so that states compare as ints: the hot paths compare with module-level aliases of the members
    (``_DONE = NodeState.DONE``), a global load rather than an attribute lookup on the class.
    """

    DONE = 1  # ran; its value is in ``env``
    SKIPPED = 2  # a guard was false, or it reads a skipped node
    ARMED = 3  # waits for its own event: a GRAD whose tensor hook is registered, an ITER between steps
    RUNNING = 4  # running now (nested drains, a grad hook inside backward, must not run it again)
    LIVE = 5  # an ITER node while an instance of its body runs (body nodes read it as the step index)


class EarlyStop(Exception):
    """A STOP node's early exit from the forward. ``owner`` is the run that raised it: a trace nested in a
    forward (or run by a hook) must let an outer run's stop through, not take it for its own.

    Whoever runs the model's forward for a run catches it and compares ``owner`` with itself: the interpreter
    (``Interpreter.execute``), the reads-only path (its ``env`` is the owner) and a compiled ``Program``.
    """

    def __init__(self, node: Node, owner: object):
        self.node = node
        self.owner = owner


__all__ = ["EarlyStop", "NodeState"]
