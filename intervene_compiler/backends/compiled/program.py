"""A compiled program: the eager semantics as a static schedule, replayed inside one Dynamo-traced forward.

``record_schedule`` (schedule.py) runs the eager interpreter once on fake tensors and notes at which event (before
the forward, a module's input or output, after the forward) each node ran: the schedule is exactly what the
reference backend does for this structure. :class:`Program` replays it: persistent dispatcher hooks
(dispatcher.py; installed once per model, inert outside a compiled call) hand each module event to the program,
which runs that event's nodes in order. Dynamo inlines the hooks, so model and interventions become one FX graph;
STOP raises inside it and is caught in the entry, so nothing after the last needed module is traced or compiled.

What eager mode decides at run time the program turns into data flow: a ``tracer.cond`` on a tensor is
predicated (both branches, ``torch.where``; predication.py), a lifted ``x[:, p]`` keeps view semantics by
re-taking, gradient edits run on the host from the backward of ``grad_edit`` (grad_edits.py), ``tracer.cache()``
captures at events, and a site family serves one member's recorded events at every member, gated by an input.
This module owns the replay: the program's state per call, its node evaluation and the family gating; plain value
nodes run as generated straight-line code (codegen.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import InterventionError
from ...ir import Graph, Node, Op, Ref, Site, SiteKind, is_mutation, saved_ids
from ...runtime import Target, narrow, resolve
from ..eager import EarlyStop, Interpreter
from ..eager.events import RUN
from .backward import BackwardSplit
from .codegen import straight_line
from .grad_edits import grad_edit
from .lowering import put, take
from .predication import UNPREDICATED, effective_guards, select, tree_zip_strict
from .schedule import AFTER, BEFORE


class NoGradientThere(Exception):  # noqa: N818 - a signal to the host, not an error users see
    """Raised while Dynamo traces a program whose ``.grad`` site does not require grad: the compiled call gives way
    to an eager run, which raises the user's GradientError at their line (an exception Dynamo can trace)."""


class CallState:
    """One call's state of a :class:`Program` (the values so far, the module calls seen, the lifted takes, ...).

    Each call makes a new one and drops it at its end: the stores a call makes land on an object no caller can
    reach, so Dynamo's compiled code replays none of them (it replays each attribute store on an object that
    outlives the call, and ten such stores on the program cost about as much as the tiny MLP's compiled graph)."""

    def __init__(self, params: tuple) -> None:
        self.params = params
        self.env: dict[int, Any] = {}
        self.current: dict = {}
        self.calls_in: dict[str, int] = {}
        self.calls_out: dict[str, int] = {}
        self.adhoc = 0
        self.committed: dict[int, Any] = {}
        self.takes: dict[int, tuple] = {}
        self.mutations = 0
        self.in_forward = False


def _per_call(name: str) -> Any:
    """A property of the program that is the current call's (``program.call_state``)."""

    def get(self: Program) -> Any:
        return getattr(self.call_state, name)

    def put_(self: Program, value: Any) -> None:
        setattr(self.call_state, name, value)

    return property(get, put_, doc=f"The current call's ``{name}`` (see :class:`CallState`).")


