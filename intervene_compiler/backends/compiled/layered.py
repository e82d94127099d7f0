"""Layered compiled runs: the decoder layers compiled once, the interventions run by the eager runner.

A ``compile=True`` trace normally becomes one program: model and interventions in one Dynamo graph (cache.py).
For a shared-prefix trace (``NNsight._batch_for``: a decoder family, every invoke the same one-row prompt,
nothing read but module sites) on a model whose decoder layers are large, that is the slower choice on a CPU:
such a model is compute-bound, so compiling it barely speeds a forward (GPT-2 small, 16 tokens: 77 ms compiled
against 84 ms eager), while a program that runs the whole model cannot skip the unedited layers an earlier trace
on the same prompt already computed (``backends/eager/reuse.py``), about half a patching loop's work.

A layered run is the eager runner's shared-prefix run (replay, shared prefix, suffix packing) in which every
decoder layer that runs calls one compiled ``forward`` of the layers' class instead of its own: all layers
share it (their parameters are its inputs), so it compiles once per model class and input layout, in a few
seconds, instead of the whole model. The model runs without a KV cache (``use_cache=False``: nothing reads it),
so a layer's forward has no side effect to compile. The interventions run as in eager mode, so results agree
with it by construction; the decoder layers are checked against eager layers by the parity tests.

A cost model picks it: layers of at least ``MIN_LAYER_PARAMS`` parameters, eval mode, and no autograd recording
(where reuse is possible). A layer forward that fails to compile runs eagerly from then on (the reason is
recorded, as for any fallback); an error that eager mode raises too is the user's and is raised as such.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..eager.reuse import decoder_layers
from ..eager.runner import RunResult, run_graph
from .cache import _STATS, Entry, _backend_for, _reason, record_fallback

MIN_LAYER_PARAMS = 1_000_000  # GPT-2 small's layers have 7.1M; below, one whole-model program costs less


def applies(model) -> bool:
    """Should a shared-prefix ``compile=True`` trace of ``model`` (an NNsight wrapper) run layered?"""
    module = model._module
    if module.training or not _takes_use_cache(module):
        return False
    layers = decoder_layers(model)
    if layers is None or not len(layers):
        return False
    params = list(layers[0].parameters())
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return False
    return sum(p.numel() for p in params) >= MIN_LAYER_PARAMS


def run_layered(model, graph, args: tuple, kwargs: dict, repeat: int) -> RunResult:
    """Run a shared-prefix trace's ``graph`` with compiled decoder layers (see the module docstring)."""
    layers = decoder_layers(model)
    cls = type(layers[0])
    entry = model._state.compiled.lookup(("layered", cls), lambda: Entry(key=("layered", cls), layered=True))
    if entry.fn is None:
        entry.fn = torch.compile(cls.forward, backend=_backend_for(entry), fullgraph=True)
    kwargs = {**kwargs, "use_cache": False}
    before = len(entry.graphs)
    result = run_graph(
        model, graph, args, kwargs, repeat, reuse=True, layer_forward=_layer_forward(entry, cls)
    )
    entry.calls += 1
    if entry.fallback is None:
        _STATS["compiled_calls"] += 1
        if len(entry.graphs) == before:
            _STATS["cache_hits"] += 1
    return result


def _layer_forward(entry: Entry, cls: type):
    eager = cls.forward
    compiled = entry.fn

    def forward(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if entry.fallback is not None:
            return eager(layer, *args, **kwargs)
        try:
            return compiled(layer, *args, **kwargs)
        except Exception as e:
            out = eager(layer, *args, **kwargs)  # raises the user's error, if eager mode has one too
            record_fallback(entry, _reason(e), prefix=f"{cls.__name__} layers: ")
            return out

    return forward


_TAKES_USE_CACHE: dict[type, bool] = {}


def _takes_use_cache(module: torch.nn.Module) -> bool:
    cls = type(module)
    takes = _TAKES_USE_CACHE.get(cls)
    if takes is None:
        try:
            takes = "use_cache" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            takes = False
        _TAKES_USE_CACHE[cls] = takes
    return takes
