"""Compiled programs cached by structure, one entry function (a fresh code object) per structure key.

The key is the lowered graph's structure (params abstracted to dtype/shape), the model inputs' shapes and dtypes,
and grad mode. Each key gets its own copy of the entry function's code object, so keys never share a Dynamo
cache or its recompile limit. A structure that cannot compile as one graph falls back to the eager backend; the
reason is recorded in :func:`compile_stats` and shown by ``tracer.explain()``, never silent.
"""

from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ...ir import Graph, Op, Ref, saved_ids, structure_tuple
from ..eager.runner import CacheEntry, RunResult, run_graph
from .lowering import lift_family, lift_values
from .program import (
    BackwardSplit,
    Dispatcher,
    GradEdits,
    Program,
    dynamic_conds_of,
    effective_guards,
    family_gates,
    host_only_params,
    record_schedule,
    split_backward,
    unpredicated_reason,
)

_STATS: dict[str, Any] = {}


def reset_compile_stats() -> None:
    """Zero the counters :func:`compile_stats` reports."""
    _STATS.clear()
    _STATS.update(compiles=0, cache_hits=0, recompiles=0, fallbacks=0, fallback_reasons=[], compiled_calls=0)


def compile_stats() -> dict[str, Any]:
    """Counters of the compiled backend since the last reset.

    ``compiles``: graphs compiled by Inductor; ``recompiles``: compiles of a key that already had a graph (a
    guard failed); ``cache_hits``: compiled calls that reused a program; ``fallbacks``/``fallback_reasons``:
    structures that run eagerly, and why; ``compiled_calls``: calls that ran compiled.
    """
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _STATS.items()}


reset_compile_stats()

# Opt-in: compile repeated blocks no program looks inside (transformer layers) as nested compile regions
# (Dispatcher.regions). GPT-2-small, one patch structure: cold compile 15 s instead of 20 s, but a warm new
# process 5.3 s instead of 4.9 s (Dynamo's region bookkeeping), and torch 2.13 has gradient bugs there.
REGIONAL = False

_UNSUPPORTED: dict[Op, str] = {}  # ops whose traces always run eagerly, and why (none now)


@dataclass
class Entry:
    """One structure's compiled program (or its fallback reason)."""

    key: Any
    program: Program | None = None
    fn: Any = None
    fallback: str | None = None
    layered: bool = False  # compiled decoder layers under the eager runner (layered.py), not one program
    layouts: dict = field(default_factory=dict)  # layered: a layer call's layout -> its compiled forward
    graphs: list = field(default_factory=list)  # FX graphs our backend received (the spliced program)
    calls: int = 0
    split: BackwardSplit | None = None
    probe_specs: tuple = ()  # (shape, dtype, device) of each activation-gradient probe
    # tracer.cond: node id -> its effective guards (see program.effective_guards); COND id -> value of each
    # condition on a Python value (fixed for the key); COND id -> its line
    guards: dict = field(default_factory=dict)
    static_conds: dict = field(default_factory=dict)
    cond_locs: dict = field(default_factory=dict)
    # tracer.cache() nodes and saves of them -> entry names in the eager cache's order (CacheEntry dicts on the host)
    cache_ids: dict = field(default_factory=dict)
    regional: bool = False  # repeated blocks compile as nested regions (see Dispatcher.regions)


