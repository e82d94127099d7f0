"""The compiled backend: model + interventions captured by Dynamo as one FX graph, compiled by Inductor."""

from .cache import CompileCache, compile_stats, reset_compile_stats, run_compiled

__all__ = ["CompileCache", "compile_stats", "reset_compile_stats", "run_compiled"]
