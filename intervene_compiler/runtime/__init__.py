"""Runtime pieces below both the front-end and the backends: the target, run results, value ops, rows, fakes.

May import ``ir``, ``errors`` and torch; never ``tracing``, ``passes`` or a backend.
"""

from .fakes import fake_copy, to_fake
from .families import (
    DECODER_LAYERS,
    check_positions,
    check_token_ids,
    decoder_layers_path,
    token_limits,
    unembedding_path,
)
from .inert import strip_inert_hooks
from .results import CacheEntry, ModuleCache, RunResult
from .rows import conform, narrow, repeat_rows, replace
from .target import ModelCaches, StructureNumbers, Target, nodes_memo
from .values import VALUE_OPS, resolve

__all__ = [
    "DECODER_LAYERS",
    "VALUE_OPS",
    "CacheEntry",
    "ModelCaches",
    "StructureNumbers",
    "ModuleCache",
    "RunResult",
    "Target",
    "check_positions",
    "check_token_ids",
    "conform",
    "decoder_layers_path",
    "fake_copy",
    "narrow",
    "nodes_memo",
    "repeat_rows",
    "replace",
    "resolve",
    "strip_inert_hooks",
    "to_fake",
    "token_limits",
    "unembedding_path",
]