class CompileCache:
    """Per-model cache of compiled entries, with the model's dispatcher hooks."""

    def __init__(self, size: int = 64):
        self.entries: OrderedDict[Any, Entry] = OrderedDict()
        self.size = size
        self.dispatcher: Dispatcher | None = None
        self.last: Entry | None = None

    def lookup(self, key: Any, build) -> Entry:
        """The entry for ``key``, made by ``build()`` on a miss (evicting the oldest past ``size``); it becomes
        ``last`` (what ``tracer.explain()`` reports)."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = build()
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        self.last = entry
        return entry

    def clear(self) -> None:
        self.entries.clear()
        self.last = None
        if self.dispatcher is not None:
            self.dispatcher.remove()
            self.dispatcher = None


_FIRST_TENSOR: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # module -> its first param/buffer, or None
_CPU = torch.device("cpu")


def model_device(module: torch.nn.Module) -> torch.device:
    """Where the model computes (its first parameter's or buffer's device; the CPU for a model with neither):
    lifted indices, family gates and probes are made there. The tensor is found once per model (walking every
    module for it cost more than the rest of a small compiled call); ``module.to(device)`` moves that same
    Parameter object, so its ``.device`` stays current."""
    try:
        first = _FIRST_TENSOR[module]
    except KeyError:
        first = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        _FIRST_TENSOR[module] = first
    return _CPU if first is None else first.device


_HOST_ONLY: dict[Any, frozenset[int]] = {}  # (structure, tensor params) -> host_only_params


def run_compiled(model, graph: Graph, args: tuple, kwargs: dict) -> RunResult:
    """Run ``graph`` compiled (or eagerly, if its structure cannot compile): the compiled backend's entry."""
    cache: CompileCache = model._state.compiled
    device = model_device(model._module)
    lowered = lift_values(graph, device)
    keyed, family = lift_family(lowered, model._module, device)  # a ModuleList member index becomes an input
    structure = structure_tuple(keyed)
    # a property of the structure and which params are tensors: found once, not per call
    host_key = (structure, tuple([isinstance(p, torch.Tensor) for p in keyed.params]))
    host_only = _HOST_ONLY.get(host_key)
    if host_only is None:
        host_only = _HOST_ONLY[host_key] = host_only_params(keyed)
        if len(_HOST_ONLY) > 1024:
            del _HOST_ONLY[next(iter(_HOST_ONLY))]
    key = (
        structure,
        _param_signature(keyed.params, host_only),
        _signature(args),
        _signature(kwargs),
        torch.is_grad_enabled(),
    )
    entry = cache.lookup(key, lambda: _build(model, cache, lowered, key, args, kwargs, family))
    if entry.fallback is not None:
        return run_graph(model, graph, args, kwargs)
    compiled_before = len(entry.graphs)
    probes = tuple(
        torch.zeros(shape, dtype=dtype, device=where, requires_grad=True)
        for shape, dtype, where in entry.probe_specs
    )
    try:
        gates = () if family is None else family_gates(family.size, family.member, device)
        saved, output = _call(cache, entry, keyed.params + probes + gates, args, kwargs)
    except (
        Exception
    ) as e:  # a structure Dynamo cannot capture as one graph: eager from now on, with the reason
        record_fallback(entry, _reason(e))
        return run_graph(model, graph, args, kwargs)
    entry.calls += 1
    _STATS["compiled_calls"] += 1
    if len(entry.graphs) == compiled_before:
        _STATS["cache_hits"] += 1
    program = entry.program
    env = dict(zip(program.saved_ids + program.needed + program.dynamic_conds, saved))
    wanted = saved_ids(graph.nodes)
    skipped: dict = {}
    held = None
    if entry.guards:  # tracer.cond: drop what a false condition skipped (computed anyway, see Program)
        flags = {**entry.static_conds, **{c: bool(env[c]) for c in program.dynamic_conds}}

        def held(nid: int) -> bool:
            for g, want in entry.guards.get(nid, ()):
                if g in flags and flags[g] != want:
                    skipped[nid] = entry.cond_locs.get(g)
                    return False
            return True

        for nid in wanted:
            held(nid)
    if entry.split.post:
        _run_after_backward(entry.split, program, env, probes, lowered.params, held)
    values = {i: env[i] for i in wanted if i in env and i not in skipped}
    for i, names in entry.cache_ids.items():
        if i in values:
            got = values[i]
            values[i] = {name: CacheEntry(*got[name]) for name in names if name in got}
    return RunResult(values, output, None, {i: skipped[i] for i in wanted if i in skipped})


def _run_after_backward(
    split: BackwardSplit, program: Program, env: dict, probes: tuple, params: tuple, held=None
) -> None:
    """Run the backward calls, then the nodes that read gradients, on the compiled forward's results
    (and host effects: logs, appends to outside lists). ``held(node id)``: False for a node a false
    ``tracer.cond`` skips. Gradient edits run during the backward, when it reaches their site (GradEdits)."""
    from ...errors import InterventionError, execution_error
    from ...ir import format_node
    from ..eager.interpreter import VALUE_OPS, resolve

    def value_of(node):
        """A post node's value (a SET_GRAD's: the gradient it sets); an error names the user's line."""
        try:
            if node.op is Op.SET_GRAD:
                return resolve(node.args[1], env.__getitem__, params.__getitem__)
            a = resolve(node.args, env.__getitem__, params.__getitem__)
            kw = {k: resolve(v, env.__getitem__, params.__getitem__) for k, v in node.kwargs}
            return VALUE_OPS[node.op](node, a, kw)
        except InterventionError:
            raise
        except Exception as e:
            raise execution_error(e, node.loc, format_node(node)) from e

    def run(node) -> None:
        if held is not None and not held(node.id):
            return
        if node.op is Op.GRAD:
            env[node.id] = _probe_grad(node, probes[split.probes[node.args[0].id]])
        elif node.op is Op.SET_GRAD:  # no backward reached its site: nothing to change
            env[node.id] = None
        else:
            env[node.id] = value_of(node)

    edits = GradEdits(split, env, value_of, held) if split.edits else None
    if edits is not None:
        GradEdits.active.append(edits)
    try:
        for node in split.post:
            if node.op is Op.BACKWARD:
                run(node)
    finally:
        if edits is not None:
            GradEdits.active.pop()
    for node in split.post:
        if node.op is not Op.BACKWARD and node.id not in env:  # not run by a gradient edit
            run(node)


