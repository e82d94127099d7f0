"""The eager backend: the reference semantics (hooks run the IR while the model runs)."""

from .reuse import leaves, plain_values, same_leaves
from .runner import run_graph

__all__ = ["leaves", "plain_values", "run_graph", "same_leaves"]
