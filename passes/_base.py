"""The value every pass returns, as in torch.fx's pass infrastructure."""

from __future__ import annotations

from dataclasses import dataclass

from intervene_compiler.ir import Graph


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool
