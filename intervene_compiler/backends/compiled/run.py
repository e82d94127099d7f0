"""One compiled program per structure: ``run_compiled``, the compiled backend's entry for a plain trace.

The key is the lowered graph's structure (params abstracted to dtype/shape), the model inputs' shapes and dtypes,
and grad mode. Each key gets its own copy of the entry function's code object, so keys never share a Dynamo
cache or its recompile limit. A structure that cannot compile as one graph falls back to the eager backend; the
reason is recorded in :func:`compile_stats` and shown by ``tracer.explain()``, never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import GradientError, InterventionError, execution_error
from ...ir import Graph, Op, Ref, format_node, saved_ids, structure_tuple
from ...runtime import VALUE_OPS, CacheEntry, ModuleCache, RunResult, Target, nodes_memo, resolve
from ...runtime.source import SOURCE, owner_and_call
from ..eager import no_backward_error, run_graph
from ..eager.events import skip_forward
from .backward import BackwardSplit, host_only_params, split_backward
from .dispatcher import Dispatcher
from .entry import (
    MISSED,
    STATS,
    UNSUPPORTED,
    CompileCache,
    Entry,
    cache_of,
    call,
    compile_entry,
    count_call,
    cuda_graphs_state,
    failure_reason,
    first_tensor,
    model_device,
    param_signature,
    plain_call,
    prewarm_inductor,
    record_fallback,
    signature,
)
from .grad_edits import GradEdits
from .lowering import Family, check_bounds, index_bounds, lift_family, lift_values
from .predication import effective_guards, unpredicated_reason
from .program import NoGradientThere, Program, family_gates
from .schedule import dynamic_conds_of, record_schedule


def run_compiled(
    target: Target, graph: Graph, args: tuple, kwargs: dict, cuda_graphs: bool = False
) -> RunResult:
    """Run ``graph`` compiled (or eagerly, if its structure cannot compile): the compiled backend's entry.
    ``cuda_graphs``: replay the program as CUDA graphs (``compile="reduce-overhead"``; see ``entry.cuda_graphs_state``)."""
    cache = cache_of(target)
    hot: Hot | None = cache.hot
    if hot is not None and hot.graph is graph and hot.entry is cache.last and hot.cuda_graphs is cuda_graphs:
        # the last call's graph again (a repeated trace): its entry, as found then, unless the call differs
        if hot.inputs is not None:
            result = _run_hot(target, graph, args, kwargs, cache, hot, hot.inputs)
            if result is not None:  # (None: a guard failed; the full lookup below finds this call's entry)
                return result
        elif _same_call(hot, cache, args, kwargs):
            return _run_entry(target, graph, args, kwargs, cache, hot.plan, hot.device, hot.entry, True)
    mixed = _mixed_precision_input(args, kwargs, cache, target.module)
    if mixed is not None:
        record_fallback(None, mixed)
        return run_graph(target, graph, args, kwargs)
    device = model_device(target.module)
    plan = _plan_of(cache, graph, target.module, device)
    lowered_params = graph.params + plan.lifted
    params = lowered_params + plan.member  # a ModuleList member index is an input (lift_family)
    args_key, kwargs_key, grad = signature(args), signature(kwargs), torch.is_grad_enabled()
    key = (
        plan.sid,
        _param_signature(cache, plan, graph, params) if params else (),
        args_key,
        kwargs_key,
        grad,
        cuda_graphs,
    )
    entry = cache.lookup(
        key,
        lambda: _build(
            cuda_graphs,
            target,
            cache,
            graph.replace(nodes=plan.lowered_nodes, params=lowered_params),
            key,
            args,
            kwargs,
            plan.family,
        ),
    )
    calls = entry.calls
    result = _run_entry(target, graph, args, kwargs, cache, plan, device, entry, False)
    if entry.calls > calls and not graph.params:  # it ran compiled: a repeat of this call can skip the above
        # (a graph with params is a new object per trace: never the same again)
        weights, first = _weights_dtype(cache), first_tensor(target.module)
        inputs = params if _simple(entry, plan) else None
        exact = entry.program is not None and tuple(entry.program.returned_ids) == tuple(plan.wanted)
        cache.hot = Hot(
            graph, entry, args_key, kwargs_key, grad, cuda_graphs, weights, plan, device, first, inputs, exact
        )
    return result


def _same_call(hot: Hot, cache: CompileCache, args: tuple, kwargs: dict) -> bool:
    """Is this call what the key of ``hot``'s entry was made of (inputs' signature, grad mode, the weights'
    dtype and device)?"""
    return (
        hot.args == signature(args)
        and hot.kwargs == signature(kwargs)
        and hot.grad is torch.is_grad_enabled()
        and hot.weights is _weights_dtype(cache)
        # (``model.to(device)``: the plan's lifted constants are on the old one)
        and (hot.first is None or hot.first.device == hot.device)
    )


def _simple(entry: Entry, plan: Plan) -> bool:
    """Does a call of ``entry`` (for ``plan`` of a graph without params) take only its direct call (Dynamo's guards
    checked by our call path) and give back the values its program returns: nothing set up around the call, no
    gradient probes, member gates or index bounds, no condition, backward or cache on the host?"""
    split = entry.split
    return (
        entry.direct is not None
        and plain_call(entry)
        and not entry.probe_specs
        and plan.family is None
        and not (plan.ints and entry.bounds)
        and not entry.guards
        and split is not None
        and not split.post
        and not entry.cache_ids
    )


def _run_hot(
    target: Target, graph: Graph, args: tuple, kwargs: dict, cache: CompileCache, hot: Hot, inputs: tuple
) -> RunResult | None:
    """A repeat of the last call of a simple entry (:func:`_simple`): its direct call on the inputs kept then,
    when Dynamo's guards for it pass. They cover what the entry's key was made of (the inputs' shapes, dtypes and
    devices, the grad mode, the weights), so a call they fail returns None and is looked up in full."""
    entry, program = hot.entry, hot.entry.program
    if program is None:  # (never for an entry that ran compiled)
        return None
    try:
        ran = call(cache, entry, inputs, args, kwargs, direct_only=True)
    except Exception as e:
        return _call_failed(e, target, graph, args, kwargs, cache, entry)
    if ran is MISSED:
        return None
    saved, output = ran
    entry.calls += 1
    stats = STATS  # count_call's counts (a direct call compiles nothing: a cache hit), and this one's
    stats["compiled_calls"] += 1
    stats["cache_hits"] += 1
    stats["repeat_calls"] += 1
    env = dict(zip(program.returned_ids, saved))
    values = env if hot.exact else {i: env[i] for i in hot.plan.wanted if i in env}
    return RunResult(values, output, None, {}, explain=entry)


def _call_failed(
    e: Exception, target: Target, graph: Graph, args: tuple, kwargs: dict, cache: CompileCache, entry: Entry
) -> RunResult:
    """A compiled call of ``entry`` raised ``e``: the eager run, which reports a user's mistake at their line."""
    cache.hot = None
    if _interrupted(e):  # Ctrl-C while Dynamo traced: not the structure's fault, and not to be swallowed
        cache.forget(entry.key)
        raise KeyboardInterrupt from None
    if _users_error(e):  # the user's mistake, raised while Dynamo traced: eager raises it at their line
        cache.forget(entry.key)  # and the next call (once fixed) compiles
        return _eager(target, graph, args, kwargs, entry)
    # a structure Dynamo cannot capture as one graph: eager from now on, with the reason
    record_fallback(entry, failure_reason(e))
    return _eager(target, graph, args, kwargs, entry)