class Program(Interpreter):
    """Runs a graph by its recorded schedule; called by the dispatcher hooks during a compiled forward."""

    # what one call changes lives on its CallState; between calls ``call_state`` is None
    params = _per_call("params")
    env = _per_call("env")
    current = _per_call("current")
    calls_in = _per_call("calls_in")
    calls_out = _per_call("calls_out")
    adhoc = _per_call("adhoc")
    committed = _per_call("committed")
    takes = _per_call("takes")
    mutations = _per_call("mutations")
    in_forward = _per_call("in_forward")

    stop_in_dynamo = True  # its STOP is caught inside the traced entry (``run``): nothing after it is traced
    event_schedule = False  # it runs nodes by its recorded schedule (evaluate), never by the interpreter's

    def __init__(
        self,
        target: Target,
        graph: Graph,
        order: list[tuple[Any, int]],
        split: BackwardSplit | None = None,
        dynamic_conds: tuple[int, ...] = (),
        caches: dict[int, tuple[str, ...]] | None = None,
    ):
        self.call_state: CallState | None = CallState(graph.params)
        super().__init__(target, graph)
        split = split or BackwardSplit(graph)
        self.n_params = len(graph.params)
        self.probes = {site: self.n_params + i for site, i in split.probes.items()}
        self.made_to_require = split.made_to_require
        self.edits = split.edits
        self.needed = split.needed
        by_id = {n.id: n for n in graph.nodes}
        self.before: list[Node] = []
        self.after: list[Node] = []
        self.events: dict[Any, list[Node]] = {}
        for event, nid in order:
            node = by_id[nid]
            if event == BEFORE:
                self.before.append(node)
            elif event == AFTER:
                self.after.append(node)
            else:
                self.events.setdefault(event, []).append(node)
        self.saved_ids = saved_ids(graph.nodes)
        # events whose value is replaced (a SET): only these hooks return a new value; known statically
        self.replaces = {
            key
            for key, nodes in self.events.items()
            if any(n.op is Op.SET or n.id in self.probes for n in nodes)
        }
        ran = {nid for _, nid in order}
        self.saved_ids = tuple(i for i in self.saved_ids if i in ran)
        # tracer.cond on tensors: the COND nodes whose flags the call returns, and each guarded node's guards
        self.dynamic_conds = dynamic_conds
        self.returned_ids = self.saved_ids + self.needed + dynamic_conds  # what run returns, in order
        self.guards = effective_guards(graph.nodes) if dynamic_conds else {}
        # lifted `x[:, p]` reads: see evaluate
        self.take_ids = frozenset(n.id for n in graph.nodes if n.op is Op.CALL and n.target is take)
        # nodes that change args[0] in place, found here: Dynamo traces evaluate, and need not trace this test
        self.mutating = frozenset(n.id for n in graph.nodes if is_mutation_node(n))
        # straight-line code per plain value node (see codegen.straight_line): what Dynamo inlines for it
        self.fast: dict[int, Any] = {}
        self.fast_target: dict[int, Any] = {}  # a mutating node's args[0], for the take bookkeeping
        for n in graph.nodes:
            if n.id in self.probes or n.id in self.guards:
                continue
            fn = straight_line(n)
            if fn is not None:
                self.fast[n.id] = fn
                if n.id in self.mutating:
                    self.fast_target[n.id] = straight_line(Node(n.id, Op.SAVE, None, n.args[:1]))
        # fast nodes no take bookkeeping concerns (see evaluate)
        self.untracked = frozenset(
            nid
            for nid in self.fast
            if nid not in self.mutating
            and nid not in self.take_ids
            and not any(d in self.take_ids for d in by_id[nid].refs)
        )
        self.node_by_id = by_id
        # module path -> its `.skip(value)` SETs: the forward set on the instance for the call asks skip_value
        self.skips: dict[str, list[Node]] = {}
        for n in graph.nodes:
            if n.op is Op.SET and ("skip", True) in n.kwargs:
                self.skips.setdefault(n.target.path, []).append(n)
        # tracer.cache(): event key -> (CACHE id, entry name, rows, output?) for each module its first run
        # recorded (see _capture); the CACHE node's value is {name: [output, inputs]} (CacheEntry on the host)
        self.caches = caches or {}
        self.cache_events: dict[tuple, list[tuple]] = {}
        for cid, names in self.caches.items():
            node = by_id[cid]
            options = dict(node.kwargs)
            rows = self.site_rows(Site("", SiteKind.OUTPUT, 0, node.invoke))
            for name in names:
                path = name[len("model.") :] if name != "model" else ""
                if options.get("include_output", True):
                    self.cache_events.setdefault((path, SiteKind.OUTPUT, 0), []).append(
                        (cid, name, rows, True)
                    )
                if options.get("include_inputs", False):
                    self.cache_events.setdefault((path, SiteKind.INPUTS, 0), []).append(
                        (cid, name, rows, False)
                    )
        self.family: Any = None  # the site family (lowering.Family) when the program serves one
        self.family_events: dict[tuple, tuple[tuple, int]] = {}  # member event -> (recorded event, member)
        self.region: dict[tuple, list[Node]] = {}
        self._hook_points: frozenset | None = None

    def set_family(self, family, member: int) -> None:
        """Serve the events recorded on ModuleList member ``member`` at every member, gated by the index param.

        At member ``i`` the region's nodes run on a copy of that member's activation; values that leave the
        region (read later, saved) and the activation written back are selected with ``torch.where(index == i)``,
        so after the family every value is the chosen member's, for any index, with one compiled program.
        The gates ``index == i`` are inputs (see :func:`family_gates`), not computed in the graph: a constant
        ``i`` in each member's gating kernel would make Inductor generate and build one kernel per member.
        """
        concrete = f"{family.prefix}.{member}"
        for key in [k for k in self.events if k[0] == concrete or k[0].startswith(concrete + ".")]:
            self.region[key] = self.events.pop(key)
            suffix = key[0][len(concrete) :]
            for i in range(family.size):
                self.family_events[(f"{family.prefix}.{i}{suffix}", key[1], key[2])] = (key, i)
        self.family = family
        self.gate_base = family.param + 1  # after the member index (a family reads no gradients: no probes)
        self._hook_points = None
        self.region_writes = {
            key: any(n.op in (Op.SET, Op.SETITEM, Op.UPDATE) or is_mutation_node(n) for n in nodes)
            for key, nodes in self.region.items()
        }
        # per recorded event: its nodes less stops, its stops, and whether any node is a take (see evaluate)
        self.region_plan = {
            key: (
                [n for n in nodes if n.op is not Op.STOP],
                [n for n in nodes if n.op is Op.STOP],
                any(n.id in self.take_ids or n.op is Op.SAVE for n in nodes) and bool(self.take_ids),
            )
            for key, nodes in self.region.items()
        }

    @property
    def hook_points(self) -> frozenset[tuple[str, bool]]:
        """(module path, pre-hook?) of every event this program runs nodes at (see :class:`Dispatcher`)."""
        if self._hook_points is None:
            keys = list(self.events) + list(self.family_events) + list(self.cache_events)
            self._hook_points = frozenset((path, kind is not SiteKind.OUTPUT) for path, kind, _ in keys)
        return self._hook_points

    def handles(self, key: tuple) -> bool:
        return key in self.events or key in self.family_events or key in self.cache_events

    def writes(self, key: tuple) -> bool:
        fam = self.family_events.get(key)
        if fam is None:
            return key in self.replaces
        return self.region_writes[fam[0]]

    def run(self, params: tuple, args: tuple, kwargs: dict) -> tuple[tuple, Any]:
        """One call: the body of the compiled entry function."""
        self.call_state = CallState(params)
        for cid in self.caches:
            self.env[cid] = {}
        for node in self.before:
            self.env[node.id] = self.evaluate(node)
        output = None
        self.in_forward = True
        try:
            output = self.target.forward(*args, **kwargs)
        except EarlyStop as stop:
            if stop.owner is not self:
                raise
            output = None
        finally:
            self.in_forward = False
        for node in self.after:
            self.env[node.id] = self.evaluate(node)
        if self.take_ids:
            self._refresh_saved(self.saved_ids + self.needed)
        env = self.env  # a needed value a condition on a Python value left out of the schedule is None
        saved = tuple(env.get(i) for i in self.returned_ids)
        self.call_state = None  # the call's values are gone: nothing reads them after it
        return saved, output if self.graph.needs_output else None

    def skip_value(self, path: str) -> Any:
        """The output a ``.skip(value)`` gives module ``path`` at this call, or ``RUN`` (call its forward): as the
        eager runner's (``backends/eager/events.py``), while Dynamo traces the call; the value was computed at an
        earlier event of the recorded schedule."""
        call = self.calls_out.get(path, 0)
        for node in self.skips.get(path, ()):
            if node.target.call != call:
                continue
            if node.guards:
                raise NotImplementedError("a `.skip()` under a `tracer.cond` is not compiled")
            start, stop = self.site_rows(node.target)
            if stop - start != self.batch:
                raise InterventionError(
                    "the module cannot be skipped here: it is for one invoke's rows, and a module runs for the "
                    "whole batch",
                    node.loc,
                    "skip it for the whole batch (`with tracer.invoke():` or no invokes)",
                )
            return resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
        return RUN

    def evaluate(self, node: Node) -> Any:
        fast = self.fast.get(node.id)
        if fast is not None and (not self.take_ids or node.id in self.untracked):
            return fast(self.env, self.params)
        if not self.take_ids:
            return self._evaluate_guarded(node)
        # Lifted ``x[:, p]`` (take) is a copy where eager mode has a view: keep the view's semantics. A take
        # read after an in-place write is taken again from its base; an in-place write to a take is put back.
        takes = self.takes
        for d in node.refs:
            t = takes.get(d)
            if t is not None and t[3] != self.mutations:
                self._retake(d)
        value = fast(self.env, self.params) if fast is not None else self._evaluate_guarded(node)
        if node.op is Op.CALL and node.target is take:
            base, index, lifted = resolve(node.args, self.env.__getitem__, self.params.__getitem__)
            takes[node.id] = (base, index, lifted, self.mutations)
            return value
        if node.id in self.mutating:
            target_of = self.fast_target.get(node.id)
            if target_of is not None:
                target = target_of(self.env, self.params)
            else:
                target = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            for tid, (base, index, lifted, _) in list(takes.items()):
                if self.env.get(tid) is target and len(lifted) == 1:
                    put(base, index, lifted, target)
            self.mutations += 1
        return value

    def _retake(self, tid: int) -> None:
        base, index, lifted, _ = self.takes[tid]
        self.env[tid] = take(base, index, lifted)
        self.takes[tid] = (base, index, lifted, self.mutations)

    def _refresh_saved(self, ids) -> None:
        """At the end of a call: saved takes (and saves of them) as the writes after them left their base."""
        for nid in ids:
            node = self.node_by_id[nid]
            source = node.args[0].id if node.op is Op.SAVE and type(node.args[0]) is Ref else nid
            t = self.takes.get(source)
            if t is not None and t[3] != self.mutations:
                self._retake(source)
            if source != nid and source in self.takes:
                self.env[nid] = self.env[source]

    def _evaluate_guarded(self, node: Node) -> Any:
        if node.op is Op.COND:
            value = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            return value.reshape(()).bool() if isinstance(value, torch.Tensor) else bool(value)
        guards = self.guards.get(node.id)
        if guards is not None:
            when = self._predicate(guards)
            if when is not None:
                return self._evaluate_when(node, when)
        return self._evaluate_plain(node)

    def _predicate(self, guards: tuple[tuple[int, bool], ...]) -> torch.Tensor | None:
        """The guards' conjunction as a bool tensor; None when every guard is a Python value (then all held:
        the schedule left out nodes whose static guards failed)."""
        when = None
        for g, want in guards:
            flag = self.env[g]
            if isinstance(flag, torch.Tensor):
                flag = flag if want else ~flag
                when = flag if when is None else when & flag
        return when

    def _evaluate_when(self, node: Node, when: torch.Tensor) -> Any:
        """Run a node guarded by a tensor condition without branching: a SET writes ``where(when, new, old)``, an
        in-place change is undone where ``when`` is false, and a value is computed either way (the host drops a
        saved value whose condition was false, see ``cache.run_compiled``)."""
        op = node.op
        if op is Op.SET:
            new = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            old = self.read_site(node.target)
            self.write_site(node, tree_zip_strict(lambda a, b: select(when, a, b), new, old))
            return None
        if op in UNPREDICATED:
            raise NotImplementedError(f"{UNPREDICATED[op]} under a `tracer.cond` on a tensor is not compiled")
        if node.id in self.mutating:
            target = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            if not isinstance(target, torch.Tensor):
                raise NotImplementedError(
                    "changing a Python object under a `tracer.cond` on a tensor is not compiled"
                )
            before = target.clone()
            value = self._evaluate_plain(node)
            target.copy_(torch.where(when, target, before))
            return value
        return self._evaluate_plain(node)

    def _evaluate_plain(self, node: Node) -> Any:
        probe = self.probes.get(node.id)
        if probe is None:
            return super().evaluate(node)
        value = self.read_site(node.target)
        if node.id not in self.made_to_require and not (
            isinstance(value, torch.Tensor) and value.requires_grad
        ):
            # the probe would make it require grad where eager PyTorch has no gradient (known while tracing):
            # the eager run raises the user's error (see run.py)
            raise NoGradientThere(node.id)
        value = value + self.params[probe]  # d loss / d probe = the activation's grad
        slot = self.edits.get(node.id)
        if slot is not None:
            value = grad_edit(value, slot)
        self.write_site(node, value)
        return value

    def on_event(self, key: tuple, value: Any) -> Any:
        captures = self.cache_events.get(key)
        if captures is None:
            return self._on_event(key, value)
        if key[1] is SiteKind.OUTPUT and not self._in_place_member(key):
            self._capture(captures, value)  # as the eager cache hook, registered before the sites' hooks
            return self._on_event(key, value)
        value = self._on_event(key, value)
        self._capture(captures, value)  # inputs as the module receives them (after its pre-hook edits)
        return value

    def _in_place_member(self, key: tuple) -> bool:
        """A site family member's event that writes its value in place only: the member runs on a copy (see
        _on_member), so the value to cache is the one it returns (eager mode caches the original object, which
        the in-place writes change)."""
        fam = self.family_events.get(key)
        return (
            fam is not None
            and self.region_writes[fam[0]]
            and not any(n.op is Op.SET for n in self.region[fam[0]])
        )

    def _capture(self, captures: list[tuple], value: Any) -> None:
        for cid, name, (start, stop), is_output in captures:
            entry = self.env[cid].setdefault(name, [None, None])
            entry[0 if is_output else 1] = narrow(value, start, stop, self.batch)

    def _on_event(self, key: tuple, value: Any) -> Any:
        fam = self.family_events.get(key)
        if fam is not None:
            return self._on_member(key, fam[0], fam[1], value)
        nodes = self.events.get(key)
        if nodes is None:
            return value
        self.current[key] = value
        for node in nodes:
            self.env[node.id] = self.evaluate(node)
        return self.current.pop(key)

    def _on_member(self, key: tuple, recorded: tuple, member: int, value: Any) -> Any:
        gate = self.params[self.gate_base + member]  # an input per member: one kernel serves every member
        writes = self.region_writes[recorded]
        if not writes:
            working = value
        elif isinstance(value, torch.Tensor):
            working = value.clone()
        else:
            working = _tree_map(torch.clone, value)
        self.current[recorded] = working
        nodes, stops, tracks_takes = self.region_plan[recorded]
        env = self.env
        for node in nodes:
            env[node.id] = self.evaluate(node)
        new = self.current.pop(recorded)
        if tracks_takes:  # committed values below are selections, not views: they stop tracking their base
            self._refresh_saved([n.id for n in nodes])
            for node in nodes:
                self.takes.pop(node.id, None)
        committed = self.committed
        for node in nodes:
            v = env[node.id]
            if isinstance(v, torch.Tensor):
                old = committed.get(node.id)
                if old is not None:
                    # a 0-d value keeps its shape: the 1-element gate would broadcast it to (1,)
                    v = torch.where(gate if v.dim() else gate.view(()), v, old)
                committed[node.id] = env[node.id] = v
        if member == self.family.size - 1:
            for node in stops:  # after committing: the stop ends the forward here
                self.evaluate(node)
        if not writes:
            return value
        if isinstance(new, torch.Tensor) and isinstance(value, torch.Tensor):
            return torch.where(gate, new, value)
        return _tree_zip(lambda a, b: torch.where(gate, a, b), new, value)


_GATES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def family_gates(size: int, member: int, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """The gate inputs of a site family: ``tensor([i == member])`` for each of ``size`` members, on the model's
    device (cached)."""
    gates = _GATES.get((size, member, device))
    if gates is None:
        gates = _GATES[(size, member, device)] = tuple(
            torch.tensor([i == member], device=device) for i in range(size)
        )
    return gates


def is_mutation_node(node: Node) -> bool:
    """``is_mutation``: the lowering's in-place writes (a lifted SETITEM / fused UPDATE) say they are one."""
    return is_mutation(node)


def _tree_map(fn, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) in (tuple, list):
        return type(value)(_tree_map(fn, v) for v in value)
    return value


def _tree_zip(fn, a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return fn(a, b)
    if type(a) in (tuple, list) and type(b) in (tuple, list):
        return type(a)(_tree_zip(fn, x, y) for x, y in zip(a, b))
    return a


__all__ = ["Program", "family_gates", "is_mutation_node"]
