"""What the passes may know about the model a graph will run on: a few facts, handed to every pass.

Passes rewrite graphs and never touch a model; when a rewrite depends on the model (which module a causal LM applies
last), the fact arrives here, built by the front-end's target (``runtime.Target``). Facts are compared by value,
so they key the pass memo.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """Facts about the model the passes may use.

    Attributes:
        last_module: path of the module the model applies last and position-wise (a causal LM's output
            embeddings); None when unknown (any plain module) or not applicable (while generating).
        unembedding: a weak reference to that module when it is a ``torch.nn.Linear``, so a pass can emit a call
            that computes a few of its output columns; None otherwise. A weak reference: a memoized graph must
            not keep a model alive, and a model whose weights are reloaded gets new facts.
    """

    last_module: str | None = None
    unembedding: weakref.ref[Any] | None = None

    def __post_init__(self) -> None:
        # hashed on every trace (memo keys): once, here, while the weak reference is alive
        object.__setattr__(self, "_hash", hash((self.last_module, self.unembedding)))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not ModelFacts:
            return NotImplemented
        return self.last_module == other.last_module and self.unembedding == other.unembedding

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]  # set in __post_init__


NO_FACTS = ModelFacts()