def _probe_grad(node, probe: torch.Tensor) -> torch.Tensor:
    from ...errors import GradientError

    if probe.grad is None:
        raise GradientError(
            "`.grad` was read, but no backward pass reached this value",
            node.loc,
            "call `loss.backward()` in the block with a loss that depends on this value",
        )
    return probe.grad


def _build(model, cache: CompileCache, graph: Graph, key, args: tuple, kwargs: dict, family=None) -> Entry:
    entry = Entry(key)
    reason = next((why for n in graph.nodes if (why := _UNSUPPORTED.get(n.op)) is not None), None)
    if reason is None and any(n.body for n in graph.nodes):
        reason = "nested graphs are not compiled yet"
    split = None
    if reason is None:
        split, reason = split_backward(graph)
    if reason is None:
        try:
            recorder = record_schedule(model, split.forward, args, kwargs)
        except Exception as e:  # the eager run will raise the user's error, or run what fakes cannot
            reason = f"could not record the schedule on fake tensors ({type(e).__name__}: {e})"
            reason = reason.splitlines()[0]
    if reason is not None:
        record_fallback(entry, reason)
        return entry
    _prewarm_inductor()
    if cache.dispatcher is None:
        cache.dispatcher = Dispatcher(model._module)
    entry.split = split
    entry.probe_specs = tuple(
        (tuple(recorder.env[site].shape), recorder.env[site].dtype, recorder.env[site].device)
        for site in sorted(split.probes, key=split.probes.get)
    )
    dynamic_conds = dynamic_conds_of(split.forward.nodes, recorder)
    if any(n.op is Op.COND for n in graph.nodes):
        entry.guards = effective_guards(graph.nodes)
        entry.cond_locs = {n.id: n.loc for n in graph.nodes if n.op is Op.COND}
        entry.static_conds = {
            n.id: v
            for n in split.forward.nodes
            if n.op is Op.COND and type(v := recorder.env.get(n.id)) is bool
        }
        if any(n.op in (Op.BACKWARD, Op.GRAD) and entry.guards.get(n.id) for n in split.post):
            record_fallback(entry, "a backward pass or `.grad` under a `tracer.cond` is not compiled")
            return entry
        reason = unpredicated_reason(split.forward.nodes, entry.guards, dynamic_conds)
        if reason is not None:
            record_fallback(entry, reason)
            return entry
    caches = {n.id: tuple(recorder.env[n.id]) for n in split.forward.nodes if n.op is Op.CACHE}
    if caches:
        entry.cache_ids = dict(caches)
        for n in graph.nodes:
            if n.op is Op.SAVE and type(n.args[0]) is Ref and n.args[0].id in caches:
                entry.cache_ids[n.id] = caches[n.args[0].id]
    entry.program = Program(model, split.forward, recorder.order, split, dynamic_conds, caches)
    # not generation steps: there a decode step after an in-place edit of a block's output read wrong values
    entry.regional = True
    if family is not None:
        entry.program.set_family(family, int(family.member))
    # static shapes: the key already holds them, and automatic-dynamic state is shared by name across copies
    entry.fn = torch.compile(_fresh_entry(), fullgraph=True, dynamic=False, backend=_backend_for(entry))
    return entry


def _call(cache: CompileCache, entry: Entry, params: tuple, args: tuple, kwargs: dict):
    dispatcher = cache.dispatcher
    dispatcher.ensure(entry.program)
    dispatcher.program = entry.program
    try:
        regions = dispatcher.usable_regions() if REGIONAL and entry.regional else ()
        try:
            return _call_with(entry, params, args, kwargs, regions)
        except Exception:
            if not regions:
                raise
            # a model whose blocks Dynamo cannot capture as regions: this key compiles them inline
            entry.regional = False
            return _call_with(entry, params, args, kwargs, ())
    finally:
        dispatcher.program = None


