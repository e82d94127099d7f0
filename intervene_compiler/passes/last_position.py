"""Last-position narrowing: compute the final position-wise module (a causal LM's unembedding) only at the last
position when nothing reads its output at any other position.

Activation patching and training read ``lm_head.output[:, -1]`` (or ``[0, -1, token]``). On GPT-2 small with 16
tokens the unembedding (768 x 50257) is about 30% of the forward, and 15/16 of it is thrown away. When

- the model says which module is its last, position-wise one (``LanguageModel``: the output embeddings, which
  ``transformers`` applies last), and the trace does not need the model's own output or read the root module,
- every reader of that module's output indexes position ``-1`` of dim 1 (``[:, -1]``, ``[:, -1, i]``,
  ``[b, -1, ...]``) and nothing sets it, reads its input, or reads a later call of it (generation),

the pass adds ``input = keep_last_position(input)`` at that module: its input shrinks to the last position (when
it has a sequence dim: 3 or more dims), so its output has one position and ``[:, -1]`` reads the same values. The
forward ends after that module (early-stop truncation runs after this pass), so nothing else sees the narrower
output; gradients are the same (the loss never depended on other positions' logits).

Columns: when, further, every reader picks fixed vocabulary entries (``logits[:, -1, A] - logits[:, -1, B]``, the
usual patching metric; ``[0, -1, [A, B]]``) and the caller hands a way to reach the module (a Linear) at run
time, the module does not run at all: each reader becomes ``unembed_columns(input, index)``, the picked
rows of the weight applied to the last position of the module's input (2 of GPT-2's 50257 columns), and the
readers' site becomes the module's input. Early-stop truncation then ends the forward before the module.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from ..ir import NO_FACTS, Graph, ModelFacts, Node, Op, Ref, Site, SiteKind
from ._base import PassResult


def keep_last_position(x: Any) -> Any:
    """``x[:, -1:]`` (contiguous) for a tensor with a sequence dim (3 or more dims); anything else unchanged.

    Contiguous: a Linear on the strided view is about 4x slower than on a copy (measured on CPU, batch 16).
    """
    if getattr(x, "ndim", 0) >= 3:
        return x[:, -1:].contiguous()
    return x


class UnembedColumns:
    """``linear(x)[index]`` for ``index = (rows, -1, tokens)``, computing only the picked output columns.

    ``ref`` is a weak reference to the Linear (``ModelFacts.unembedding``: the pass memo must not keep a model
    alive); equal for the same module.
    """

    __slots__ = ("ref",)
    __name__ = "unembed_columns"

    def __init__(self, ref: weakref.ref) -> None:
        self.ref = ref

    lifts_tokens = True  # the compiled lowering passes the tokens as a tensor param (sweeps do not recompile)

    def __call__(self, x: torch.Tensor, index: tuple, tokens: Any = None, one: bool = False) -> torch.Tensor:
        """``index`` is ``(rows, -1, tokens)``; or ``tokens`` is an int64 tensor of them (``one``: it stands for
        one int, so the result drops that dim)."""
        linear = self.ref()
        if linear is None:
            raise RuntimeError("the model this trace was optimized for no longer exists")
        rows, _, picked = index
        if tokens is not None:  # lifted by the compiled lowering (1-D: a 0-d index would be data-dependent)
            picked = tokens % linear.out_features
        elif type(picked) is tuple:  # x[:, -1, (a, b)] picks two entries; weight[(a, b)] is weight[a, b]
            picked = list(picked)
        elif (
            type(picked) is int
        ):  # one entry: weight[i] is 1-D, and F.linear takes a bias only with a 2-D weight
            picked, one = [picked], True
        last = x[rows, -1]
        if type(linear) is not torch.nn.Linear:  # a subclass (a quantized Linear) may store its weight packed
            out = linear(last)[..., picked]
        else:
            bias = linear.bias
            out = torch.nn.functional.linear(
                last, linear.weight[picked], None if bias is None else bias[picked]
            )
        return out.squeeze(-1) if one else out

    def __eq__(self, other: object) -> bool:
        return type(other) is UnembedColumns and other.ref == self.ref

    def __hash__(self) -> int:
        return hash(self.ref)

    def __repr__(self) -> str:
        return "unembed_columns"


def narrow_to_last_position(graph: Graph, facts: ModelFacts = NO_FACTS) -> PassResult:
    module = facts.last_module
    if module is None or graph.needs_output or not graph.nodes:
        return PassResult(graph, False)
    nodes = graph.nodes
    outputs: set[int] = set()
    for n in nodes:
        if n.body or n.op in (Op.CACHE, Op.STOP):
            return PassResult(graph, False)
        site = n.target if n.op in (Op.SITE, Op.SET, Op.UPDATE) else None
        if site is None:
            continue
        if site.path == "":
            return PassResult(graph, False)
        if site.path == module:
            if n.op is not Op.SITE or site.kind is not SiteKind.OUTPUT or site.call != 0:
                return PassResult(graph, False)
            outputs.add(n.id)
    if not outputs:
        return PassResult(graph, False)
    readers = [n for n in nodes if outputs.intersection(n.deps)]
    for n in readers:
        if not _reads_last_position(n, outputs):
            return PassResult(graph, False)
    if facts.unembedding is not None and readers and all(_picks_tokens(n) for n in readers):
        return PassResult(_columns_only(graph, facts.unembedding, outputs), True)
    last = max(n.id for n in nodes)
    site = Site(module, SiteKind.INPUT, 0)
    added = (
        Node(last + 1, Op.SITE, site),
        Node(last + 2, Op.CALL, keep_last_position, (Ref(last + 1),)),
        Node(last + 3, Op.SET, site, (Ref(last + 2),), (("resize", True),)),
    )
    return PassResult(graph.replace(nodes=nodes + added), True)


def _picks_tokens(node: Node) -> bool:
    """Is ``node``'s index ``(rows, -1, tokens)`` with tokens an int or a non-empty list of ints?"""
    index = node.args[1]
    if len(index) != 3:
        return False
    tokens = index[2]
    if type(tokens) is int:
        return True
    return type(tokens) in (list, tuple) and len(tokens) > 0 and all(type(t) is int for t in tokens)


def _columns_only(graph: Graph, unembedding: weakref.ref, outputs: set[int]) -> Graph:
    """Readers of ``module``'s output become ``unembed_columns(input, index)``; its output sites, input sites."""
    columns = UnembedColumns(unembedding)
    nodes = []
    for n in graph.nodes:
        if n.id in outputs:  # the same invoke's rows, of the input
            n = dataclasses.replace(n, target=dataclasses.replace(n.target, kind=SiteKind.INPUT))
        elif outputs.intersection(n.deps):
            n = dataclasses.replace(n, op=Op.CALL, target=columns)
        nodes.append(n)
    return graph.replace(nodes=tuple(nodes))


def _reads_last_position(node: Node, outputs: set[int]) -> bool:
    """Is ``node`` ``out[i, -1, ...]`` of one of ``outputs`` (i a slice of everything or a batch index)?"""
    if node.op is not Op.GETITEM or node.guards or node.after:
        return False
    base, index = node.args
    if type(base) is not Ref or base.id not in outputs or type(index) is not tuple or len(index) < 2:
        return False
    first, second = index[0], index[1]
    if type(second) is not int or second != -1:
        return False
    # dim 0 by an int or a literal slice (a tensor there could be a mask spanning dims 0 and 1); later dims freely
    if type(first) is slice:
        return all(v is None or type(v) is int for v in (first.start, first.stop, first.step))
    return type(first) is int
