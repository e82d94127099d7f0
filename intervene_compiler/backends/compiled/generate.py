"""Compiled generation: ``model.generate(..., compile=True)`` runs each step's forward as a compiled program.

``transformers``' ``generate`` keeps driving the loop in Python. The eager runner runs the graph's outer nodes
(``ic.list()``, ``generator.output``, saves, the truncating stop) and the step bookkeeping of ``steps.py``; every
``tracer.all()`` / ``tracer.iter[...]`` body is split in two:

- the *model part* (sites, and everything computed from activations, params and outer tensors) becomes a flat
  per-step graph: step-relative sites become the step forward's absolute sites, outer values become params. For
  each step, the bodies whose selection holds it are concatenated into one step graph, lowered and keyed like a
  trace (:func:`run_compiled`): structure, params' signature, the step's input shapes. The root's ``forward`` is
  swapped, for the run, for a wrapper that runs the step graph's :class:`Program` inside one Dynamo-compiled
  call (model and interventions as one graph). The step index is not part of the key, so every decode step
  reuses one program;
- the *Python part* (``lst.append(v)``, ``.save()``, anything that reads the step index) stays in the body the
  eager runner instantiates per step; it reads the model part's values through fetch nodes, which run at the
  root's output, after the compiled forward.

The KV cache is a ``StaticCache`` (``cache_implementation="static"`` unless the caller chose one): decode steps
then have one shape (one token, a cache of fixed length, a 4-D mask), so a generate block compiles once for the
prefill and once for decode, and a later identical block compiles nothing. Constructs this cannot compile make
the whole block run eagerly, and a step whose program cannot be recorded or captured runs eagerly; both record
their reason in :func:`compile_stats` (never silent).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...ir import Graph, Node, Op, ParamRef, Ref, Site, SiteKind, format_node, map_args, structure_tuple
from ...ir.nodes import is_mutation, walk_nodes
from ...ir.steps import step_matches
from ...runtime import RunResult, Target
from ..eager import Interpreter, run_graph
from .backward import BackwardSplit
from .dispatcher import Dispatcher
from .entry import (
    UNSUPPORTED,
    CompileCache,
    Entry,
    cache_of,
    call,
    compile_entry,
    count_call,
    cuda_graphs_state,
    failure_reason,
    model_device,
    param_signature,
    record_fallback,
    signature,
)
from .lowering import check_bounds, index_bounds, lift_values
from .predication import effective_guards, unpredicated_reason
from .program import Program
from .schedule import dynamic_conds_of, record_schedule

_SITE_OPS = (Op.SITE, Op.SET, Op.UPDATE)
_CONTAINER_MAKERS = (list, dict, set)  # outer values that the Python part mutates (``ic.list()``, ...)


def run_generate_compiled(
    target: Target, graph: Graph, args: tuple, kwargs: dict, cuda_graphs: bool = False
) -> RunResult:
    """Run a generate block's graph with every step's forward compiled (see the module docstring).

    ``target.generating`` holds the block's ``generate()`` arguments; a static KV cache and no transformers
    auto-compile are added to the call unless the user chose otherwise."""
    cache = cache_of(target)
    options = dict(target.generating or {})
    plan, reason = _plan(graph)
    if plan is not None:
        reason = _cache_reason(target.module, options)
    if plan is None or reason is not None:
        return _fall_back(target, graph, args, kwargs, reason or "the block cannot compile")
    extra: dict[str, Any] = {}
    if "cache_implementation" not in options:
        extra["cache_implementation"] = "static"
    if "disable_compile" not in options:
        extra["disable_compile"] = True  # transformers' own auto-compile would wrap ours
    run = Interpreter(target, plan.outer)
    module = target.module
    had_forward = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    original = module.forward
    state = _StepState(target, cache, plan, run, original, cuda_graphs)

    @functools.wraps(original)
    def forward(*a: Any, **kw: Any) -> Any:
        return state.step(a, kw)

    module.forward = forward
    try:
        result = run.execute(args, {**kwargs, **extra})
    finally:
        if had_forward:
            module.__dict__["forward"] = previous
        else:
            del module.forward
    result.explain = cache.last
    return result


# -- planning ----------------------------------------------------------------------------------------------------
@dataclass
class _Body:
    """One ITER node's body, split into the part that runs inside the compiled step and the Python part."""

    node: Node
    compiled: tuple[Node, ...]
    exported: tuple[int, ...]  # compiled node ids the Python part reads (fetched after the step's forward)


@dataclass
class _Plan:
    outer: Graph  # the graph the eager runner runs: ITER bodies hold only fetches and the Python part
    bodies: list[_Body]
    inputs: tuple[int, ...]  # outer node ids the compiled parts read (params of every step graph)
    graph: Graph
    results: dict  # node id -> value, from the current step's compiled part
    step_graphs: dict = field(default_factory=dict)  # active ITER ids -> (step graph, lowered graph)