def _call_with(entry: Entry, params: tuple, args: tuple, kwargs: dict, regions: tuple):
    for member, fn, _ in regions:
        member.__dict__["forward"] = fn
    config = torch._dynamo.config
    # hook guards on (a graph never outlives a hook change); set directly: config.patch() builds a class per call
    skip = config.skip_nnmodule_hook_guards
    config.skip_nnmodule_hook_guards = False
    try:
        return entry.fn(entry.program, params, args, kwargs)
    finally:
        config.skip_nnmodule_hook_guards = skip
        for member, _, _ in regions:
            member.__dict__.pop("forward", None)


def _entry(program, params, args, kwargs):
    return program.run(params, args, kwargs)


def _fresh_entry():
    """A copy of ``_entry`` with its own code object: its own Dynamo cache and recompile budget."""
    code = _entry.__code__.replace()
    return types.FunctionType(code, _entry.__globals__, "_entry", None, None)


_PREWARM: list = []  # the thread started by _prewarm_inductor, once per process


def _prewarm_inductor() -> None:
    """Start Inductor's per-process CPU ISA probe in a thread, so it overlaps Dynamo's tracing.

    ``pick_vec_isa`` dry-compiles a test program per ISA and ``dlopen``s it in a child Python (about 1.2 s per
    process, even with a warm on-disk cache); it waits on subprocesses, so the thread does not hold the GIL.
    The modules it imports are imported here first, and the backend joins the thread before compiling.
    """
    if _PREWARM:
        return
    import threading

    try:
        from torch._inductor import codecache, cpp_builder  # noqa: F401
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except Exception:
        return

    def probe():
        try:
            pick_vec_isa()
        except Exception:  # Inductor probes again (and reports) when it compiles
            pass

    thread = threading.Thread(target=probe, name="intervene-inductor-prewarm", daemon=True)
    _PREWARM.append(thread)
    thread.start()


def _join_prewarm() -> None:
    for thread in _PREWARM:
        thread.join()


def _backend_for(entry: Entry):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        _join_prewarm()
        if entry.graphs:
            _STATS["recompiles"] += 1
        _STATS["compiles"] += 1
        entry.graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


def record_fallback(entry: Entry | None, reason: str, prefix: str = "") -> None:
    """Count a fallback and keep its reason (``prefix`` + reason in ``compile_stats``); ``entry`` runs eagerly."""
    if entry is not None:
        entry.fallback = reason
    _STATS["fallbacks"] += 1
    _STATS["fallback_reasons"].append(prefix + reason)


def _reason(e: BaseException) -> str:
    """One line for a compile failure: our own error when Dynamo wraps one raised in the program it traced."""
    while isinstance(e, torch._dynamo.exc.Unsupported) and isinstance(
        e.__cause__ or e.__context__, Exception
    ):
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    t = type(value)
    if t is tuple or t is list:
        return (t.__name__, *(_signature(v) for v in value))
    if t is dict:
        return ("{", *((k, _signature(v)) for k, v in value.items()))
    layers = getattr(value, "layers", None)
    if isinstance(layers, list) and hasattr(value, "get_seq_length"):  # a KV cache: by layout, not identity
        return (t.__qualname__, tuple(_kv_layer_signature(layer) for layer in layers))
    try:
        hash(value)
    except TypeError:
        return (t.__qualname__, id(value))
    return value


def _kv_layer_signature(layer: Any) -> tuple:
    """A KV cache layer's type and tensors' signatures; Dynamo's own guards check the rest of the object."""
    tensors = tuple(
        _signature(v) for k, v in sorted(vars(layer).items()) if isinstance(v, torch.Tensor) and k != "device"
    )
    return (type(layer).__qualname__, getattr(layer, "is_initialized", None), tensors)


def _param_signature(params: tuple, host_only: frozenset[int] = frozenset()) -> tuple:
    """Tensors by shape/dtype; other objects by identity (the graph may bake them in), except containers only
    host effects touch (they never enter the graph, see ``split_backward``), which key by type."""
    return tuple(
        _signature(p)
        if isinstance(p, torch.Tensor)
        else (type(p).__qualname__,)
        if i in host_only
        else (type(p).__qualname__, id(p))
        for i, p in enumerate(params)
    )
