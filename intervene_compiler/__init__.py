"""intervene_compiler: nnsight's API, with interventions recorded as a graph, optimized and compiled.

``import intervene_compiler as nnsight`` runs nnsight code. Importing this package patches nothing.
"""

from .backends.compiled import compile_stats, reset_compile_stats
from .config import CONFIG
from .errors import (
    BarrierError,
    GradientError,
    InputError,
    InterventionError,
    InvokeError,
    MissedSiteError,
    ModuleIndexError,
    ProxyControlFlowError,
    SetShapeError,
    SetValueError,
    TracingError,
    UnknownModuleError,
    ValueNotReadyError,
)
from .models import LanguageModel
from .runtime import CacheEntry
from .tracing import Envoy, NNsight, Proxy, Tracer
from .tracing.builtins import (
    apply,
    bool,
    bytearray,
    bytes,
    complex,
    dict,
    float,
    int,
    list,
    save,
    set,
    str,
    tuple,
)

__version__ = "0.1.0"

__all__ = [
    "CONFIG",
    "BarrierError",
    "CacheEntry",
    "Envoy",
    "GradientError",
    "InputError",
    "InterventionError",
    "InvokeError",
    "LanguageModel",
    "MissedSiteError",
    "ModuleIndexError",
    "NNsight",
    "Proxy",
    "ProxyControlFlowError",
    "SetShapeError",
    "SetValueError",
    "Tracer",
    "TracingError",
    "UnknownModuleError",
    "ValueNotReadyError",
    "apply",
    "bool",
    "bytearray",
    "bytes",
    "compile_stats",
    "complex",
    "dict",
    "float",
    "int",
    "list",
    "reset_compile_stats",
    "save",
    "set",
    "str",
    "tuple",
]
