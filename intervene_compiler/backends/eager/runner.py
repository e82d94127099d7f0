"""The eager backend: runs an intervention graph alongside the model's forward pass through hooks.

Scheduling is by data dependency, in program order. Before the forward, and each time a hooked module reaches a
site (its input before it runs, its output after), the runner makes one pass over the pending nodes in creation
order and runs every node whose dependencies are done; SITE/SET/UPDATE nodes run only while their site is active,
GRAD/SET_GRAD only inside the tensor hook of their value during backward. Because nodes only depend on earlier
nodes, one pass per event suffices. Hooks live only for the run and are removed afterwards, also on errors.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from sys import _getframe
from types import FunctionType, MappingProxyType, MethodType
from typing import Any

import torch
import torch.nn.modules.module as _torch_module
from torch.utils.hooks import RemovableHandle

from ...errors import (
    GradientError,
    InterventionError,
    SourceLoc,
    check_set_shape,
    execution_error,
    missed_site_error,
)
from ...ir import Graph, Node, Op, Ref, Site, SiteKind, format_node, format_site, saved_ids
from ...ir.nodes import walk_nodes
from ...runtime import VALUE_OPS, CacheEntry, RunResult, Target, narrow, repeat_rows, replace, resolve
from . import packing
from . import reuse as _reuse

_DONE, _SKIPPED, _ARMED, _RUNNING = 1, 2, 3, 4
_LIVE = 5  # an ITER node while an instance of its body runs (body nodes read it as the step index)
# hot paths compare ops with these module constants: ``Op.SITE`` is a (slow) enum class attribute lookup
_SITE, _SET, _UPDATE, _GRAD, _SET_GRAD = Op.SITE, Op.SET, Op.UPDATE, Op.GRAD, Op.SET_GRAD
_SETATTR, _STOP, _MODULE, _CACHE, _ITER = Op.SETATTR, Op.STOP, Op.MODULE, Op.CACHE, Op.ITER
_SAVE = Op.SAVE
_INPUT, _INPUTS, _OUTPUT = SiteKind.INPUT, SiteKind.INPUTS, SiteKind.OUTPUT
_SITE_OPS = frozenset({_SITE, _SET, _UPDATE})
_GRAD_OPS = frozenset({_GRAD, _SET_GRAD})
_WAITING_OPS = _SITE_OPS | _GRAD_OPS | {_ITER}  # ops that run only at their event (or are armed)
# ops _exec handles itself (the rest are plain value ops of the interpreter)
_RUNNER_OPS = frozenset({_SET, _GRAD, _SET_GRAD, _SETATTR, _STOP, _MODULE, _CACHE})
_FINISHED = (_DONE, _SKIPPED)


class _EarlyStop(Exception):
    """A STOP node's early exit from the forward. ``owner`` is the run that raised it: a trace nested in a
    forward (or run by a hook) must let an outer run's stop through, not take it for its own."""

    def __init__(self, node: Node, owner: object):
        self.node = node
        self.owner = owner


def run_graph(
    target: Target,
    graph: Graph,
    args: tuple,
    kwargs: dict,
    repeat: int = 0,
    reuse: bool = False,
    layer_forward=None,
) -> RunResult:
    """Run ``target``'s model on ``args``/``kwargs`` with ``graph``'s interventions.

    ``repeat`` > 1: the invokes all have this same one-row input, given once; the forward runs on one row up to
    the first event any node touches, where the value is repeated to one row per invoke (the shared prefix of
    identical invokes is computed once; see ``execute._batch``). ``repeat`` = 1: one invoke whose prefix
    could be shared. ``reuse`` (with ``repeat``): replay the unedited decoder layers an earlier run on an equal
    input memoized, and memoize the ones this run computes (reuse.py). ``layer_forward(layer, *args, **kwargs)``
    (with ``repeat``): what the decoder layers that are not replayed run instead of their ``forward`` (the
    compiled backend's layered runs, ``backends/compiled/layered.py``).
    """
    if not repeat:
        plan = _plan_for(graph.nodes, target.caches.plans)
        if plan.reads is not None:
            return _run_reads(target, graph, plan.reads, args, kwargs)
    run = _Run(target, graph)
    if repeat > 1:
        run.repeat = repeat
        run.pack_plan = packing.pack_layers(target, [key[0] for key in run.site_nodes])
    note = None
    if repeat and reuse:
        found = _reuse.plan(target, run, args, kwargs, compiled=layer_forward is not None)
        if isinstance(found, str):
            note = found
        else:
            run.reuse = found
    if repeat and layer_forward is not None:
        run.layer_forward = layer_forward
    result = run.execute(args, kwargs)
    if run.reuse is not None:
        note = run.reuse.describe()
    if note:
        result.reuse = note
    return result


