"""Runtime pieces below both the front-end and the backends: the target, run results, value ops, rows, fakes.

May import ``ir``, ``errors`` and torch; never ``tracing``, ``passes`` or a backend.
"""

from .fakes import fake_copy, to_fake
from .families import DECODER_LAYERS, decoder_layers_path, unembedding_path
from .results import CacheEntry, RunResult
from .rows import narrow, repeat_rows, replace
from .target import ModelCaches, Target
from .values import VALUE_OPS, resolve

__all__ = [
    "DECODER_LAYERS",
    "VALUE_OPS",
    "CacheEntry",
    "ModelCaches",
    "RunResult",
    "Target",
    "decoder_layers_path",
    "fake_copy",
    "narrow",
    "repeat_rows",
    "replace",
    "resolve",
    "to_fake",
    "unembedding_path",
]
