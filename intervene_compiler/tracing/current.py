"""What is open in this context: the innermost tracing block and the session being recorded.

This is the front-end's only process-level state: two context variables, set on entering a block and reset on
leaving it (so threads and async tasks each see their own). ``_current`` names the innermost open
:class:`~intervene_compiler.tracing.Tracer`, or the open :class:`~intervene_compiler.tracing.Session` between its
traces (``ic.list()`` and friends record into it); ``_current_session`` names the session being recorded, whose
traces record into it instead of running on exit. Set (and read) by ``tracer.py`` and ``session.py``; everything
else reads them through :func:`current_tracer` and :func:`current_session`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import Session
    from .tracer import Tracer

_current: ContextVar[Tracer | Session | None] = ContextVar("intervene_compiler_tracer", default=None)
# the session being recorded (tracing/session.py); traces opened inside it become part of it
_current_session: ContextVar[Session | None] = ContextVar("intervene_compiler_session", default=None)


def current_tracer() -> Tracer | Session | None:
    """The innermost open tracing block in this context, if any (a session's own block between its traces)."""
    return _current.get()


def current_session() -> Session | None:
    """The session being recorded in this context, if any."""
    return _current_session.get()


__all__ = ["current_session", "current_tracer"]
