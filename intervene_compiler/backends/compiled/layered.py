"""Layered compiled runs: the decoder layers compiled once, the interventions run by the eager runner.

A ``compile=True`` trace normally becomes one program: model and interventions in one Dynamo graph (run.py).
For a shared-prefix trace (``execute._batch``: a decoder family, every invoke the same one-row prompt,
nothing read but module sites) on a model whose decoder layers are large, that is the slower choice on a CPU:
such a model is compute-bound, so compiling it barely speeds a forward (GPT-2 small, 16 tokens: 77 ms compiled
against 84 ms eager), while a program that runs the whole model cannot skip the unedited layers an earlier trace
on the same prompt already computed (``backends/eager/reuse.py``), about half a patching loop's work.

A layered run is the eager runner's shared-prefix run (replay, shared prefix, suffix packing) in which every
decoder layer that runs calls one compiled ``forward`` of the layers' class instead of its own: all layers
share it (their parameters are its inputs), so it compiles once per model and input layout (shapes, dtypes and
the other arguments, as a one-program key; a packed layer call is another layout), in a few seconds, instead of
the whole model. Each layout gets its own copy of the code object: its own Dynamo cache and recompile limit.
The model runs without a KV cache (``use_cache=False``: nothing reads it), so a layer's forward has no side
effect to compile. The interventions run as in eager mode, so results agree with it by construction; the compiled
layers are checked against eager mode and plain hooks by the parity tests.

A cost model picks it: a CPU model, layers of at least ``MIN_LAYER_PARAMS`` parameters, eval mode, no autograd
recording (where reuse is possible), inputs that are tensors or plain values (no KV cache passed in), no layer
whose ``forward`` is set on the instance (accelerate's dispatch hooks), and no node touching a module inside a
decoder layer (the runner's hooks there would sit inside the compiled forward). Dynamo guards on the hooks of the
modules inside a layer, as in one-program runs, so a plain hook added to one later recompiles instead of being
ignored. A layer forward that fails to compile runs eagerly from then on (the reason is recorded, as for any
fallback); an error that eager mode raises too is the user's and is raised as such.
"""

from __future__ import annotations

import inspect
import time
import types
import weakref
from typing import Any

import torch

from ...ir import Graph, Op
from ...runtime import RunResult, Target
from ...runtime.progress import note_compile
from ..eager import run_graph
from ..eager.packing import inside_a_layer
from .entry import (
    DynamoSettings,
    Entry,
    backend_for,
    cache_of,
    count_call,
    failure_reason,
    record_fallback,
    signature,
)

MIN_LAYER_PARAMS = 1_000_000  # GPT-2 small's layers have 7.1M; below, one whole-model program costs less
# where the cost model was measured (a GPU, where compiling fuses more and CUDA graphs remove the per-layer Python,
# keeps one program until measured there)
_DEVICES = frozenset({"cpu"})
_MAX_LAYOUTS = 32  # compiled layer forwards per model (prompt lengths x packed or not); then eager layers


def applies(target: Target, graph: Graph) -> bool:
    """Should a shared-prefix ``compile=True`` trace of ``target`` run ``graph`` layered?

    Not when a node touches a module inside a decoder layer: the runner's hooks there would be inside the
    compiled forward (new hooks every run: a recompile every run)."""
    module = target.module
    if module.training or not _takes_use_cache(module):
        return False
    found = target.decoder_layers()
    if found is None or not len(found[1]):
        return False
    path, layers = found
    # small layers first: the usual reason, and the cheapest to rule out
    first, size = _layer_size(layers[0])
    if first is None or first.device.type not in _DEVICES or size < MIN_LAYER_PARAMS:
        return False
    if any("forward" in layer.__dict__ for layer in layers):  # accelerate's dispatch hooks, a user's patch
        return False
    sites = (n.target.path for n in graph.nodes if n.op is Op.SITE or n.op is Op.SET or n.op is Op.UPDATE)
    if inside_a_layer(path, sites):
        return False
    # (walked per call only here, for layers big enough: the forward dwarfs it)
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in layers[0].parameters()))


_SIZES: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # layer -> (its first parameter, parameter count)


def _layer_size(layer: torch.nn.Module) -> tuple[Any, int]:
    """A decoder layer's first parameter (None: it has none) and its number of parameters, found once per layer:
    walking its modules cost more than a small compiled call. The first parameter's ``.device`` follows
    ``model.to(...)``; a parameter replaced by one of another size changes only which way a trace compiles (both
    are exact)."""
    found = _SIZES.get(layer)
    if found is None:
        params = list(layer.parameters())
        found = _SIZES[layer] = (params[0] if params else None, sum(p.numel() for p in params))
    return found


def run_layered(
    target: Target, graph: Graph, args: tuple, kwargs: dict, repeat: int, reuse: bool = False
) -> RunResult:
    """Run a shared-prefix trace's ``graph`` with compiled decoder layers (see the module docstring); ``reuse``:
    replay and memoize unedited layers across traces (``backends/eager/reuse.py``)."""
    found = target.decoder_layers()
    assert found is not None, "a layered run needs decoder layers (applies() checked them)"
    cls = type(found[1][0])
    entry = cache_of(target).lookup(("layered", cls), lambda: Entry(key=("layered", cls), layered=True))
    kwargs = {**kwargs, "use_cache": False}
    before = len(entry.graphs)
    # (with hook guards inside a layer: a hook added later recompiles instead of being ignored)
    with DynamoSettings():
        result = run_graph(
            target, graph, args, kwargs, repeat, reuse=reuse, layer_forward=_layer_forward(entry, cls)
        )
    entry.calls += 1
    if entry.fallback is None:
        count_call(entry, before)
    result.explain = entry
    return result


def _layer_forward(entry: Entry, cls: type[torch.nn.Module]):
    """The layers' forward for one run: the compiled function of the call's layout (input shapes, dtypes and
    the other arguments; one layer call of a packed run differs from an unpacked one), made on first use."""
    eager = cls.forward
    layouts = entry.layouts

    def forward(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if entry.fallback is not None:
            return eager(layer, *args, **kwargs)
        key = (signature(args), signature(kwargs))
        compiled = layouts.get(key)
        fresh = compiled is None  # this call compiles it
        if compiled is None:
            if len(layouts) >= _MAX_LAYOUTS:  # (an argument keyed by identity would compile every call)
                record_fallback(
                    entry, f"more than {_MAX_LAYOUTS} call layouts", prefix=f"{cls.__name__} layers: "
                )
                return eager(layer, *args, **kwargs)
            layout = Entry(key=key)  # counts its own recompiles (a guard failure within one layout)
            compiled = layouts[key] = torch.compile(
                _fresh(cls.forward), backend=_backend(entry, layout), fullgraph=True
            )
        try:
            if not fresh:
                return compiled(layer, *args, **kwargs)
            start = time.perf_counter()
            out = compiled(layer, *args, **kwargs)
            note_compile(
                f"the {cls.__name__} forward shared by every decoder layer", time.perf_counter() - start
            )
            return out
        except Exception as e:
            out = eager(layer, *args, **kwargs)  # raises the user's error, if eager mode has one too
            record_fallback(entry, failure_reason(e), prefix=f"{cls.__name__} layers: ")
            return out

    return forward


def _backend(entry: Entry, layout: Entry):
    inner = backend_for(layout)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        entry.graphs.append(gm)
        return inner(gm, example_inputs)

    return backend


def _fresh(fn):
    """``fn`` with its own copy of its code object: Dynamo keeps its cache and recompile limit per code object,
    and every model of a layer class (and its decorators' wrappers) would otherwise share one."""
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    return copy


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
