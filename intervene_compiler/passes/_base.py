"""The value every pass returns, as in torch.fx's pass infrastructure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..ir import Graph, ModelFacts


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool


# every pass: ``run_pass(graph, facts) -> PassResult``; a pass that needs nothing of the model ignores ``facts``
Pass = Callable[[Graph, ModelFacts], PassResult]
