"""The front-end: envoys, proxies and tracing contexts that record an intervention graph."""

from .contexts import BackwardContext, Barrier, Cond, Invoker
from .envoy import Envoy
from .model import Editor, NNsight
from .proxy import Proxy
from .session import Loop, Session, current_session
from .tracer import Shape, Tracer, current_tracer

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