def _run_entry(
    target: Target,
    graph: Graph,
    args: tuple,
    kwargs: dict,
    cache: CompileCache,
    plan: Plan,
    device: torch.device,
    entry: Entry,
    repeat: bool,
) -> RunResult:
    """Run ``entry`` (found for ``graph``'s ``plan``, or kept from the last call: ``repeat``) on the call's
    inputs."""
    key = entry.key
    family = plan.family
    lowered_params = graph.params + plan.lifted if graph.params else plan.lifted
    params = lowered_params + plan.member  # a ModuleList member index is an input (lift_family)
    program, split = entry.program, entry.split
    if entry.users_error:
        cache.forget(key)
        return _eager(target, graph, args, kwargs, entry)
    if entry.fallback is not None or program is None or split is None:  # (a compiled entry has both)
        return _eager(target, graph, args, kwargs, entry)
    ints = plan.ints
    if ints and entry.bounds:
        check_bounds(graph, ints, entry.bounds)
    compiled_before = len(entry.graphs)
    probes = (
        tuple(
            torch.zeros(shape, dtype=dtype, device=where, requires_grad=True)
            for shape, dtype, where in entry.probe_specs
        )
        if entry.probe_specs
        else ()
    )
    try:
        inputs = params + probes if probes else params
        if family is not None:
            inputs += family_gates(family.size, family.member, device)
        saved, output = call(cache, entry, inputs, args, kwargs)
    except Exception as e:
        return _call_failed(e, target, graph, args, kwargs, cache, entry)
    entry.calls += 1
    count_call(entry, compiled_before)
    if repeat:
        STATS["repeat_calls"] += 1
    env = dict(zip(program.returned_ids, saved))
    wanted = plan.wanted
    if not entry.guards and not split.post and not entry.cache_ids:  # a plain trace's values as returned
        return RunResult({i: env[i] for i in wanted if i in env}, output, None, {}, explain=entry)
    skipped: dict = {}
    held: Callable[[int], bool] | None = None
    if entry.guards:  # tracer.cond: drop what a false condition skipped (computed anyway, see Program)
        flags = {**entry.static_conds, **{c: bool(env[c]) for c in program.dynamic_conds}}

        def held_by(nid: int) -> bool:
            for g, want in entry.guards.get(nid, ()):
                if g in flags and flags[g] != want:
                    skipped[nid] = entry.cond_locs.get(g)
                    return False
            return True

        held = held_by
        for nid in wanted:
            held(nid)
    if split.post:
        _run_after_backward(split, program, env, probes, lowered_params, held)
    values = {i: env[i] for i in wanted if i in env and i not in skipped}
    for i, names in entry.cache_ids.items():
        if i in values:
            got = values[i]
            values[i] = ModuleCache({name: CacheEntry(*got[name]) for name in names if name in got})
    skipped = {i: skipped[i] for i in wanted if i in skipped}
    return RunResult(values, output, None, skipped, explain=entry)