def _plan(graph: Graph) -> tuple[_Plan | None, str | None]:
    """Split every ITER body; (None, reason) when the block cannot run with compiled steps."""
    nodes = {n.id: n for n in walk_nodes(graph.nodes)}
    outer_ids = {n.id for n in graph.nodes}
    for n in walk_nodes(graph.nodes):
        why = UNSUPPORTED.get(n.op)
        if why is not None:
            return None, why
        if n.op in (Op.GRAD, Op.SET_GRAD, Op.BACKWARD):
            return None, "gradients in a generate block are not compiled"
        if n.op is Op.CACHE:
            return None, "`tracer.cache()` in a generate block is not compiled"
        if n.body and n.op is not Op.ITER:
            return None, "nested graphs other than `tracer.all()`/`tracer.iter[...]` are not compiled"
    for n in walk_nodes(graph.nodes):
        if n.op in _SITE_OPS and n.target.path.startswith("generator.streamer"):
            return None, "`generator.streamer` runs between the steps' forwards, outside the compiled step"
    site_dependent: set[int] = set()  # outer nodes computed from module sites (not ready before the steps)
    for n in graph.nodes:
        if n.op in _SITE_OPS and n.target.path != "generator":
            return None, (
                f"{n.target} is read outside `tracer.all()`/`tracer.iter[...]`: compiled generation runs "
                "module sites only inside iteration blocks (use `tracer.iter[k]` for step k)"
            )
        if n.op is Op.ITER and n.guards:
            return None, "an iteration block inside `tracer.cond` is not compiled"
        if n.op in (Op.ITER, *_SITE_OPS) or any(d in site_dependent for d in n.refs):
            site_dependent.add(n.id)

    next_id = max(nodes) + 1
    results: dict[int, Any] = {}  # filled by each step, read by the fetch nodes
    bodies, outer_nodes, inputs = [], [], []
    for n in graph.nodes:
        if n.op is not Op.ITER:
            outer_nodes.append(n)
            continue
        body = n.body[0].nodes
        inside = {b.id for b in body}
        python: set[int] = set()
        compiled = []
        for b in body:
            if b.body:
                return None, "nested blocks inside an iteration block are not compiled"
            outer_refs = [d for d in b.refs if d not in inside and d != n.id]
            reads_python = n.id in b.refs or any(d in python for d in b.refs)
            if b.op in _SITE_OPS or b.op is Op.MODULE:
                if b.op in _SITE_OPS and b.target.path == "generator":
                    return None, "`generator` runs after the steps, not inside an iteration block"
                if b.op in _SITE_OPS and b.target.call >= 0:
                    return None, f"{b.target} names an absolute call inside an iteration block"
                if reads_python:
                    return None, (
                        f"{_describe(b)} is computed from the step index or a Python object the block "
                        "changes, which the compiled step cannot take as an input"
                    )
            elif is_mutation(b) and _mutates_outer(b, inside) and not _on_container(b, nodes):
                return None, f"{_describe(b)} changes a value from outside the block in place"
            elif reads_python and is_mutation(b) and _mutates(b, inside - python):
                return None, (
                    f"{_describe(b)} changes the model's values with a value computed from the step index (or "
                    "from a Python object the block changes), which the compiled step cannot take as an input"
                )
            elif (
                reads_python
                or b.op is Op.SAVE
                or b.op is Op.LOG  # prints after the step's compiled forward (a graph cannot print)
                or any(_is_container(nodes[d]) for d in outer_refs)
            ):
                python.add(b.id)
                continue
            for d in outer_refs:
                if d in site_dependent:
                    return None, f"{_describe(nodes[d])} is computed from the model outside the block"
                if d not in inputs:
                    inputs.append(d)
            if any(g not in inside or g in python for g, _ in b.guards):
                return None, (
                    f"{_describe(b)} is under a `tracer.cond` whose condition the compiled step cannot compute"
                )
            compiled.append(b)
        compiled_ids = {b.id for b in compiled}  # none reads the Python part: such nodes joined it, or failed
        py_nodes = [b for b in body if b.id in python]
        exported = sorted(
            {d for b in py_nodes for d in (*b.refs, *b.after, *(g for g, _ in b.guards)) if d in compiled_ids}
        )
        # a fetched value is skipped where eager mode skips what it fetches (a false `tracer.cond`)
        guards_of = effective_guards(body)
        new_body: list[Node] = []
        if py_nodes:
            site = Node(next_id, Op.SITE, Site("", SiteKind.OUTPUT, -1, None), invoke=None)
            next_id += 1
            new_body.append(site)
            for c in exported:
                fetch = _Fetch(c, results, as_bool=nodes[c].op is Op.COND)
                guards = guards_of.get(c, ())
                new_body.append(
                    Node(c, Op.CALL, fetch, (Ref(site.id),), guards=guards, invoke=nodes[c].invoke)
                )
            valid = outer_ids | python | set(exported) | {n.id}
            for b in py_nodes:
                after = tuple(a for a in b.after if a in valid)
                if after != b.after:
                    b = Node(b.id, b.op, b.target, b.args, b.kwargs, b.guards, after, b.invoke, b.body, b.loc)
                new_body.append(b)
        bodies.append(_Body(n, tuple(compiled), tuple(exported)))
        new_iter = Node(
            n.id,
            n.op,
            n.target,
            n.args,
            n.kwargs,
            n.guards,
            n.after,
            n.invoke,
            (n.body[0].replace(nodes=tuple(new_body)),),
            n.loc,
        )
        outer_nodes.append(new_iter)
    if not bodies:
        return None, "the generate block has no `tracer.all()`/`tracer.iter[...]` block to compile"
    outer = graph.replace(nodes=tuple(outer_nodes))
    return _Plan(outer, bodies, tuple(inputs), graph, results), None


