"""The eager backend: the reference semantics (hooks run the IR while the model runs)."""

from .runner import CacheEntry, RunResult, run_graph

__all__ = ["CacheEntry", "RunResult", "run_graph"]
