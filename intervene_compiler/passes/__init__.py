"""IR passes: small pure functions ``(graph, facts) -> PassResult``. Imports only ``ir`` and ``errors``.

Only ``intervene_compiler.pipeline`` imports this package; it lists the passes in order. What a pass needs to know
about the model arrives in ``facts`` (``ir.ModelFacts``), never by reaching into a model.
"""

from ._base import Pass, PassResult
from .dead_values import eliminate_dead_values
from .early_stop import truncate_after_last_use
from .last_position import keep_last_position, narrow_to_last_position
from .setitem_fusion import fuse_setitems

__all__ = [
    "Pass",
    "PassResult",
    "eliminate_dead_values",
    "fuse_setitems",
    "keep_last_position",
    "narrow_to_last_position",
    "truncate_after_last_use",
]