class _Plan:
    """What a run derives from a graph's nodes alone, built once per nodes tuple and shared by its runs.

    The pass pipeline memoizes by structure and hands every repeated trace the same optimized nodes tuple, so a
    loop tracing the same code skips this setup. Shared parts are read-only; a graph with ITER nodes gets
    private copies of ``nodes``/``site_nodes`` per run (steps.py registers and unregisters body nodes in them).
    """

    __slots__ = (
        "nodes",
        "site_nodes",
        "site_keys",
        "hooks",
        "has_grads",
        "has_cache",
        "has_iter",
        "saved",
        "idle_before_forward",
        "events",
        "reads",
    )

    def __init__(self, graph_nodes: tuple[Node, ...]):
        self.nodes = {n.id: n for n in graph_nodes}
        self.has_grads = any(
            n.op in _GRAD_OPS or n.op is Op.SETATTR and n.target == "requires_grad" for n in graph_nodes
        )
        self.has_cache = any(n.op is Op.CACHE for n in graph_nodes)
        self.has_iter = any(n.op is Op.ITER for n in graph_nodes)
        self.site_nodes: dict[tuple, list[int]] = {}
        for n in graph_nodes:
            if n.op in _SITE_OPS:
                self.site_nodes.setdefault(n.target.key, []).append(n.id)
        # node id -> the event key a SITE/SET/UPDATE waits for, or the ("grad", id) key of a GRAD/SET_GRAD;
        # ITER bodies included (their nodes join the run while a step is live)
        self.site_keys: dict[int, tuple] = {}
        for n in walk_nodes(graph_nodes):
            if n.op in _SITE_OPS:
                self.site_keys[n.id] = n.target.key
            elif n.op in _GRAD_OPS:
                self.site_keys[n.id] = ("grad", n.args[0].id)
        # (path, hook its inputs, hook its outputs) per module the graph touches, in path order
        self.hooks = _hook_paths(self.site_nodes)
        self.saved = tuple(sorted(set(saved_ids(graph_nodes))))
        # Does the drain before the forward have nothing to do? True when nothing is guarded (so nothing can be
        # skipped early) and every node is a site access or waits (by data or order) for one: no site is active
        # before the forward, so each such node stays pending.
        waits: set[int] = set()
        for n in graph_nodes:
            if n.guards:
                break
            if n.op in _SITE_OPS or any(d in waits for d in n.refs) or any(d in waits for d in n.after):
                waits.add(n.id)
        self.idle_before_forward = not self.has_iter and len(waits) == len(graph_nodes)
        self.events = (
            None if self.has_iter or self.has_cache or self.has_grads else _event_schedule(graph_nodes)
        )
        self.reads = _Reads.of(graph_nodes, self.saved) if self.events is not None else None


class _Reads:
    """The schedule of a graph that only reads sites and saves them, with at most a stop after the last read (the
    common ``model.layer.output.save()`` trace, truncated by ``passes/early_stop.py``): ``_run_reads`` runs it
    with no scheduler at all. At each hooked event it fills its site reads and their saves; the stop ends the
    forward once every event was seen, which is when the general scheduler runs it (it waits for every read).
    """

    __slots__ = ("events", "hooks", "stop", "saved", "nodes")

    def __init__(self, events: dict, hooks: tuple, stop: Node | None, saved: tuple, nodes: tuple) -> None:
        self.events = events  # event key -> ((site node, its saves' ids), ...) in program order
        self.hooks = hooks  # as _Plan.hooks
        self.stop = stop
        self.saved = saved
        self.nodes = nodes  # program order, for the error of a read that never happened

    @classmethod
    def of(cls, graph_nodes: tuple[Node, ...], saved: tuple) -> _Reads | None:
        events: dict[tuple, list] = {}
        reads: dict[int, tuple[Node, list]] = {}
        stop = None
        for n in graph_nodes:
            if n.guards or n.body or stop is not None:
                return None
            op = n.op
            if op is _SITE:
                entry = (n, [])
                reads[n.id] = entry
                events.setdefault(n.target.key, []).append(entry)
            elif (
                op is _SAVE
                and len(n.args) == 1
                and type(n.args[0]) is Ref
                and n.args[0].id in reads
                and not n.kwargs
                and all(d in reads for d in n.after)
            ):
                reads[n.args[0].id][1].append(n.id)
            elif op is _STOP and n.deps and not n.args:
                stop = n
            else:
                return None
        if not reads:
            return None  # nothing makes the forward run (the general runner decides whether it runs)
        if stop is not None:
            # the stop must wait for every read (transitively, through the saves it names): then it runs at the
            # last event, as in the general scheduler
            waits: set[tuple] = set()
            by_save = {sid: rid for rid, (_, saves) in reads.items() for sid in saves}
            for d in stop.deps:
                rid = d if d in reads else by_save.get(d)
                if rid is None:
                    return None
                waits.add(reads[rid][0].target.key)
            if len(waits) != len(events):
                return None
        frozen = {k: tuple((node, tuple(saves)) for node, saves in v) for k, v in events.items()}
        hooks = _hook_paths({k: () for k in frozen})
        return cls(frozen, hooks, stop, saved, tuple(graph_nodes))


def _run_reads(target: Target, graph: Graph, reads: _Reads, args: tuple, kwargs: dict) -> RunResult:
    """Run a graph of site reads and saves (``_Reads``): hooks that store each read and its saves, the forward,
    and the stop. Same values, errors and hooks left behind (none) as the general ``_Run``."""
    env: dict[int, Any] = {}
    calls_in: dict[str, int] = {}
    calls_out: dict[str, int] = {}
    events = reads.events
    invokes = graph.invokes
    batch = invokes[-1].stop if invokes else 0
    stop = reads.stop
    left = [len(events)]  # events not yet seen

    def visit(key: tuple, value: Any) -> None:
        entries = events.get(key)
        if entries is None:
            return
        for node, saves in entries:
            try:
                read = _site_read(node.target, value, invokes, batch)
            except Exception as e:
                raise execution_error(e, node.loc, format_node(node)) from e
            env[node.id] = read
            for sid in saves:
                env[sid] = read
        left[0] -= 1
        if stop is not None and not left[0] and not _is_compiling():  # see _Run._exec's STOP
            raise _EarlyStop(stop, env)

    def pre_hook(path: str):
        def hook(mod, args, kwargs):
            call = calls_in.get(path, 0)
            calls_in[path] = call + 1
            visit((path, _INPUTS, call), (args, kwargs))

        return hook

    def post_hook(path: str):
        def hook(mod, args, kwargs, output):
            call = calls_out.get(path, 0)
            calls_out[path] = call + 1
            visit((path, _OUTPUT, call), output)

        return hook

    handles: list = []
    output = None
    stopped = None
    try:
        _hook_modules(target.module, reads.hooks, pre_hook, post_hook, handles, wrap=True)
        try:
            output = target.forward(*args, **kwargs)
        except _EarlyStop as e:
            if e.owner is not env:
                raise
            stopped = e.node
    finally:
        for h in handles:
            h.remove()
    if stopped is None and left[0]:
        for node in reads.nodes:
            if node.id not in env:
                calls = calls_out if node.target.kind is _OUTPUT else calls_in
                raise _missed(node, calls.get(node.target.path, 0))
    values = {nid: env[nid] for nid in reads.saved}
    stop_loc = stopped.loc if stopped is not None and stopped.target == "user" else None
    return RunResult(values, output, stop_loc)


