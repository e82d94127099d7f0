"""The front-end: envoys, proxies and tracing contexts that record an intervention graph."""

from .contexts import BackwardContext, Barrier, Cond, Invoker
from .current import current_session, current_tracer
from .envoy import Envoy
from .model import Editor, NNsight
from .proxy import Proxy
from .session import Loop, Session
from .shapes import Shape
from .tracer import Tracer

__all__ = [
    "BackwardContext",
    "Barrier",
    "Cond",
    "Editor",
    "Envoy",
    "Invoker",
    "Loop",
    "NNsight",
    "Proxy",
    "Session",
    "Shape",
    "Tracer",
    "current_session",
    "current_tracer",
]
