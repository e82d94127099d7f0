"""The compiled backend: model + interventions captured by Dynamo as one FX graph, compiled by Inductor."""

from .entry import CompileCache, compile_stats, record_fallback, reset_compile_stats
from .generate import run_generate_compiled
from .layered import run_layered
from .run import run_compiled

__all__ = [
    "record_fallback",
    "CompileCache",
    "compile_stats",
    "reset_compile_stats",
    "run_compiled",
    "run_generate_compiled",
    "run_layered",
]