@dataclass(frozen=True, slots=True)
class Hot:
    """A model's last plain compiled call (``CompileCache.hot``): the graph (the pass memo hands a repeated trace
    the same object), what its key was made of, and what was found for it. A call of the same graph whose entry is
    still the cache's last takes that entry instead of finding it again (the mixed-precision check, the plan memo,
    the key and the lookup would all give the same answer) when the call is the same: for a simple entry
    (``inputs`` kept), when Dynamo's guards for its code pass (:func:`_run_hot`); for another, when the inputs'
    signature, the grad mode and the weights' dtype and device are the same (:func:`_same_call`). Only a graph
    without params is kept."""

    graph: Graph
    entry: Entry
    args: Any
    kwargs: Any
    grad: bool
    cuda_graphs: bool
    weights: torch.dtype | None
    plan: Plan
    device: torch.device
    first: torch.Tensor | None  # the tensor whose device model_device read
    # a simple entry's (see _simple): the program's inputs (the plan's constants), else None
    inputs: tuple | None
    exact: bool  # the program returns the values wanted, in their order: its results are the values


def _weights_dtype(cache: CompileCache) -> torch.dtype | None:
    """The dtype of the model's first weight, as the mixed-precision check found it (None before it looked)."""
    first = cache.first_weight
    return first.dtype if isinstance(first, torch.Tensor) else None


def _param_signature(cache: CompileCache, plan: Plan, graph: Graph, params: tuple) -> tuple:
    """The params' part of the key. Which params only host effects touch is a property of the structure and of
    which params are tensors: found once, not per call (see ``param_signature``)."""
    host_key = (plan.sid, tuple([isinstance(p, torch.Tensor) for p in params]))
    host_only = cache.host_only.get(host_key)
    if host_only is None:
        keyed = graph.replace(nodes=plan.keyed_nodes, params=params)
        host_only = cache.host_only[host_key] = host_only_params(keyed)
        if len(cache.host_only) > 1024:
            del cache.host_only[next(iter(cache.host_only))]
    return param_signature(params, host_only)