def _site_read(site: Site, value: Any, invokes: tuple, batch: int) -> Any:
    """What a site read gives from its event's value: the first input of ``(args, kwargs)`` for ``.input``,
    narrowed to the site's invoke rows (the fast paths' ``_Run._read_site``, which also notes row views)."""
    if site.kind is _INPUT:
        args, kwargs = value
        value = args[0] if args else next(iter(kwargs.values()), None)
    if site.invoke is not None:
        rows = invokes[site.invoke]
        value = narrow(value, rows.start, rows.stop, batch)
    return value


def _missed(node: Node, ran: int):
    """The error of a site read whose event never came (the module ran ``ran`` times)."""
    detail = f"the module ran {ran} time(s) in this forward pass" if ran else "the module never ran"
    return missed_site_error(format_site(node), node.loc, detail)


def _event_schedule(graph_nodes: tuple[Node, ...]) -> dict[tuple, tuple] | None:
    """For a graph without guards, steps, caches or gradients: event key -> ``(node, others)`` for every node
    that (transitively) waits for that event, in program order; ``others`` are the other events it waits for
    (None when none). None for any other graph.

    Without guards nothing is skipped, so once the drain before the forward is over, a node is ready exactly when
    every event it waits for has been visited (a site access: while its own event is active). At a visit of
    ``key`` during the forward that is not nested in another event (nor in a node that runs the model), the
    runner runs the candidates whose ``others`` were all visited before (``_Run._visit_fast``) instead of trying
    every pending node: what the general scheduler (``_drain``) would run at that event, in the same order.
    """
    waits: dict[int, frozenset] = {}
    events: dict[tuple, list] = {}
    empty = frozenset()
    for n in graph_nodes:
        if n.guards or n.body:
            return None
        w = empty
        for d in n.deps:
            wd = waits.get(d)
            if wd is None:  # a dependency the graph does not define: leave it to the general scheduler
                return None
            if wd:
                w = w | wd
        own = n.target.key if n.op in _SITE_OPS else None
        if own is not None:
            w = w | {own}
        waits[n.id] = w
        for k in w:
            # a site access runs only at its own event (its own key is never among the visited `others` while it
            # waits: a visit of it that did not run it raised)
            others = (w - {k}) or None if own is None or own == k else _NEVER
            events.setdefault(k, []).append((n, others))
    return {k: tuple(v) for k, v in events.items()}


_NEVER = frozenset({object()})  # `others` of a node that cannot run at that event


def _hook_paths(site_nodes: dict) -> tuple[tuple[str, bool, bool], ...]:
    paths_in = {key[0] for key in site_nodes if key[1] is SiteKind.INPUTS}
    paths_out = {key[0] for key in site_nodes if key[1] is SiteKind.OUTPUT}
    return tuple((path, path in paths_in, path in paths_out) for path in sorted(paths_in | paths_out))


_PLANS_SIZE = 256


def _plan_for(graph_nodes: tuple[Node, ...], plans: dict) -> _Plan:
    """The plan of ``graph_nodes``, from ``plans`` (the model's ``ModelCaches.plans``) when made before.

    Keyed by the tuple's id, and each entry holds the tuple itself (checked by identity): its id cannot be reused
    while the entry exists, so an entry is never found for another tuple.
    """
    hit = plans.get(id(graph_nodes))
    if hit is not None and hit[0] is graph_nodes:
        return hit[1]
    plan = _Plan(graph_nodes)
    if type(graph_nodes) is tuple:  # immutable: safe to reuse for the same object
        if len(plans) >= _PLANS_SIZE:
            del plans[next(iter(plans))]
        plans[id(graph_nodes)] = (graph_nodes, plan)
    return plan


class _Hook:
    """A forward (pre-)hook with kwargs, put into the module's hook dicts exactly as
    ``register_forward_hook(hook, with_kwargs=True)`` does, without the RemovableHandle (its weak references cost
    more than the rest of installing and removing a hook). The run removes it in its ``finally``."""

    __slots__ = ("hooks", "flags", "id")

    def __init__(self, hooks: dict, flags: dict, fn) -> None:
        hid = RemovableHandle.next_id  # torch's id counter, shared with handles registered the usual way
        RemovableHandle.next_id = hid + 1
        hooks[hid] = fn
        flags[hid] = True
        self.hooks = hooks
        self.flags = flags
        self.id = hid

    def remove(self) -> None:
        self.hooks.pop(self.id, None)
        self.flags.pop(self.id, None)