def _is_container(node: Node) -> bool:
    return node.op is Op.CALL and node.target in _CONTAINER_MAKERS


def _on_container(node: Node, nodes: dict) -> bool:
    first = node.args[0] if node.args else None
    return type(first) is Ref and first.id in nodes and _is_container(nodes[first.id])


def _mutates(node: Node, ids: set[int]) -> bool:
    first = node.args[0] if node.args else None
    return type(first) is Ref and first.id in ids


def _mutates_outer(node: Node, inside: set[int]) -> bool:
    first = node.args[0] if node.args else None
    return type(first) is ParamRef or type(first) is Ref and first.id not in inside


def _describe(node: Node) -> str:
    return format_node(node).split("  #")[0]


def _cache_reason(module: torch.nn.Module, options: dict) -> str | None:
    """Why this generate call cannot have one decode shape (a static KV cache), or None."""
    if options.get("use_cache") is False:
        return "compiled generation needs the KV cache (`use_cache=False` changes every step's shape)"
    chosen = options.get("cache_implementation")
    if chosen is None and "past_key_values" not in options:
        if not getattr(module, "_can_compile_fullgraph", False):
            return f"{type(module).__name__} does not support a static KV cache (`_can_compile_fullgraph`)"
    elif chosen == "dynamic":
        return (
            "compiled generation needs a static KV cache; `cache_implementation='dynamic'` grows every step"
        )
    given = options.get("past_key_values")
    if given is not None and not getattr(given, "is_compileable", False):
        return f"the `past_key_values` given ({type(given).__name__}) grow every step; pass a StaticCache"
    return None


def _fall_back(target: Target, graph: Graph, args, kwargs, reason: str) -> RunResult:
    record_fallback(None, reason, "generate: ")
    result = run_graph(target, graph, args, kwargs)
    result.explain = Entry(("generate", None), fallback=reason)
    return result


# -- the steps ---------------------------------------------------------------------------------------------------
class _Fetch:
    """The target of a fetch node: the value the current step's compiled part computed for node ``nid``."""

    def __init__(self, nid: int, results: dict, as_bool: bool = False):
        self.nid = nid
        self.results = results
        self.as_bool = as_bool  # a condition: its flag as a Python bool, as the eager COND node gives it
        self.__name__ = f"fetch_{nid}"  # printed by format_node

    def __call__(self, _root_output: Any) -> Any:
        value = self.results[self.nid]
        return bool(value) if self.as_bool else value


