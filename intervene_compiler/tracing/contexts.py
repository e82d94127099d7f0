"""The small context objects a tracer hands out: invokes, conditions, barriers, backward blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..errors import BarrierError, InvokeError, SourceLoc, TracingError, user_location
from ..ir import Op

if TYPE_CHECKING:
    from .session import Session
    from .state import Guards
    from .tracer import Tracer


class Invoker:
    """``with tracer.invoke(input):`` adds ``input`` to the batch; interventions inside see only its rows."""

    # set when the invoke is entered (class-level defaults until then: every trace makes one)
    index: int | None = None
    # prepared (args, kwargs); (None, None) for a session value (prepared when the session runs)
    inputs: tuple[tuple | None, dict | None] | None = None
    batch_size = 0
    start = 0

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict, loc: SourceLoc | None):
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs
        self.loc = loc

    def __enter__(self) -> Invoker:
        self.tracer._enter_invoke(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        self.tracer._exit_invoke(self)
        return False


class WholeBatch:
    """``with tracer.invoke():`` (no input): interventions inside see every row of the batch."""

    def __init__(self, tracer: Tracer, loc: SourceLoc | None):
        self.tracer = tracer
        self.loc = loc
        self._outer: int | None = None

    def __enter__(self) -> WholeBatch:
        tracer = self.tracer
        if tracer._invoke is not None and tracer._implicit is None:
            raise InvokeError(
                "invokes cannot be nested", self.loc, "close one invoke before opening the next"
            )
        if tracer._promptless is None:
            tracer._promptless = self.loc
        self._outer, tracer._invoke = tracer._invoke, None
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        self.tracer._invoke = self._outer
        return False


class Cond:
    """``with tracer.cond(x):`` runs the interventions inside only when ``bool(x)`` holds at run time.

    ``with c.else_():`` (or ``c.else_(other)`` for an elif) opens the other branch of condition ``c``.
    """

    def __init__(self, tracer: Tracer | Session, guards: Guards, cond_ids: tuple[int, ...]):
        self.tracer = tracer
        self.guards = guards  # what nodes inside this block are guarded by
        self._cond_ids = cond_ids  # the conditions of this branch and the branches before it
        self._saved: Guards | None = None  # the guards outside the block, while it is open

    def else_(self, condition: Any = None) -> Cond:
        base = self._outer_guards()
        negated = tuple((c, False) for c in self._cond_ids)
        if condition is None:
            return Cond(self.tracer, base + negated, self._cond_ids)
        saved, self.tracer._guards = self.tracer._guards, base + negated
        try:
            proxy = self.tracer._record(Op.COND, None, (condition,))
        finally:
            self.tracer._guards = saved
        return Cond(self.tracer, base + negated + ((proxy._id, True),), self._cond_ids + (proxy._id,))

    def _outer_guards(self) -> Guards:
        own = set(self._cond_ids)
        return tuple(g for g in self.guards if g[0] not in own)

    def __enter__(self) -> Cond:
        self._saved = self.tracer._guards
        self.tracer._guards = self.guards
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        assert self._saved is not None  # set by __enter__
        self.tracer._guards = self._saved
        return False


class Barrier:
    """``b = tracer.barrier(n)``; each of ``n`` invokes calls ``b()`` before using another invoke's values.

    Values flow between invokes by data dependency, so a barrier never changes results here; it is checked:
    one that fewer than ``n`` invokes reach could never be released and is an error.
    """

    def __init__(self, tracer: Tracer, n: int, loc: SourceLoc | None):
        if not isinstance(n, int) or n < 1:
            raise TracingError(f"tracer.barrier(n) needs a positive int, got {n!r}", loc)
        self.tracer = tracer
        self.n = n
        self.loc = loc
        self.participants: set[Any] = set()

    def __call__(self) -> None:
        self.participants.add(self.tracer._invoke if self.tracer._invoke is not None else "trace")

    def check(self) -> None:
        if len(self.participants) < self.n:
            raise BarrierError(
                f"tracer.barrier({self.n}) was reached by {len(self.participants)} invoke(s), so it could never "
                "be released",
                self.loc,
                f"call the barrier in {self.n} different invokes, or create it with tracer.barrier("
                f"{max(len(self.participants), 1)})",
            )


class BackwardContext:
    """What ``loss.backward()`` returns: usable as a plain call or as ``with loss.backward(): g = h.grad``.

    As a block in a trace, the backward runs after the gradients read inside it are hooked, so the BACKWARD node
    moves to the end of the block. At session level nothing is hooked: session nodes run in program order, so the
    backward runs first and the block's reads (a parameter's ``.grad``) see its gradients.
    """

    def __init__(self, tracer: Tracer | Session, node_id: int):
        self.tracer = tracer
        self.node_id = node_id

    def __enter__(self) -> BackwardContext:
        from .session import Session  # (session.py imports this module)

        tracer = self.tracer
        if not isinstance(tracer, Session):
            tracer._defer_node(self.node_id)
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        from .session import Session

        tracer = self.tracer
        if exc_type is None and not isinstance(tracer, Session):
            tracer._undefer_node(self.node_id)
        return False


def no_input_error(loc: SourceLoc | None) -> InvokeError:
    return InvokeError(
        "tracer.invoke() was called without an input",
        loc,
        "pass the input this invoke adds to the batch, e.g. `with tracer.invoke(x):`",
    )


def here() -> SourceLoc | None:
    return user_location()