@dataclass(frozen=True)
class Plan:
    """What the compiled call derives from a graph's nodes alone, found once per nodes tuple (the pass memo
    hands back the same optimized nodes for a repeated trace): the lowering's nodes and the constant params it
    appends (lifted index ints and float operands, then a family's member index), the bounds to check, the
    structure's id in the cache key, and the ids the call hands back."""

    lowered_nodes: tuple  # lift_values
    lifted: tuple  # the params lift_values appends, on the model's device
    ints: tuple  # (param index, value) of each lifted index (check_bounds)
    keyed_nodes: tuple  # lift_family: a family's member path as ``*``
    member: tuple  # () or the family's member index param
    family: Family | None
    sid: int  # the keyed structure's number in the cache (equal structures, equal numbers)
    wanted: tuple  # saved ids


def _plan_of(cache: CompileCache, graph: Graph, module: torch.nn.Module, device: torch.device) -> Plan:
    extra = (graph.invokes, graph.kind, graph.needs_output, len(graph.params), device)
    return nodes_memo(cache.plans, graph.nodes, extra, _PLANS, lambda: _plan(cache, graph, module, device))


def _plan(cache: CompileCache, graph: Graph, module: torch.nn.Module, device: torch.device) -> Plan:
    ints: list = []
    lowered = lift_values(graph, device, ints)
    keyed, family = lift_family(lowered, module, device)
    n = len(graph.params)
    return Plan(
        lowered.nodes,
        lowered.params[n:],
        tuple(ints),
        keyed.nodes,
        keyed.params[len(lowered.params) :],
        family,
        cache.structures.of(structure_tuple(keyed)),
        saved_ids(graph.nodes),
    )


_PLANS = 1024


def _skip_forward(root: torch.nn.Module, path: str, program: Program) -> tuple[torch.nn.Module, Any]:
    """``(module, forward)``: the forward a compiled call sets on a module the graph skips (``.skip(value)``),
    asking ``Program.skip_value``; Dynamo traces it, so the skipped module is not in the compiled graph at all."""
    module = root.get_submodule(path)
    return module, skip_forward(module, lambda: program.skip_value(path))


def _causes(error: BaseException):
    """``error`` and the exceptions it was raised from or during (Dynamo wraps what a traced program raised)."""
    current: BaseException | None = error
    seen = 0
    while current is not None and seen < 16:
        yield current
        current = current.__cause__ or current.__context__
        seen += 1


def _interrupted(error: BaseException) -> bool:
    observed = getattr(torch._dynamo.exc, "observed_exception_map", {}).get(KeyboardInterrupt)
    return any(
        isinstance(e, KeyboardInterrupt) or (observed is not None and isinstance(e, observed))
        for e in _causes(error)
    )


def _users_error(error: BaseException) -> bool:
    """Did the program Dynamo traced raise for a mistake of the user's (which the eager run reports)?"""
    observed = getattr(torch._dynamo.exc, "observed_exception_map", {}).get(NoGradientThere)
    return any(
        isinstance(e, (InterventionError, NoGradientThere))
        or (observed is not None and isinstance(e, observed))
        for e in _causes(error)
    )


def _mixed_precision_input(
    args: tuple, kwargs: dict, cache: CompileCache, module: torch.nn.Module
) -> str | None:
    """Why a call cannot compile because a floating-point input has another dtype than the model's weights, or
    None. Eager PyTorch raises on such a mix in most layers (``mat1 and mat2 must have the same dtype``), while
    Inductor's kernels promote: the eager run decides, so both modes give the same answer or the same error.
    The model's first parameter is found once (``module.half()`` changes that same tensor's dtype)."""
    weights: torch.dtype | None = None
    for v in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if weights is None:
                first = cache.first_weight
                if first is None:
                    first = cache.first_weight = next(module.parameters(), False)
                if first is False or not first.is_floating_point():
                    return None
                weights = first.dtype
            if v.dtype != weights:
                return f"a {v.dtype} input into a model whose weights are {weights} runs eagerly"
    return None


