"""The seam between the front-end and the backends: ``execute(graph, inputs, target, options) -> RunResult``.

The front-end (``tracing``) records an intervention graph and describes the model it runs on as a
:class:`~intervene_compiler.runtime.Target`; this function does the rest in a straight line:

1. optimize the graph (``pipeline.optimize``, memoized per model), unless the caller hands an optimized one;
2. batch the invokes' inputs, or, for identical one-row invokes of a model whose prefix can be shared, keep one
   row and a repeat count;
3. pick the backend (fake tensors, compiled generation, layered compile, one compiled program, or eager hooks);
4. run it and hand back a :class:`~intervene_compiler.runtime.RunResult` carrying the optimized graph and the
   pass steps.

Backends never import the front-end and the front-end never imports a backend: this module is the only place
that knows both sides. A third backend (remote execution) plugs in here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from . import debug
from .backends.compiled import record_fallback, run_compiled, run_generate_compiled, run_layered
from .backends.compiled.entry import signature
from .backends.compiled.layered import applies as layered_applies
from .backends.eager import leaves, plain_values, run_graph, same_leaves
from .backends.session import SessionTrace, run_session
from .ir import Graph, Op, format_graph, structure_tuple
from .ir.nodes import walk_nodes
from .pipeline import Optimized, optimize
from .runtime import RunResult, Target, nodes_memo, to_fake
from .runtime.devices import offload_reason
from .runtime.source import owner_and_call


@dataclass(frozen=True)
class RunOptions:
    """How to run a graph.

    Attributes:
        compile: run through the compiled backend (Dynamo + Inductor), falling back to eager with a recorded
            reason for what cannot compile; ``"auto"``: eagerly until the same structure (optimized graph,
            inputs' shapes, grad mode) has run ``AUTO_COMPILE_AFTER - 1`` times on the model, compiled from the
            ``AUTO_COMPILE_AFTER``-th run on (a one-off trace never pays a compile; a sweep does);
            ``"reduce-overhead"``: compiled, replayed as CUDA graphs on a CUDA device (on another device it runs as
            ``True`` and says so: a warning and ``explain()``).
        reuse: let shared-prefix runs replay (and memoize) the unedited decoder layers of earlier runs on the
            same prompt (``backends/eager/reuse.py``). Opt-in: a weight written through ``.data`` between runs
            bumps no version counter, and a replay would then be stale.
        fake: run on fake tensors (``model.scan``): shapes and dtypes, no compute.
    """

    compile: bool | str = False
    reuse: bool = False
    fake: bool = False

    @staticmethod
    def of(compile: bool | str, reuse: bool, fake: bool) -> RunOptions:
        """The options for these flags, made once (a trace asks on every run; building a frozen dataclass costs
        more than the lookup)."""
        key = (compile if compile in _MODES else bool(compile), bool(reuse), bool(fake))
        options = _OPTIONS.get(key)
        if options is None:
            options = _OPTIONS[key] = RunOptions(*key)
        return options


_OPTIONS: dict[tuple[bool | str, bool, bool], RunOptions] = {}
_MODES = ("auto", "reduce-overhead")  # the string values of compile=
EAGER = RunOptions()
AUTO_COMPILE_AFTER = 3  # compile="auto": the run of one structure that compiles (the ones before run eagerly)
_AUTO_SIZE = 1024


def compile_option(value: object) -> bool | str:
    """A ``compile=`` argument checked: ``True``, ``False``, ``"auto"`` or ``"reduce-overhead"``."""
    if isinstance(value, str) and value in _MODES:
        return value
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"compile={value!r}: pass True, False, 'auto' or 'reduce-overhead'")


def _auto_compiles(graph: Graph, inputs: list[tuple[tuple, dict]], target: Target) -> bool:
    """compile="auto": count this run of the structure (numbers abstracted, as the compiled backend lifts them to
    inputs: a value or position sweep is one structure); compile from its ``AUTO_COMPILE_AFTER``-th run on."""
    caches = target.caches
    inputs_key, grad = _inputs_key(inputs), torch.is_grad_enabled()
    last = caches.auto_last
    if last is not None and last[0] is graph and last[1] == inputs_key and last[2] is grad:
        return True  # the same optimized graph as the last run, which compiled: a repeated trace
    counts = caches.auto
    key = (_auto_number(graph, caches), inputs_key, grad)
    seen = counts.get(key, 0)
    if seen < AUTO_COMPILE_AFTER:  # (past it the structure compiles from now on: nothing left to count)
        seen += 1
        if seen == 1 and len(counts) >= _AUTO_SIZE:
            del counts[next(iter(counts))]
        counts[key] = seen
        if seen < AUTO_COMPILE_AFTER:
            return False
    caches.auto_last = (graph, inputs_key, grad)
    return True


def _inputs_key(inputs: list[tuple[tuple, dict]]) -> Any:
    """``signature(inputs)``, made directly for the common input (one invoke of one plain tensor): a key of its
    own form (no ``signature`` begins with a ``torch.Size``), found in a fraction of the time."""
    if len(inputs) == 1:
        args, kwargs = inputs[0]
        if len(args) == 1 and not kwargs:
            x = args[0]
            if type(x) is torch.Tensor:
                return (x.shape, x.dtype, x.device, x.requires_grad)
    return signature(inputs)


def _auto_number(graph: Graph, caches: Any) -> int:
    """The number of ``graph``'s structure with numbers abstracted, found once per nodes tuple (the pass memo
    hands a repeated trace the same one): equal structures, equal numbers."""
    return nodes_memo(
        caches.auto_nodes,
        graph.nodes,
        (graph.invokes, graph.kind, graph.needs_output),
        _AUTO_SIZE,
        lambda: caches.auto_numbers.of(structure_tuple(graph, numbers=False)),
    )


def execute(
    graph: Graph | Optimized,
    inputs: list[tuple[tuple, dict]],
    target: Target,
    options: RunOptions = EAGER,
) -> RunResult:
    """Optimize ``graph``, run it on ``target`` with every invoke's prepared ``(args, kwargs)`` in ``inputs``.

    Args:
        graph: the recorded graph (with the model's edits prepended), or an ``Optimized`` one the caller
            memoized.
        inputs: one ``(args, kwargs)`` per invoke, as the model wrapper prepared them; batched here.
        target: the model, as the wrapper describes it for this run.
        options: see :class:`RunOptions`.

    Returns:
        The saved values, the model's output and what the run decided (graph, steps, compiled entry).

    Raises:
        InterventionError: any error of the user's interventions, naming their line (the same type eager and
            compiled).
    """
    optimized = (
        graph if isinstance(graph, Optimized) else optimize(graph, target.facts, target.caches.optimized)
    )
    graph = optimized.graph
    if debug.DEBUG >= 1:
        print(format_graph(graph))
    if options.compile == "auto" and not options.fake:
        options = RunOptions.of(_auto_compiles(graph, inputs, target), options.reuse, False)
    args, kwargs, repeat = _batch(graph, inputs, target, options)
    compile = options.compile
    cuda_graphs = compile == "reduce-overhead"
    if compile:
        reason = _not_compiled(graph, target.generating is not None, target.module)
        if reason is not None:
            record_fallback(None, reason)
            compile = False
    if options.fake:
        result = _run_fake(target, graph, args, kwargs)
    elif compile and target.generating is not None:
        result = run_generate_compiled(target, graph, args, kwargs, cuda_graphs)
    elif compile and repeat:
        result = run_layered(target, graph, args, kwargs, repeat, options.reuse)
    elif compile:
        result = run_compiled(target, graph, args, kwargs, cuda_graphs)
    else:
        result = run_graph(target, graph, args, kwargs, repeat, options.reuse and repeat > 0)
    result.graph = graph
    result.steps = optimized.steps
    return result


def _not_compiled(graph: Graph, generating: bool, module: torch.nn.Module) -> str | None:
    """Why the compiled backend cannot run ``graph`` on ``module`` yet (then it runs eagerly, the reason
    recorded); found once per optimized graph and module (the pass memo hands back the same graph object for a
    repeated structure; whether accelerate offloads a module's weights is decided when it loads)."""
    hit = _NOT_COMPILED.get((id(graph), generating))
    if hit is not None and hit[0] is graph and hit[1]() is module:
        return hit[2]
    reason = _why_not_compiled(graph, generating) or offload_reason(module)
    if len(_NOT_COMPILED) >= 1024:
        _NOT_COMPILED.clear()
    # (keeps the graph alive: its id is not reused meanwhile; the module only by a weak reference)
    _NOT_COMPILED[(id(graph), generating)] = (graph, weakref.ref(module), reason)
    return reason


_NOT_COMPILED: dict[tuple[int, bool], tuple[Graph, weakref.ref, str | None]] = {}


def _why_not_compiled(graph: Graph, generating: bool) -> str | None:
    for n in walk_nodes(graph.nodes):
        if generating and n.op is Op.SET and ("skip", True) in n.kwargs:
            return "`.skip()` in a compiled generate block runs eagerly (not compiled yet)"
        if generating and n.op in _SITE_OPS and owner_and_call(n.target.path) is not None:
            return "op-level sites (`.source`) in a compiled generate block run eagerly (not compiled yet)"
    return None


_SITE_OPS = frozenset({Op.SITE, Op.SET, Op.UPDATE})


def _run_fake(target: Target, graph: Graph, args: tuple, kwargs: dict) -> RunResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        return run_graph(target, graph, to_fake(args, mode), to_fake(kwargs, mode))


# -- batching ----------------------------------------------------------------------------------------------------
def _batch(graph: Graph, inputs: list[tuple[tuple, dict]], target: Target, options: RunOptions):
    """``(args, kwargs, repeat)``: the batch of every invoke's input, or, when the invokes are identical one-row
    inputs to a model whose prefix can be shared, that one row and ``repeat`` = how many.

    Activation patching puts the same corrupted prompt in every invoke and edits a different position of one
    layer in each: the layers before the first edit compute the same rows. Sharing them runs the forward on one
    row up to the first site any node touches and repeats the value there (``run_graph``'s ``repeat``). It needs
    the model's later layers to broadcast one-row side inputs (attention masks, position embeddings) against the
    repeated rows, which holds for the families in ``runtime.families.DECODER_LAYERS`` (``target.shares_prefix``);
    it is used by the eager runner only (compiled traces that are layered run on it), and only for graphs that
    touch a site and need nothing else of the run. One such invoke gives ``repeat`` = 1: nothing to share within
    the run, but its unedited layers can be replayed from, and memoized for, other runs on the same prompt
    (``backends/eager/reuse.py``). A compiled run shares the prefix only when it can be layered
    (``backends/compiled/layered.py``).
    """
    if (
        not options.fake
        and target.shares_prefix
        and _prefix_graph(graph)
        # (CUDA graphs replay one program: the layered run is a loop of eager runner and compiled layers)
        and (
            not options.compile or (options.compile != "reduce-overhead" and _layered(target, graph, inputs))
        )
        and _identical_rows(inputs)
    ):
        args, kwargs = inputs[0]
        return args, kwargs, len(inputs)
    args, kwargs = target.batch(inputs)
    return args, kwargs, 0


_NOT_PREFIX_OPS = frozenset({Op.ITER, Op.CACHE, Op.GRAD, Op.SET_GRAD, Op.BACKWARD, Op.MODULE})


def _layered(target: Target, graph: Graph, inputs: list[tuple[tuple, dict]]) -> bool:
    return layered_applies(target, graph) and plain_values(leaves(inputs[0]))


def _prefix_graph(graph: Graph) -> bool:
    """Does ``graph`` touch a module site and need nothing else of the run (output, caches, gradients)?"""
    if graph.needs_output:
        return False
    touches = False
    for n in graph.nodes:
        if n.op in _NOT_PREFIX_OPS:
            return False
        if n.op is Op.SITE or n.op is Op.SET or n.op is Op.UPDATE:
            if n.target.path == "" or owner_and_call(n.target.path) is not None:
                return False
            touches = True
    return touches


def _identical_rows(inputs: list[tuple[tuple, dict]]) -> bool:
    """Are all invokes' inputs the same one-row input?"""
    first = leaves(inputs[0])
    if not any(isinstance(v, torch.Tensor) for v in first):
        return False
    if any(isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != 1) for v in first):
        return False
    return all(same_leaves(first, leaves(other)) for other in inputs[1:])


__all__ = [
    "AUTO_COMPILE_AFTER",
    "EAGER",
    "RunOptions",
    "SessionTrace",
    "compile_option",
    "execute",
    "run_session",
]