class _Wrap:
    """The runner's pre- and post-hook of one module run by a ``forward`` set on the instance for the run, around
    the class's own: what torch's hook dispatch (``Module._call_impl``'s slow path) would do with them, for about
    2 us less per hooked call. Only for a module nothing else runs around (``_wrappable``), so everything that
    sees the module's inputs and output sees them in the order hooks would. ``remove`` deletes the attribute.

    The wrap runs the hooks when torch's call machinery calls it: ``_call_impl`` (no other hooks), its nested
    ``inner`` (hooks registered during the run: a model's lazy capture hooks, a profiler's global ones, a nested
    trace's) or ``_slow_forward`` (``torch.jit.trace``), and always while Dynamo traces it (a compiled parent:
    Dynamo inlines ``_call_impl``; ``sys._getframe`` cannot be traced). A parent calling ``child.forward(x)``
    directly runs no hooks, and so no wrap's. A forward pre-hook registered during the run runs before the wrap's
    instead of after; post-hooks keep their order."""

    __slots__ = ("module", "forward", "pre", "post")

    def __init__(self, module: torch.nn.Module, pre, post) -> None:
        self.module = module
        self.pre = pre
        self.post = post
        own = type(module).forward  # a plain function (``_wrappable``)

        # Bound to the module, so a copy made during the run (copy.deepcopy binds it to the copy) computes with
        # its own weights and runs no hooks of this run (``_unwrap_copy``).
        def forward(self, *args, **kwargs):
            if self is not module:
                return _unwrap_copy(self, forward, own, args, kwargs)
            if not _is_compiling():
                caller = _getframe(1).f_code
                # `module.forward(x)` called directly (not by `module(x)`): hooks would not run
                if caller is not _CALL_IMPL and caller is not _INNER and caller is not _SLOW_FORWARD:
                    return own(self, *args, **kwargs)
            if pre is not None:
                new = pre(module, args, kwargs)
                if new is not None:
                    args, kwargs = new
            output = own(self, *args, **kwargs)
            if post is not None:
                new = post(module, args, kwargs, output)
                if new is not None:
                    return new
            return output

        # inspect.signature(module.forward), which transformers reads, sees the class forward's signature (less
        # `self`, as for any bound method)
        forward.__wrapped__ = own
        self.forward = bound = MethodType(forward, module)
        module.__dict__["forward"] = bound

    def remove(self) -> None:
        d = self.module.__dict__
        if d.get("forward") is self.forward:
            del d["forward"]


def _unwrap_copy(copy: torch.nn.Module, forward, own, args: tuple, kwargs: dict) -> Any:
    """A copy of a wrapped module made during the run got the wrap bound to itself: it drops it (a plain module
    from its first call) and runs the class forward."""
    bound = copy.__dict__.get("forward")
    if getattr(bound, "__func__", None) is forward:
        del copy.__dict__["forward"]
    return own(copy, *args, **kwargs)


# the code of the frames that call a module's forward on `module(...)`: only those calls run hooks (and a wrap's)
_CALL_IMPL = torch.nn.Module._call_impl.__code__
# `_call_impl`'s nested function that runs hooks and the forward when any hook is registered
_INNER = next((c for c in _CALL_IMPL.co_consts if getattr(c, "co_name", None) == "inner"), None)
_SLOW_FORWARD = torch.nn.Module._slow_forward.__code__
_call_impl = torch.nn.Module._call_impl
_is_compiling = torch.compiler.is_compiling


def _wrappable(mod: torch.nn.Module) -> bool:
    """May ``_Wrap`` stand in for hooks on ``mod``? Not when anything else runs around its forward: its own or
    global forward hooks (ours would run before them, not after), its own or global backward hooks (torch wraps
    the inputs between the pre-hooks and the forward), a forward already set on the instance (accelerate's, a
    reuse swap), a module compiled in place (``module.compile()``), or a class that is not plain (``_plain_class``)."""
    return _may_wrap() and _wrappable_here(mod)