def _eager(target: Target, graph: Graph, args: tuple, kwargs: dict, entry: Entry) -> RunResult:
    """The eager run of a structure that fell back (``entry.fallback`` says why; explain shows it)."""
    result = run_graph(target, graph, args, kwargs)
    result.explain = entry
    return result


def _run_after_backward(
    split: BackwardSplit, program: Program, env: dict, probes: tuple, params: tuple, held=None
) -> None:
    """Run the backward calls, then the nodes that read gradients, on the compiled forward's results
    (and host effects: logs, appends to outside lists). ``held(node id)``: False for a node a false
    ``tracer.cond`` skips. Gradient edits run during the backward, when it reaches their site (GradEdits)."""

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
        elif node.op is Op.SET_GRAD:  # no backward reached its site: the gradient set is lost, as eager says
            raise no_backward_error(node)
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
    if probe.grad is None:
        raise GradientError(
            "`.grad` was read, but no backward pass reached this value",
            node.loc,
            "call `loss.backward()` in the block with a loss that depends on this value",
        )
    return probe.grad


def _build(
    cuda_graphs: bool,
    target: Target,
    cache: CompileCache,
    graph: Graph,
    key,
    args: tuple,
    kwargs: dict,
    family=None,
) -> Entry:
    entry = Entry(key)
    entry.cuda_graphs = cuda_graphs_state(cache, cuda_graphs, model_device(target.module))
    reason = next((why for n in graph.nodes if (why := UNSUPPORTED.get(n.op)) is not None), None)
    if reason is None and any(n.body for n in graph.nodes):
        reason = "nested graphs are not compiled yet"
    if reason is None and sum(n.op is Op.BACKWARD for n in graph.nodes) > 1:
        reason = "several backward passes in one trace are not compiled (each gradient is one pass's)"
    if reason is not None:
        record_fallback(entry, reason)
        return entry
    split, reason = split_backward(graph)
    if split is None:
        record_fallback(entry, reason or "the backward pass cannot be split off")
        return entry
    try:
        recorder = record_schedule(target, split.forward, args, kwargs)
    except InterventionError:  # the user's mistake: the eager run reports it at their line
        entry.users_error = True
        return entry
    except Exception as e:  # the eager run will raise the user's error, or run what fakes cannot
        reason = f"could not record the schedule on fake tensors ({type(e).__name__}: {e})"
        record_fallback(entry, reason.splitlines()[0])
        return entry
    prewarm_inductor()
    if cache.dispatcher is None:
        cache.dispatcher = Dispatcher(target.module)
    entry.split = split
    entry.probe_specs = tuple(
        (tuple(recorder.env[site].shape), recorder.env[site].dtype, recorder.env[site].device)
        for site in sorted(split.probes, key=split.probes.__getitem__)
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
    if any(isinstance(v, list) for i in caches for v in recorder.env[i].values()):
        record_fallback(entry, "a module `tracer.cache()` holds runs more than once in the forward")
        return entry
    if caches:
        entry.cache_ids = dict(caches)
        for n in graph.nodes:
            if n.op is Op.SAVE and type(n.args[0]) is Ref and n.args[0].id in caches:
                entry.cache_ids[n.id] = caches[n.args[0].id]
    entry.bounds = index_bounds(graph, recorder.env, target)
    entry.program = program = Program(target, split.forward, recorder.order, split, dynamic_conds, caches)
    # not generation steps: there a decode step after an in-place edit of a block's output read wrong values
    calls = [found for path, _ in program.hook_points if (found := owner_and_call(path)) is not None]
    if any(SOURCE in name for _, name in calls):
        record_fallback(
            entry, "a call's own `.source` (a site inside a function the forward calls) runs eagerly"
        )
        return entry
    owners = sorted({owner for owner, _ in calls})
    # a skipped member's forward is the skip's (below), a member with op-level sites its rewritten forward's
    entry.regional = not program.skips and not owners
    entry.skip_forwards = tuple(
        _skip_forward(target.module, path, program) for path in program.skips
    ) + tuple(
        (mod, cache.dispatcher.op_forward(mod, owner))
        for owner in owners
        if owner not in program.skips
        for mod in (target.module.get_submodule(owner),)
    )
    if family is not None:
        program.set_family(family, int(family.member))
    compile_entry(entry)
    return entry