class _StepState:
    """A compiled generate block's steps: ``step`` runs in place of the root's forward at every step."""

    def __init__(
        self,
        target: Target,
        cache: CompileCache,
        plan: _Plan,
        run: Interpreter,
        forward: Callable[..., Any],
        cuda_graphs: bool = False,
    ):
        self.cuda_graphs = cuda_graphs  # compile="reduce-overhead": steps replayed as CUDA graphs on a GPU
        self.target = target
        self.cache = cache
        self.plan = plan
        self.k = -1
        self.run = run  # the eager run of the outer graph (the Python parts of the bodies)
        self.forward = forward  # the root's own forward

    def step(self, args: tuple, kwargs: dict) -> Any:
        self.k += 1
        active = tuple(b for b in self.plan.bodies if b.compiled and step_matches(b.node.target, self.k))
        if not active:
            return self.forward(*args, **kwargs)
        graph, lowered, n_inputs, structure, ints = self._step_graph(active)
        env = self.run.env
        first = len(self.plan.graph.params)
        values = tuple(env[i] for i in self.plan.inputs)
        params = lowered.params[:first] + values + lowered.params[first + n_inputs :]
        shim = self.target.with_forward(self.forward)  # a step's program calls the root's own forward
        exported = tuple(c for b in active for c in b.exported)
        cache = self.cache
        key = (
            "generate-step",
            structure,
            param_signature(params),
            signature(args),
            signature(kwargs),  # a KV cache by its layout (see entry.signature)
            torch.is_grad_enabled(),
            self.cuda_graphs,
        )
        entry = cache.lookup(
            key,
            lambda: _build_step(
                shim, cache, lowered.replace(params=params), key, args, kwargs, exported, self.cuda_graphs
            ),
        )
        if entry.fallback is None:
            if ints and entry.bounds:
                check_bounds(graph, ints, entry.bounds)
            compiled_before = len(entry.graphs)
            try:
                saved, output = call(cache, entry, params, args, kwargs)
            except Exception as e:
                # a step Dynamo cannot capture as one graph: this key runs eagerly from now on
                record_fallback(entry, failure_reason(e), "generate step: ")
            else:
                entry.calls += 1
                count_call(entry, compiled_before)
                program = entry.program
                assert program is not None, "a compiled entry has its program"
                got = dict(zip(program.saved_ids + program.needed, saved))
                self._publish({c: got.get(c) for c in exported})
                return output
        eager = Interpreter(shim, graph.replace(params=graph.params[:first] + values))
        result = eager.execute(args, kwargs)
        self._publish({c: eager.env.get(c) for c in exported})
        return result.output

    def _publish(self, values: dict) -> None:
        self.plan.results.clear()
        self.plan.results.update(values)

    def _step_graph(self, active: tuple[_Body, ...]) -> tuple[Graph, Graph, int, tuple, list]:
        """The flat graph of the active bodies' compiled parts (absolute sites, outer values as params)."""
        key = tuple(b.node.id for b in active)
        got = self.plan.step_graphs.get(key)
        if got is not None:
            return got
        plan = self.plan
        first = len(plan.graph.params)
        slot = {oid: ParamRef(first + j) for j, oid in enumerate(plan.inputs)}

        def remap(leaf):
            return slot.get(leaf.id, leaf) if type(leaf) is Ref else leaf

        nodes = sorted((n for b in active for n in b.compiled), key=lambda n: n.id)
        ids = {n.id for n in nodes}
        flat = []
        for n in nodes:
            target = n.target
            if n.op in _SITE_OPS:
                target = Site(target.path, target.kind, -1 - target.call, target.invoke)
            flat.append(
                Node(
                    n.id,
                    n.op,
                    target,
                    map_args(n.args, remap),
                    tuple((k, map_args(v, remap)) for k, v in n.kwargs),
                    n.guards,  # conditions of the same body: compiled nodes of this step graph too
                    tuple(a for a in n.after if a in ids),
                    n.invoke,
                    (),
                    n.loc,
                )
            )
        placeholders = tuple(torch.empty(0) for _ in plan.inputs)  # replaced by the outer values at each step
        graph = plan.graph.replace(
            nodes=tuple(flat), params=plan.graph.params + placeholders, kind="trace", needs_output=True
        )
        ints: list = []
        lowered = lift_values(graph, model_device(self.target.module), ints)
        got = (graph, lowered, len(plan.inputs), structure_tuple(lowered), ints)
        plan.step_graphs[key] = got
        return got


def _build_step(
    shim: Target,
    cache: CompileCache,
    graph: Graph,
    key,
    args: tuple,
    kwargs: dict,
    exported: tuple,
    cuda_graphs: bool = False,
) -> Entry:
    entry = Entry(key)
    entry.cuda_graphs = cuda_graphs_state(cache, cuda_graphs, model_device(shim.module))
    try:
        recorder = record_schedule(shim, graph, args, kwargs)
    except Exception as e:
        reason = f"could not record the step on fake tensors ({type(e).__name__}: {e})".splitlines()[0]
        record_fallback(entry, reason, "generate step: ")
        return entry
    if cache.dispatcher is None:
        cache.dispatcher = Dispatcher(shim.module)
    split = BackwardSplit(graph, needed=exported)  # the values the Python part of the block reads
    entry.split = split
    dynamic_conds = dynamic_conds_of(graph.nodes, recorder)
    why = unpredicated_reason(graph.nodes, effective_guards(graph.nodes), dynamic_conds)
    if why is not None:
        record_fallback(entry, why, "generate step: ")
        return entry
    entry.bounds = index_bounds(graph, recorder.env, shim)
    entry.program = Program(shim, graph, recorder.order, split, dynamic_conds)
    compile_entry(entry)
    return entry


__all__ = ["run_generate_compiled"]