def _may_wrap() -> bool:
    """No global hooks (checked once per install), and a torch whose ``_call_impl`` has an ``inner`` (``_Wrap``)."""
    return not (
        _INNER is None
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def _wrappable_here(mod: torch.nn.Module) -> bool:
    """``_wrappable`` less the global checks (``_may_wrap``)."""
    d = mod.__dict__
    plain = _plain.get(type(mod))
    if plain is None:
        plain = _plain_class(type(mod))
    return plain and not (
        d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
        or "forward" in d
        or d.get("_compiled_call_impl") is not None  # module.compile(): Dynamo runs its calls
    )


_plain: dict[type, bool] = {}


def _plain_class(cls: type) -> bool:
    """A class torch's ``_call_impl`` calls and whose ``forward`` is a plain function: not scripted, no
    ``_call_impl`` of its own, no static or other descriptor for ``forward``. Memoized per class."""
    forward = next((k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__), None)
    plain = (
        not issubclass(cls, torch.jit.ScriptModule)
        and cls._call_impl is _call_impl
        and type(forward) is FunctionType
    )
    _plain[cls] = plain
    return plain


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """``module.get_submodule(path)``, walking the registered children directly when they are there."""
    mod = module
    if path:
        try:
            for name in path.split("."):
                mod = mod._modules[name]
        except (KeyError, AttributeError, TypeError):
            return module.get_submodule(path)  # raises its own error for a path that names no module
        if not isinstance(mod, torch.nn.Module):
            return module.get_submodule(path)
    return mod


def _add_hook(mod: torch.nn.Module, fn, pre: bool):
    try:
        if pre:
            return _Hook(mod._forward_pre_hooks, mod._forward_pre_hooks_with_kwargs, fn)
        return _Hook(mod._forward_hooks, mod._forward_hooks_with_kwargs, fn)
    except AttributeError:  # a torch without these dicts: the public API
        if pre:
            return mod.register_forward_pre_hook(fn, with_kwargs=True)
        return mod.register_forward_hook(fn, with_kwargs=True)


def _hook_modules(
    module: torch.nn.Module, hooks: tuple, pre_hook, post_hook, handles: list, wrap: bool
) -> None:
    """Hook the modules of ``hooks`` (``_Plan.hooks``) with ``pre_hook(path)``/``post_hook(path)``, adding their
    handles to ``handles``; with ``wrap``, by a ``_Wrap`` where nothing else runs around the module
    (``_wrappable``). A module registered under two names has an envoy at each, and is hooked at each: it is
    hooked, never wrapped, so its hooks run in the order they were added."""
    wraps = {} if wrap and _may_wrap() else None  # id(module) -> its _Wrap
    for path, hook_in, hook_out in hooks:
        mod = _submodule(module, path)
        if wraps is not None:
            key = id(mod)
            if key in wraps:  # a second name of a wrapped module: hook it at both, in order
                w = wraps.pop(key)
                w.remove()
                if w.pre is not None:
                    handles.append(_add_hook(mod, w.pre, pre=True))
                if w.post is not None:
                    handles.append(_add_hook(mod, w.post, pre=False))
            elif _wrappable_here(mod):
                w = _Wrap(mod, pre_hook(path) if hook_in else None, post_hook(path) if hook_out else None)
                wraps[key] = w
                handles.append(w)
                continue
        if hook_in:
            handles.append(_add_hook(mod, pre_hook(path), pre=True))
        if hook_out:
            handles.append(_add_hook(mod, post_hook(path), pre=False))


class _Run:
    # Per-run state with class-level defaults (a run sets its own when they change): one run per trace.
    repeat = 0  # see run_graph
    stop_in_dynamo = False  # a STOP raises while Dynamo traces (see _exec): a compiled Program's does
    pack_plan = None  # (decoder layers' path, the layers) when a shared-prefix run may pack (packing.py)
    pack: packing.Pack | None = None  # the packed layout while later layers run on it
    pack_handles: list | tuple = ()
    reuse: _reuse.Plan | None = None  # layers replayed from and recorded into the model's memo (reuse.py)
    layer_forward = None  # see run_graph
    adhoc = 0  # > 0 while a MODULE node calls a module ad hoc (its hooks do nothing)
    stopped: Node | None = None
    in_forward = False
    steps = None  # per-step bodies (tracer.all(), tracer.iter[...]): see steps.py
    # gradient bookkeeping, a run's own (empty) dicts only when its graph reads or sets gradients
    grad_hooks: Mapping[int, Any] = MappingProxyType({})
    # id(an invoke's rows of a site tensor) -> (those rows, the batch tensor, start, stop): a gradient of the
    # rows is hooked on the batch tensor, the one the model's backward actually reaches
    row_views: Mapping[int, tuple] = MappingProxyType({})

    def __init__(self, target: Target, graph: Graph):
        self.target = target
        self.module: torch.nn.Module = target.module
        self.graph = graph
        self.params = graph.params
        invokes = graph.invokes
        self.batch = invokes[-1].stop if invokes else 0
        plan = self._plan = _plan_for(graph.nodes, target.caches.plans)
        if plan.has_iter:
            self.nodes = dict(plan.nodes)
            self.site_nodes = {k: list(v) for k, v in plan.site_nodes.items()}
        else:
            self.nodes = plan.nodes  # shared, read-only
            self.site_nodes = plan.site_nodes
        self.pending: list[int] = list(plan.nodes)
        self.state: dict[int, int] = {}
        self.env: dict[int, Any] = {}
        self.active: dict = {}  # active event keys, innermost last (a grad hook runs inside a site event)
        self.current: dict = {}
        self.calls_in: dict[str, int] = {}
        self.calls_out: dict[str, int] = {}
        self.has_grads = plan.has_grads
        if plan.has_grads or plan.has_iter:  # (has_grads looks at the top-level nodes only)
            self.grad_hooks = {}
            self.row_views = {}
        # the plan's per-event candidates when it has them (see _event_schedule); subclasses that change how nodes
        # run keep the general scheduler
        self._events = plan.events if type(self) is _Run else None
        self.seen: set = set()  # event keys whose visit has finished
        if plan.has_iter:
            from .steps import Steps

            self.steps = Steps.create(self)

    # -- the run -------------------------------------------------------------------------------------------------
    def execute(self, args: tuple, kwargs: dict) -> RunResult:
        handles = []
        output = None
        plan = self._plan
        try:
            if self.reuse is not None:  # before the runner's hooks: records see the layers' own outputs
                self.reuse.install(handles, _add_hook)
            if self.layer_forward is not None:
                self._swap_layers(handles)
            self._install_hooks(handles)
            if self.steps is not None:
                self.steps.install(handles)
            if plan.idle_before_forward:  # every node is still pending
                resolved = not self.pending
            else:
                self._drain()
                resolved = self._all_resolved()
            # CACHE nodes are filled by the forward's hooks
            if self.graph.needs_output or plan.has_cache or not resolved:
                self.in_forward = True
                try:
                    output = self.target.forward(*args, **kwargs)
                except _EarlyStop as stop:
                    if stop.owner is not self:
                        raise
                    self.stopped = stop.node
                finally:
                    self.in_forward = False
                if self.stopped is None:
                    if self.steps is not None:
                        self.steps.finish()
                    self._drain()
            self._check_finished()
        finally:
            for h in handles:
                h.remove()
            for h in self.pack_handles:
                h.remove()
            if self.grad_hooks:
                for h in self.grad_hooks.values():
                    h.remove()
        state = self.state
        env = self.env
        saved = plan.saved if self.steps is None else set(saved_ids(self.nodes.values()))
        values = {}
        for nid in saved:
            if state.get(nid) == _DONE:
                values[nid] = env[nid]
        stopped = self.stopped
        stop_loc = stopped.loc if stopped is not None and stopped.target == "user" else None
        skipped = (
            {nid: self._false_cond_loc(nid) for nid in saved if state.get(nid) == _SKIPPED}
            if len(values) < len(saved)
            else {}
        )
        return RunResult(values, output, stop_loc, skipped)

    def _swap_layers(self, handles: list) -> None:
        _, layers = self.target.decoder_layers()
        fn = self.layer_forward
        start = 0 if self.reuse is None else self.reuse.skip + 1
        for layer in layers[start:]:
            handles.append(_reuse.Swap(layer, functools.partial(fn, layer)))

    def _false_cond_loc(self, nid: int) -> SourceLoc | None:
        """The line of the condition that made node ``nid`` skip (directly, or through what it reads)."""
        node = self.nodes.get(nid)
        while node is not None:
            for g, want in node.guards:
                if self.state.get(g) == _DONE and self.env[g] != want:
                    return self.nodes[g].loc
            node = next((self.nodes[d] for d in node.deps if self.state.get(d) == _SKIPPED), None)
        return None

    def _install_hooks(self, handles: list) -> None:
        """Add the run's hooks (and wraps) to ``handles`` as they go in: the caller removes whatever went in,
        even when installing fails part-way."""
        if self._plan.has_cache:
            for node in self.graph.nodes:
                if node.op is Op.CACHE:
                    self._start_cache(node, handles)
        # steps.py registers the ITER bodies' site keys in this run's site_nodes: derive the hooks from them
        hooks = self._plan.hooks if self.steps is None else _hook_paths(self.site_nodes)
        # a plain run (one whose nodes use the event schedule, with no reuse, layer swaps or packing, which add
        # hooks and forwards of their own) may wrap the hooked modules' forwards instead of hooking them
        wrap = (
            self._events is not None
            and self.reuse is None
            and self.layer_forward is None
            and self.pack_plan is None
        )
        _hook_modules(self.module, hooks, self._pre_hook, self._post_hook, handles, wrap)

    def _pre_hook(self, path: str):
        calls = self.calls_in
        site_nodes = self.site_nodes

        def hook(mod, args, kwargs):
            if self.adhoc:
                return None
            call = calls.get(path, 0)
            calls[path] = call + 1
            key = (path, _INPUTS, call)
            if self.steps is None:
                if key not in site_nodes:
                    return None
                keys = (key,)
            else:
                keys = self._event_keys(key)
                if not keys:
                    return None
            if self.repeat:
                args, kwargs = repeat_rows((args, kwargs), self.repeat)
                self.repeat = 0
                before = None  # the repeated inputs replace the originals
            elif self.pack is not None and path in self.pack.paths:
                args, kwargs = self._unpack_inputs(args, kwargs)
                before = None
            else:
                before = (args, kwargs)
            new = (args, kwargs)
            for k in keys:
                new = self._visit(k, new)
            if new is before:
                return None
            new_args, new_kwargs = new
            return tuple(new_args), dict(new_kwargs)

        return hook

    def _post_hook(self, path: str):
        calls = self.calls_out
        site_nodes = self.site_nodes

        def hook(mod, args, kwargs, output):
            if self.adhoc:
                return None
            call = calls.get(path, 0)
            calls[path] = call + 1
            key = (path, _OUTPUT, call)
            if self.steps is None:
                if key not in site_nodes:
                    return None
                if self.repeat:
                    new = self._visit(key, repeat_rows(output, self.repeat))
                    self.repeat = 0
                    if self.pack_plan is not None and call == 0:
                        return self._start_pack(path, output, new, args, kwargs)
                    return new
                if self.pack is not None and path in self.pack.paths:  # unpack; pack again after the visit
                    pack = self.pack
                    unedited = pack.unedited(output)
                    new = self._visit(key, self._end_pack(output))
                    if call == 0:
                        return self._start_pack(path, unedited, new, args, kwargs, pack.signature)
                    return new
                if self._events is not None and self.in_forward and not self.active:  # _visit's test
                    new = self._visit_fast(key, output)
                else:
                    new = self._visit(key, output)
            else:
                new = output
                for k in self._event_keys(key):
                    new = self._visit(k, new)
            return None if new is output else new

        return hook

    # -- suffix packing (packing.py) ----------------------------------------------------------------------------
    def _start_pack(self, path: str, original, rows, args: tuple, kwargs: dict, signature=None):
        """At the end of the shared prefix, or at a later touched layer's output while packed (``signature``
        given): the packed hidden state when ``path`` is a decoder layer and packing pays, else ``rows``. The
        first pack hooks every later layer (its packed mask) and the last one (unpack after it)."""
        layers_path, layers = self.pack_plan
        prefix = layers_path + "."
        if (
            not path.startswith(prefix)
            or type(original) is not torch.Tensor
            or not isinstance(rows, torch.Tensor)
        ):
            return rows
        try:
            index = int(path[len(prefix) :])
        except ValueError:
            return rows
        if signature is None:
            signature = packing.check(layers, index, args, kwargs)
            if signature is None:
                return rows
        built = packing.build(layers, layers_path, index, original, rows, signature)
        if built is None:
            return rows
        pack, hidden = built
        self.pack = pack
        if not self.pack_handles:  # a pack again later reuses these hooks (they read self.pack)
            self.pack_handles = handles = []
            for layer in pack.layers:
                handles.append(_add_hook(layer, self._pack_pre_hook, pre=True))
            handles.append(_add_hook(layers[-1], self._pack_post_hook, pre=False))
        return hidden

    def _pack_pre_hook(self, mod, args, kwargs):
        if self.pack is None or self.adhoc:
            return None
        packed = self.pack.layer_inputs(args, kwargs)
        return packed if packed is not None else self._unpack_inputs(args, kwargs)

    def _pack_post_hook(self, mod, args, kwargs, output):
        if self.pack is None or self.adhoc:
            return None
        return self._end_pack(output)

    def _end_pack(self, hidden):
        pack, self.pack = self.pack, None
        return pack.unpack(hidden)

    def _unpack_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self._end_pack(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._end_pack(kwargs["hidden_states"])
        return args, kwargs

    def _event_keys(self, key: tuple) -> list[tuple]:
        """The site keys a module event serves: its own, and its step-relative key inside a live step."""
        keys = [key] if key in self.site_nodes else []
        if self.steps is not None:
            rel = self.steps.relative(key)
            if rel is not None and self.site_nodes.get(rel):
                keys.append(rel)
        return keys

    def _visit(self, key: tuple, value: Any) -> Any:
        """Make ``key``'s site active with ``value``, run what is ready, and return the (possibly new) value."""
        # the event schedule holds for events of the forward itself: not nested in another event, nor in a node
        # run before the forward (a node that calls the model outside a MODULE op fires its hooks there)
        if self._events is not None and self.in_forward and not self.active:
            return self._visit_fast(key, value)
        current = self.current
        current[key] = value
        self.active[key] = True
        try:
            self._drain()
            state = self.state
            nodes = self.nodes
            for nid in self.site_nodes[key]:
                if nid in nodes and state.get(nid) is None:
                    self._site_not_ready(nodes[nid])
        finally:
            self.active.pop(key, None)
        self.seen.add(key)
        return current.pop(key)

    def _visit_fast(self, key: tuple, value: Any) -> Any:
        """``_visit`` for a graph with an event schedule: run the event's ready candidates, in program order."""
        current = self.current
        current[key] = value
        active = self.active
        active[key] = True
        state = self.state
        env = self.env
        seen = self.seen
        waiting = False
        try:
            for node, others in self._events[key]:
                nid = node.id
                if nid in state:  # done (or running: a nested event)
                    continue
                if others is not None and not others <= seen:
                    waiting = True
                    continue
                # _run_node, with the common ops inlined
                op = node.op
                if op is _SITE:  # _read_site; this event's value is the site's (see _event_schedule)
                    state[nid] = _RUNNING
                    try:
                        read = _site_read(node.target, current[key], self.graph.invokes, self.batch)
                    except Exception as e:
                        raise execution_error(e, node.loc, format_node(node)) from e
                    env[nid] = read
                    state[nid] = _DONE
                elif op is _SAVE and type(node.args[0]) is Ref:
                    env[nid] = env[node.args[0].id]
                    state[nid] = _DONE
                elif op is _STOP and self.in_forward:
                    state[nid] = _DONE
                    if self.stop_in_dynamo or not _is_compiling():  # see _exec
                        raise _EarlyStop(node, self)
                else:
                    self._run_node(node)
            if waiting:
                for nid in self.site_nodes[key]:
                    if state.get(nid) is None:
                        self._site_not_ready(self.nodes[nid])
        finally:
            active.pop(key, None)
        seen.add(key)
        return current.pop(key)

    def _site_not_ready(self, node: Node) -> None:
        waiting = [d for d in node.deps if self.state.get(d) not in (_DONE, _SKIPPED)]
        culprit = self.nodes.get(waiting[0]) if waiting else None
        detail = f" (it waits for {format_node(culprit)})" if culprit is not None else ""
        raise InterventionError(
            f"{node.target} runs before the value used here is computed{detail}",
            node.loc,
            "a module's input or output can only be set from values computed earlier in the forward pass",
        )

    # -- scheduling ----------------------------------------------------------------------------------------------
    def _drain(self) -> None:
        state = self.state
        nodes = self.nodes
        attempt = self._try
        for nid in list(self.pending):
            s = state.get(nid)
            if s is None or s == _ARMED:
                attempt(nodes[nid])
        self.pending = [n for n in self.pending if state.get(n) not in _FINISHED]

    def _try(self, node: Node) -> None:
        state = self.state
        for d in node.refs:
            s = state.get(d)
            if s == _SKIPPED:
                state[node.id] = _SKIPPED
                return
            if s != _DONE and s != _LIVE:
                return
        for d in node.after:
            if state.get(d) not in _FINISHED:
                return
        for g, want in node.guards:
            s = state.get(g)
            if s == _SKIPPED or s == _DONE and self.env[g] != want:
                state[node.id] = _SKIPPED
                return
            if s != _DONE:
                return
        op = node.op
        if op in _WAITING_OPS:
            if op is _ITER:  # armed: its body is instantiated at each matching step (steps.py)
                state.setdefault(node.id, _ARMED)
                return
            key = self._plan.site_keys.get(node.id)
            if key is None:  # a node the plan has not seen
                key = ("grad", node.args[0].id) if op in _GRAD_OPS else node.target.key
            if key not in self.active:
                if op is _GRAD and state.get(node.id) is None:
                    self._arm_grad(node)
                return
        self._run_node(node)

    def _run_node(self, node: Node) -> None:
        state = self.state
        nid = node.id
        state[nid] = _RUNNING  # nested drains (grad hooks inside backward) must not rerun it
        try:
            value = self._exec(node)
        except _EarlyStop:
            state[nid] = _DONE
            raise
        except Exception as e:
            raise execution_error(e, node.loc, format_node(node)) from e
        self.env[nid] = value
        state[nid] = _DONE

    def _exec(self, node: Node) -> Any:
        op = node.op
        if op is _SITE:  # no arguments
            return self._read_site(node.target)
        env = self.env
        if op is _SAVE and type(node.args[0]) is Ref:  # every trace saves: skip resolving the arguments
            return env[node.args[0].id]
        a = resolve(node.args, env.__getitem__, self.params.__getitem__) if node.args else ()
        kw = (
            {k: resolve(v, env.__getitem__, self.params.__getitem__) for k, v in node.kwargs}
            if node.kwargs
            else {}
        )
        if op not in _RUNNER_OPS:  # UPDATE too: in place on the site's value, which nothing else reads
            return VALUE_OPS[op](node, a, kw)
        if op is _SET:
            self._write_site(node, a[0])
            return None
        if op is _GRAD:
            return self.current[("grad", node.args[0].id)]
        if op is _SET_GRAD:
            key = ("grad", node.args[0].id)
            check_set_shape(self.current[key], a[1], node.loc, "the gradient")
            self.current[key] = a[1]
            return None
        if op is _SETATTR and node.target == "requires_grad":
            view = self.row_views.get(id(a[0]))
            if (
                view is not None and view[0] is a[0]
            ):  # an invoke's rows: the model computes on the batch tensor
                view[1].requires_grad = a[1]
                return None
        if op is _STOP:
            # Under Dynamo (a user's model compiled with torch.compile), an exception cannot leave the traced
            # region: the forward runs to its end instead, which only costs the layers the stop would skip. A
            # compiled Program catches its stop inside its own traced entry (stop_in_dynamo).
            if self.in_forward and (self.stop_in_dynamo or not _is_compiling()):
                raise _EarlyStop(node, self)
            return None
        if op is _MODULE:
            self.adhoc += 1
            try:
                return self.module.get_submodule(node.target)(*a, **kw)
            finally:
                self.adhoc -= 1
        if op is _CACHE:
            return self.env[node.id]
        return VALUE_OPS[op](node, a, kw)  # SETATTR of anything but an invoke's rows' requires_grad

    # -- sites ---------------------------------------------------------------------------------------------------
    def _rows(self, site: Site) -> tuple[int, int]:
        if site.invoke is None:
            return 0, self.batch
        r = self.graph.invokes[site.invoke]
        return r.start, r.stop

    def _read_site(self, site: Site) -> Any:
        value = self.current[site.key]
        if site.kind is _INPUT:
            args, kwargs = value
            value = args[0] if args else next(iter(kwargs.values()), None)
        if site.invoke is None:
            start, stop = 0, self.batch
        else:
            r = self.graph.invokes[site.invoke]
            start, stop = r.start, r.stop
        rows = narrow(value, start, stop, self.batch)
        if self.has_grads and rows is not value:
            self._note_row_views(value, rows, start, stop)
        return rows

    def _note_row_views(self, full: Any, rows: Any, start: int, stop: int) -> None:
        if isinstance(full, torch.Tensor):
            if rows is not full:
                self.row_views[id(rows)] = (rows, full, start, stop)
        elif isinstance(full, (tuple, list)) and isinstance(rows, (tuple, list)):
            for f, r in zip(full, rows):
                self._note_row_views(f, r, start, stop)
        elif isinstance(full, dict) and isinstance(rows, dict):
            for k, r in rows.items():
                self._note_row_views(full.get(k), r, start, stop)

    def _write_site(self, node: Node, new: Any) -> None:
        site: Site = node.target
        key = site.key
        start, stop = self._rows(site)

        resize = bool(node.kwargs)  # a SET's only keyword, resize=True: a pass's deliberate shape change

        def check(old, value):
            if not resize:
                check_set_shape(old, value, node.loc, site)

        old = self.current[key]
        if site.kind is SiteKind.OUTPUT:
            self.current[key] = replace(old, new, start, stop, self.batch, check)
        elif site.kind is SiteKind.INPUTS:
            args, kwargs = old
            new_args, new_kwargs = new
            args = replace(tuple(args), tuple(new_args), start, stop, self.batch, check)
            kwargs = replace(dict(kwargs), dict(new_kwargs), start, stop, self.batch, check)
            self.current[key] = (args, kwargs)
        else:
            args, kwargs = old
            if args:
                args = (replace(args[0], new, start, stop, self.batch, check), *args[1:])
            else:
                first = next(iter(kwargs))
                kwargs = {**kwargs, first: replace(kwargs[first], new, start, stop, self.batch, check)}
            self.current[key] = (args, kwargs)

    # -- gradients -----------------------------------------------------------------------------------------------
    def _arm_grad(self, node: Node) -> None:
        target = node.args[0].id
        self.state[node.id] = _ARMED
        if target in self.grad_hooks:
            return
        tensor = self.env[target]
        if not any(n.op is Op.BACKWARD for n in self.graph.nodes):  # the first mistake to report
            raise _no_backward_error(node)
        start = stop = None
        view = self.row_views.get(id(tensor))
        if view is not None and view[0] is tensor:  # an invoke's rows: hook the batch tensor, narrow its grad
            _, tensor, start, stop = view
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            raise GradientError(
                "`.grad` was read of a value that does not require grad, so no gradient will reach it",
                node.loc,
                "set `value.requires_grad = True` on it (or on an earlier value) before the loss is computed",
            )

        def hook(grad):
            key = ("grad", target)
            # a copy: autograd hands one gradient tensor to every input of an add (the residual stream and the
            # block), so `.grad[...] = v` in place on the original would change the other paths' gradient too
            part = (grad if start is None else grad[start:stop]).clone()
            self.current[key] = part
            self.active[key] = True
            try:
                self._drain()
            finally:
                self.active.pop(key, None)
            new = self.current.pop(key)
            if start is None:
                return new
            return torch.cat([grad[:start], new.to(grad.dtype), grad[stop:]])

        self.grad_hooks[target] = tensor.register_hook(hook)

    # -- tracer.cache() ------------------------------------------------------------------------------------------
    def _start_cache(self, node: Node, handles: list) -> None:
        options = dict(node.kwargs)
        cache: dict[str, CacheEntry] = {}
        self.env[node.id] = cache
        start, stop = (
            (0, self.batch) if node.invoke is None else self._rows(Site("", SiteKind.OUTPUT, 0, node.invoke))
        )
        paths = node.target
        for path, mod in self.module.named_modules():
            if paths is not None and path not in paths:
                continue
            name = "model" + ("." + path if path else "")

            def post(mod, args, kwargs, output, name=name):
                if self.adhoc or name in cache:
                    return
                entry = CacheEntry()
                if options.get("include_output", True):
                    entry.output = narrow(output, start, stop, self.batch)
                if options.get("include_inputs", False):
                    entry.inputs = narrow((args, kwargs), start, stop, self.batch)
                cache[name] = entry

            handles.append(mod.register_forward_hook(post, with_kwargs=True))

    # -- the end -------------------------------------------------------------------------------------------------
    def _all_resolved(self) -> bool:
        return all(self.state.get(n) in (_DONE, _SKIPPED) for n in self.pending)

    def _check_finished(self) -> None:
        if self.stopped is not None:
            return
        pending = [self.nodes[n] for n in self.pending if self.state.get(n) not in _FINISHED]
        if not pending:
            return
        for node in pending:
            if node.op is Op.GRAD:
                raise _no_backward_error(node)
            if node.op in _SITE_OPS:
                calls = self.calls_out if node.target.kind is SiteKind.OUTPUT else self.calls_in
                raise _missed(node, calls.get(node.target.path, 0))
        raise InterventionError(
            f"{format_node(pending[0])} was never computed: a value it needs was not produced", pending[0].loc
        )


def _no_backward_error(node: Node) -> GradientError:
    return GradientError(
        "`.grad` was read, but no backward pass reached this value",
        node.loc,
        "call `loss.backward()` in the block after this line (or read the gradient inside "
        "`with loss.backward():`), with a loss that depends on this value",
    )
