"""The eager interpreter: runs an intervention graph alongside the model's forward pass through hooks.

Scheduling is by data dependency, in program order. Before the forward, and each time a hooked module reaches a
site (its input before it runs, its output after), the interpreter makes one pass over the pending nodes in
creation order and runs every node whose dependencies are done; SITE/SET/UPDATE nodes run only while their site is
active, GRAD/SET_GRAD only inside the tensor hook of their value during backward. Because nodes only depend on
earlier nodes, one pass per event suffices. Hooks live only for the run and are removed afterwards, also on
errors.

:class:`Interpreter` is public because other parts run graphs through it or extend it: the step bookkeeping
(``steps.py``) calls ``try_node`` and ``drain``; the compiled backend records a schedule by overriding ``visit``,
``run_node`` and ``evaluate`` (``backends/compiled/schedule.py``) and replays it in a ``Program`` that overrides
``evaluate`` and uses ``read_site``/``write_site``/``site_rows``. This module owns the scheduler (the run's
state, visits, drains, node evaluation, site reads and writes, the end checks); the module hooks that turn torch
events into visits (``events.py``), the shared-prefix glue (``prefix.py``) and the gradient machinery
(``gradients.py``) are mixins: methods on the run itself, so the per-event hot path calls them without
indirection.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import InterventionError, SourceLoc, check_set_shape, check_set_value, execution_error
from ...ir import Graph, Node, Op, Ref, Site, SiteKind, format_node, saved_ids
from ...runtime import VALUE_OPS, RunResult, Target, narrow, replace, resolve
from ...runtime.source import HOOKED
from .events import ModuleEvents
from .gradients import Gradients, no_backward_error
from .hooks import add_hook
from .plan import (
    _BACKWARD,
    _CACHE,
    _GRAD,
    _GRAD_OPS,
    _INPUT,
    _ITER,
    _MODULE,
    _RUNNER_OPS,
    _SAVE,
    _SET,
    _SET_GRAD,
    _SETATTR,
    _SITE,
    _SITE_OPS,
    _STOP,
    _WAITING_OPS,
    plan_for,
)
from .reads import missed_error, site_read
from .states import EarlyStop, NodeState
from .steps import Steps

# hot paths compare node states with these module-level aliases (a global load; IntEnum members compare as ints)
_DONE, _SKIPPED, _ARMED, _RUNNING, _LIVE = (
    NodeState.DONE,
    NodeState.SKIPPED,
    NodeState.ARMED,
    NodeState.RUNNING,
    NodeState.LIVE,
)
_FINISHED = (_DONE, _SKIPPED)
_is_compiling = torch.compiler.is_compiling


class Interpreter(ModuleEvents, Gradients):
    """One run of a graph on a target's model: ``Interpreter(target, graph).execute(args, kwargs)``.

    State a collaborator may read: ``state`` (node id -> :class:`NodeState`; no entry: pending), ``env`` (node
    id -> value), ``pending`` (node ids not yet finished, program order), ``nodes``/``site_nodes`` (the plan's
    maps; private copies when the graph has steps), ``current``/``active`` (event key -> value / active event
    keys, innermost last), ``calls_in``/``calls_out`` (module path -> calls so far), ``adhoc``, ``in_forward``.

    Extension points for subclasses: :meth:`visit` (an event), :meth:`run_node` (one node with its state and
    error bookkeeping), :meth:`evaluate` (one node's value), :meth:`read_site`/:meth:`write_site`/
    :meth:`site_rows`, and the class attributes ``event_schedule`` and ``stop_in_dynamo``. A subclass that
    overrides how nodes run must set ``event_schedule = False``: the fast visit inlines ``run_node`` and
    ``evaluate`` for the common ops.
    """

    # Per-run state with class-level defaults (a run sets its own when they change): one run per trace. The
    # shared-prefix defaults (repeat, pack, reuse, layer_forward) are SharedPrefix's, the gradient ones Gradients'.
    # May a plain graph's run follow the plan's per-event schedule (``_visit_fast``, which inlines ``run_node``
    # and ``evaluate`` for SITE, SAVE and STOP)? True for this class; a subclass that changes how nodes run (the
    # compiled backend's schedule recorder and Program) sets False and keeps the general scheduler.
    event_schedule = True
    stop_in_dynamo = False  # a STOP raises while Dynamo traces (see evaluate): a compiled Program's does
    adhoc = 0  # > 0 while a MODULE node calls a module ad hoc (its hooks do nothing)
    stopped: Node | None = None
    in_forward = False
    backward: int | None = (
        None  # the BACKWARD node whose pass is running (several passes: plan.grad_backward)
    )
    steps = None  # per-step bodies (tracer.all(), tracer.iter[...]): see steps.py

    def __init__(self, target: Target, graph: Graph):
        self.target = target
        self.module: torch.nn.Module = target.module
        self.graph = graph
        self.params = graph.params
        invokes = graph.invokes
        self.batch = invokes[-1].stop if invokes else 0
        plan = self._plan = plan_for(graph.nodes, target.caches.plans)
        if plan.has_iter:
            self.nodes = dict(plan.nodes)
            self.site_nodes = {k: list(v) for k, v in plan.site_nodes.items()}
        else:
            self.nodes = plan.nodes  # shared, read-only
            self.site_nodes = plan.site_nodes
        self.pending: list[int] = list(plan.nodes)
        self.state: dict[int, NodeState] = {}
        self.env: dict[int, Any] = {}
        self.active: dict = {}  # active event keys, innermost last (a grad hook runs inside a site event)
        self.current: dict = {}
        self.calls_in: dict[str, int] = {}
        self.calls_out: dict[str, int] = {}
        self.has_grads = plan.has_grads
        if plan.has_grads or plan.has_iter:  # (has_grads looks at the top-level nodes only)
            self.grad_hooks = {}
            self.row_views = {}
        # the plan's per-event candidates when it has them (see plan._event_schedule); subclasses that change how
        # nodes run keep the general scheduler (event_schedule)
        self._events = plan.events if self.event_schedule else None
        self.seen: set = set()  # event keys whose visit has finished
        if plan.has_iter:
            self.steps = Steps.create(self)

    # -- the run -------------------------------------------------------------------------------------------------
    def execute(self, args: tuple, kwargs: dict) -> RunResult:
        """Install the run's hooks, run what is ready before the forward, run ``target.forward(*args,
        **kwargs)`` (unless nothing needs it), and return the saved values; hooks are removed, also on errors."""
        handles: list = []
        output = None
        plan = self._plan
        try:
            if self.reuse is not None:  # before the runner's hooks: records see the layers' own outputs
                self.reuse.install(handles, add_hook)
            if self.layer_forward is not None:
                self._swap_layers(handles)
            self._install_hooks(handles)
            if self.steps is not None:
                self.steps.install(handles)
            if plan.idle_before_forward:  # every node is still pending
                resolved = not self.pending
            else:
                self.drain()
                resolved = self._all_resolved()
            # CACHE nodes are filled by the forward's hooks
            if self.graph.needs_output or plan.has_cache or not resolved:
                self.in_forward = True
                try:
                    output = self.target.forward(*args, **kwargs)
                except EarlyStop as stop:
                    if stop.owner is not self:
                        raise
                    self.stopped = stop.node
                finally:
                    self.in_forward = False
                if self.stopped is None:
                    if self.steps is not None:
                        self.steps.finish()
                    self.drain()
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

    def _false_cond_loc(self, nid: int) -> SourceLoc | None:
        """The line of the condition that made node ``nid`` skip (directly, or through what it reads)."""
        node = self.nodes.get(nid)
        while node is not None:
            for g, want in node.guards:
                if self.state.get(g) == _DONE and self.env[g] != want:
                    return self.nodes[g].loc
            node = next((self.nodes[d] for d in node.deps if self.state.get(d) == _SKIPPED), None)
        return None

    def visit(self, key: tuple, value: Any) -> Any:
        """Make ``key``'s site active with ``value``, run what is ready, and return the (possibly new) value."""
        # the event schedule holds for events of the forward itself: not nested in another event, nor in a node
        # run before the forward (a node that calls the model outside a MODULE op fires its hooks there)
        if self._events is not None and self.in_forward and not self.active:
            return self._visit_fast(key, value)
        current = self.current
        current[key] = value
        self.active[key] = True
        try:
            self.drain()
            state = self.state
            nodes = self.nodes
            for nid in self.site_nodes[key]:
                if nid in nodes and state.get(nid) is None:
                    self._site_not_ready(nodes[nid])
            edits = self._plan.site_edits.get(key)
            if edits:
                self._check_edits(key, edits)
        finally:
            self.active.pop(key, None)
        self.seen.add(key)
        return current.pop(key)

    def _visit_fast(self, key: tuple, value: Any) -> Any:
        """``visit`` for a graph with an event schedule: run the event's ready candidates, in program order."""
        current = self.current
        current[key] = value
        active = self.active
        active[key] = True
        state = self.state
        env = self.env
        seen = self.seen
        waiting = False
        try:
            for node, others in self._events[key]:  # type: ignore[index]  # called only with a schedule
                nid = node.id
                if nid in state:  # done (or running: a nested event)
                    continue
                if others is not None and not others <= seen:
                    waiting = True
                    continue
                # run_node, with the common ops inlined
                op = node.op
                if op is _SITE:  # read_site; this event's value is the site's (see _event_schedule)
                    state[nid] = _RUNNING
                    try:
                        read = site_read(node.target, current[key], self.graph.invokes, self.batch)
                    except Exception as e:
                        raise execution_error(e, node.loc, format_node(node)) from e
                    env[nid] = read
                    state[nid] = _DONE
                elif op is _SAVE and type(node.args[0]) is Ref:
                    env[nid] = env[node.args[0].id]
                    state[nid] = _DONE
                elif op is _STOP and self.in_forward:
                    state[nid] = _DONE
                    if self.stop_in_dynamo or not _is_compiling():  # see evaluate
                        raise EarlyStop(node, self)
                else:
                    self.run_node(node)
            if waiting:
                for nid in self.site_nodes[key]:
                    if state.get(nid) is None:
                        self._site_not_ready(self.nodes[nid])
                edits = self._plan.site_edits.get(key)
                if edits:
                    self._check_edits(key, edits)
        finally:
            active.pop(key, None)
        seen.add(key)
        return current.pop(key)

    def _check_edits(self, key: tuple, edits: list[int]) -> None:
        """An in-place edit of this event's site value still waiting when the event ends would change it after the
        module ran: the model would never see it (eager mode used to apply it silently to the saved value)."""
        state = self.state
        nodes = self.nodes
        for nid in edits:
            if nid in nodes and state.get(nid) is None:
                node = nodes[nid]
                waiting = [d for d in node.deps if state.get(d) not in (_DONE, _SKIPPED)]
                culprit = nodes.get(waiting[0]) if waiting else None
                detail = f" (it waits for {format_node(culprit)})" if culprit is not None else ""
                name = "model" + ("." + key[0] if key[0] else "")
                raise InterventionError(
                    f"this edit of {name}'s {'output' if key[1] is SiteKind.OUTPUT else 'input'} uses a value the forward "
                    f"pass computes after that module runs{detail}, so the model would never see it",
                    node.loc,
                    "edit a module's input or output only with values computed before it (earlier modules, "
                    "values from another trace or invoke)",
                )

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
    def drain(self) -> None:
        """One pass over the pending nodes in program order: run (``try_node``) every node that is ready now."""
        state = self.state
        nodes = self.nodes
        attempt = self.try_node
        for nid in list(self.pending):
            s = state.get(nid)
            if s is None or s == _ARMED:
                attempt(nodes[nid])
        self.pending = [n for n in self.pending if state.get(n) not in _FINISHED]

    def try_node(self, node: Node) -> None:
        """Run ``node`` if it is ready: its dependencies done, its guards true (else it is skipped), and its
        event active for a site access or gradient (a GRAD is armed meanwhile, an ITER armed for its steps)."""
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
        if self.backward is not None and node.id not in self._plan.grad_dependent:
            return  # inside a backward pass (a gradient hook's drain) only gradients run; the rest after it
        if op in _WAITING_OPS:
            if op is _ITER:  # armed: its body is instantiated at each matching step (steps.py)
                state.setdefault(node.id, _ARMED)
                return
            key = self._plan.site_keys.get(node.id)
            if key is None:  # a node the plan has not seen
                key = ("grad", node.args[0].id) if op in _GRAD_OPS else node.target.key
            if key not in self.active:
                if (op is _GRAD or op is _SET_GRAD) and state.get(node.id) is None:
                    self._arm_grad(node)
                return
            if (op is _GRAD or op is _SET_GRAD) and self._plan.grad_backward:
                bound = self._plan.grad_backward.get(node.id)
                if bound is not None and bound != self.backward:
                    return  # another backward pass's gradient
        self.run_node(node)

    def run_node(self, node: Node) -> None:
        """Run a ready ``node``: its value (``evaluate``) into ``env``, its state RUNNING then DONE; an error
        other than the run's stop is raised at the user's line."""
        state = self.state
        nid = node.id
        state[nid] = _RUNNING  # nested drains (grad hooks inside backward) must not rerun it
        try:
            value = self.evaluate(node)
        except EarlyStop:
            state[nid] = _DONE
            raise
        except Exception as e:
            raise execution_error(e, node.loc, format_node(node)) from e
        self.env[nid] = value
        state[nid] = _DONE

    def evaluate(self, node: Node) -> Any:
        """``node``'s value, its effect done: a site read or write, a gradient, a stop, an ad hoc module call, or
        a plain value op (``runtime.VALUE_OPS``)."""
        op = node.op
        if op is _SITE:  # no arguments
            return self.read_site(node.target)
        env = self.env
        if op is _SAVE and type(node.args[0]) is Ref:  # every trace saves: skip resolving the arguments
            return env[node.args[0].id]
        a: Any = resolve(node.args, env.__getitem__, self.params.__getitem__) if node.args else ()
        kw = (
            {k: resolve(v, env.__getitem__, self.params.__getitem__) for k, v in node.kwargs}
            if node.kwargs
            else {}
        )
        if op not in _RUNNER_OPS:  # UPDATE too: in place on the site's value, which nothing else reads
            return VALUE_OPS[op](node, a, kw)
        if op is _SET:
            self.write_site(node, a[0])
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
                raise EarlyStop(node, self)
            return None
        if op is _MODULE:
            path = node.target
            if path.endswith(
                HOOKED
            ):  # `module(x, hook=True)`: its submodules' sites are live during the call
                return self.module.get_submodule(path[: -len(HOOKED)])(*a, **kw)
            self.adhoc += 1
            try:
                return self.module.get_submodule(path)(*a, **kw)
            finally:
                self.adhoc -= 1
        if op is _CACHE:
            return self.env[node.id]
        if op is _BACKWARD:
            self.backward = node.id
            try:
                return VALUE_OPS[op](node, a, kw)
            finally:
                self.backward = None
        return VALUE_OPS[op](node, a, kw)  # SETATTR of anything but an invoke's rows' requires_grad

    # -- sites ---------------------------------------------------------------------------------------------------
    def site_rows(self, site: Site) -> tuple[int, int]:
        """The batch rows ``(start, stop)`` of ``site``'s invoke (every row when it has none)."""
        if site.invoke is None:
            return 0, self.batch
        r = self.graph.invokes[site.invoke]
        return r.start, r.stop

    def read_site(self, site: Site) -> Any:
        """``site``'s value at its active event, narrowed to its invoke's rows (views: in-place edits reach the
        batch)."""
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

    def write_site(self, node: Node, new: Any) -> None:
        """SET ``node``: replace its site's value at the active event with ``new`` (its invoke's rows spliced
        into the batch after a shape check, unless the SET may resize)."""
        site: Site = node.target
        key = site.key
        start, stop = self.site_rows(site)

        resize = ("resize", True) in node.kwargs  # a pass's deliberate shape change (passes/last_position.py)

        def check(old, value):
            if not resize:
                check_set_value(old, value, node.loc, site)

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
            if node.op is Op.GRAD or node.op is Op.SET_GRAD:
                raise no_backward_error(node)
            if node.op in _SITE_OPS:
                calls = self.calls_out if node.target.kind is SiteKind.OUTPUT else self.calls_in
                raise missed_error(node, calls.get(node.target.path, 0))
        raise InterventionError(
            f"{format_node(pending[0])} was never computed: a value it needs was not produced", pending[0].loc
        )


__all__ = ["Interpreter"]
