"""A compiled program: the eager semantics as a static schedule, replayed inside one Dynamo-traced forward.

``record_schedule`` runs the eager runner once on fake tensors and notes at which event (before the forward, a
module's input or output, after the forward) each node ran: the schedule is exactly what the reference backend
does for this structure. :class:`Program` replays it: persistent dispatcher hooks (installed once per model,
inert outside a compiled call) hand each module event to the program, which runs that event's nodes in order.
Dynamo inlines the hooks, so model and interventions become one FX graph; STOP raises inside it and is caught in
the entry, so nothing after the last needed module is traced or compiled.

What eager mode decides at run time the program turns into data flow: a ``tracer.cond`` on a tensor is
predicated (both branches, ``torch.where``), a lifted ``x[:, p]`` keeps view semantics by re-taking, gradient
edits run on the host from the backward of :func:`grad_edit`, and ``tracer.cache()`` captures at events.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ...errors import check_set_shape
from ...ir import Graph, Node, Op, ParamRef, Ref, Site, SiteKind, is_mutation, saved_ids
from ...ir.nodes import map_args
from ...runtime import Target, fake_copy, narrow, resolve, to_fake
from ..eager.runner import _EarlyStop, _Run
from .lowering import apply_writes, put, take

_BEFORE, _AFTER = "before", "after"


class _Both:
    """A data-dependent condition's value while a schedule is recorded: ``==`` and ``!=`` say both branches
    run, so every guarded node gets its place in the schedule (the program predicates them, see Program)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "<both branches>"


BOTH = _Both()


class _Recorder(_Run):
    """The eager runner, noting the event each node runs at (and printing nothing).

    A ``tracer.cond`` on a tensor records both branches (:data:`BOTH`); one on a Python value keeps its value,
    so its false branch is left out of the schedule (those nodes are skipped, as in eager mode).
    """

    def __init__(self, target: Target, graph: Graph):
        super().__init__(target, graph)
        self.order: list[tuple[Any, int]] = []
        self.started = False

    def _visit(self, key, value):
        self.started = True
        return super()._visit(key, value)

    def _run_node(self, node: Node) -> None:
        event = next(reversed(self.active)) if self.active else (_AFTER if self.started else _BEFORE)
        self.order.append((event, node.id))
        super()._run_node(node)

    def _exec(self, node: Node) -> Any:
        if node.op is Op.LOG:
            return None
        if node.op is Op.COND:
            value = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"a `tracer.cond` condition must be one value, got a tensor of shape {tuple(value.shape)}"
                    )
                return BOTH
            return bool(value)
        return super()._exec(node)


def record_schedule(target: Target, graph: Graph, args: tuple, kwargs: dict) -> _Recorder:
    """Run ``graph`` eagerly on fake tensors; the recorder holds the (event, node id) order and fake values."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        fake_graph = graph.replace(params=tuple(to_fake(p, mode) for p in graph.params))
        recorder = _Recorder(target, fake_graph)
        # copies: a KV cache object passed in (past_key_values=) is updated by the forward, which must not write
        # fake tensors into the user's object
        recorder.execute(fake_copy(args, mode), fake_copy(kwargs, mode))
    return recorder


@dataclass
class BackwardSplit:
    """A graph with gradients split into what compiles (the forward) and what runs after ``backward()``.

    ``probes`` maps a SITE node whose ``.grad`` is read to a zero tensor input added to that activation
    (``out + probe``): the probe's gradient is the activation's gradient, inside one graph (no ``retain_grad``).
    ``edits`` maps a SITE node whose gradient is changed (``.grad = ...``, ``.grad[:] = 0``) to a slot of
    :func:`grad_edit`, an identity op whose backward hands the gradient to the host (see ``GradEdits``).
    """

    forward: Graph
    post: tuple[Node, ...] = ()
    probes: dict[int, int] = field(
        default_factory=dict
    )  # SITE node id -> index of its probe among the probes
    needed: tuple[int, ...] = ()  # forward node ids whose values the post nodes read
    edits: dict[int, int] = field(default_factory=dict)  # SITE node id -> grad_edit slot


def split_backward(graph: Graph) -> tuple[BackwardSplit | None, str | None]:
    """Split off GRAD/BACKWARD and what depends on them; (None, reason) when that cannot be compiled.

    Host effects go with them: appending a traced value to a Python list (or dict, set) the trace did not create
    (``losses.append(loss)`` on a list from before the trace or from a session) runs after the compiled call.
    Inside the graph it would make Dynamo guard on the list's length and recompile every time it grows.
    ``tracer.log`` is one too: it prints the values after the compiled forward (a graph cannot print).
    """
    ops = {n.op for n in graph.nodes}
    host = _host_effects(graph)
    if Op.GRAD not in ops and Op.BACKWARD not in ops and Op.SET_GRAD not in ops and not host:
        return BackwardSplit(graph), None
    by_id = {n.id: n for n in graph.nodes}
    post: set[int] = set()
    for n in graph.nodes:
        if n.op in _GRAD_OPS or n.id in host or any(d in post for d in n.refs):
            post.add(n.id)
    probes: dict[int, int] = {}
    edits: dict[int, int] = {}
    for n in graph.nodes:
        if n.id in post and n.op in (Op.SITE, Op.SET, Op.UPDATE, Op.STOP, Op.MODULE):
            return None, "the model is read or changed after a backward pass"
        if n.op is Op.GRAD or n.op is Op.SET_GRAD:
            target = by_id.get(n.args[0].id)
            if target is None or target.op is not Op.SITE:
                return None, "only `.grad` of module inputs and outputs is compiled"
            probes.setdefault(target.id, len(probes))
        edited = None
        if n.op is Op.SET_GRAD:
            edited = by_id[n.args[0].id]
        elif is_mutation(n) and type(n.args[0]) is Ref and by_id[n.args[0].id].op is Op.GRAD:
            edited = by_id[by_id[n.args[0].id].args[0].id]  # .grad[...] = v: in place on the gradient
        if edited is not None:
            edits.setdefault(edited.id, len(edits))
    needed = sorted({d for n in graph.nodes if n.id in post for d in n.refs if d not in post})
    # probes make the read activations require grad
    dropped = post | {n.id for n in graph.nodes if n.op is Op.SETATTR and n.target == "requires_grad"}
    forward = []
    for n in graph.nodes:
        if n.id in dropped:
            continue
        if any(a in dropped for a in n.after):  # waiting for a post node means waiting for what it reads
            after = tuple(sorted({a for a in n.after if a not in dropped} | {d for d in needed if d < n.id}))
            n = replace(n, after=after)
        forward.append(n)
    ordered_post = tuple(n for n in graph.nodes if n.id in post)
    forward_graph = graph.replace(nodes=tuple(forward))
    return BackwardSplit(forward_graph, ordered_post, probes, tuple(needed), edits), None


_GRAD_OPS = (Op.GRAD, Op.SET_GRAD, Op.BACKWARD)


@torch.library.custom_op("intervene_compiler::grad_edit", mutates_args=())
def grad_edit(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Identity in the forward; in the backward, the gradient goes through the host's gradient edits for
    ``slot`` (:class:`GradEdits`), so ``.grad = ...`` inside a compiled trace changes what flows further back."""
    return x.clone()


@grad_edit.register_fake
def _grad_edit_fake(x: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("intervene_compiler::grad_edit_backward", mutates_args=())
def grad_edit_backward(grad: torch.Tensor, slot: int) -> torch.Tensor:
    edits = GradEdits.active[-1] if GradEdits.active else None
    if edits is None:  # a backward outside the trace: no edits apply (as the eager backend's removed hooks)
        return grad.clone()
    return edits(slot, grad)


@grad_edit_backward.register_fake
def _grad_edit_backward_fake(grad: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(grad)


def _grad_edit_setup(ctx, inputs, output) -> None:
    ctx.slot = inputs[1]


def _grad_edit_grad(ctx, grad):
    return grad_edit_backward(grad, ctx.slot), None


grad_edit.register_autograd(_grad_edit_grad, setup_context=_grad_edit_setup)


class GradEdits:
    """The host side of :func:`grad_edit` for one compiled call: when the backward reaches an edited site, run
    the post nodes that are ready (in program order: reads of that site's ``.grad``, what they compute, its
    ``.grad = ...``), as the eager backend's gradient hook does, and return the site's gradient as they left it.
    """

    active: list[GradEdits] = []  # the call whose backward runs now (innermost last)

    def __init__(self, split: BackwardSplit, env: dict, value_of, held=None):
        self.site_of = {slot: site for site, slot in split.edits.items()}
        self.nodes = [n for n in split.post if n.op is not Op.BACKWARD]
        self.post_ids = {n.id for n in split.post}
        self.env = env
        self.value_of = value_of  # (node) -> a value op's value, or the value a SET_GRAD sets
        self.held = held

    def __call__(self, slot: int, grad: torch.Tensor) -> torch.Tensor:
        site = self.site_of[slot]
        env = self.env
        current = grad
        for node in self.nodes:
            if node.id in env:
                continue
            if node.op is Op.GRAD or node.op is Op.SET_GRAD:
                if node.args[0].id != site:
                    continue  # another site's gradient: runs when the backward reaches that site
            if any(d not in env for d in node.refs if d != site) or any(
                a not in env for a in node.after if a in self.post_ids
            ):
                continue
            if self.held is not None and not self.held(node.id):
                env[node.id] = None
                continue
            if node.op is Op.GRAD:
                env[node.id] = current
            elif node.op is Op.SET_GRAD:
                value = self.value_of(node)
                check_set_shape(current, value, node.loc, "the gradient")
                current = value
                env[node.id] = None
            else:
                env[node.id] = self.value_of(node)
        return current.to(grad.dtype).clone()


def _host_effects(graph: Graph) -> set[int]:
    """LOG nodes, mutations of non-tensor params (Python containers) that nothing else in the graph reads, and
    containers the trace creates (``ic.list()``) that it only changes and saves (with those changes and saves)."""
    found: dict[int, int] = {}  # node id -> param index
    logs = {n.id for n in graph.nodes if n.op is Op.LOG} | _own_containers(graph)
    for n in graph.nodes:
        if n.op is Op.METHOD and is_mutation(n) and type(n.args[0]) is ParamRef:
            if not isinstance(graph.params[n.args[0].index], torch.Tensor):
                found[n.id] = n.args[0].index
    if not found:
        return logs
    read: dict[int, int] = {}  # param index -> how many nodes mention it
    for n in graph.nodes:
        for index in _param_indices((n.args, n.kwargs)):
            read[index] = read.get(index, 0) + 1
    per_param: dict[int, int] = {}
    for index in found.values():
        per_param[index] = per_param.get(index, 0) + 1
    return logs | {nid for nid, index in found.items() if read[index] == per_param[index]}


_CONTAINERS = (list, dict, set)


def _own_containers(graph: Graph) -> set[int]:
    """``ic.list()``/``ic.dict()`` made in the trace, their mutations and saves, when nothing else reads them:
    run on the host after the compiled call, like a list from outside the trace (see ``split_backward``), so a
    ``tracer.cond`` on a tensor can skip an append, and the graph does not guard on the container's length."""
    made = {n.id for n in graph.nodes if n.op is Op.CALL and n.target in _CONTAINERS and not n.refs}
    if not made:
        return set()
    uses: dict[int, list[int]] = {c: [] for c in made}
    for n in graph.nodes:
        for d in n.refs:
            if d not in made:
                continue
            first = n.args[0] if n.args else None
            own = type(first) is Ref and first.id == d and n.refs.count(d) == 1
            if own and (n.op is Op.SAVE or n.op is Op.SETITEM or n.op is Op.METHOD and is_mutation(n)):
                uses[d].append(n.id)
            else:
                made.discard(d)
    return {i for c in made for i in (c, *uses[c])}


def host_only_params(graph: Graph) -> frozenset[int]:
    """Indices of the params that only host effects use (see ``_host_effects``)."""
    if not any(n.op is Op.METHOD for n in graph.nodes):
        return frozenset()
    host = _host_effects(graph)
    return frozenset(
        n.args[0].index
        for n in graph.nodes
        if n.id in host and n.op is Op.METHOD and type(n.args[0]) is ParamRef
    )


def _param_indices(value: Any) -> list[int]:
    out: list[int] = []
    map_args(value, lambda leaf: out.append(leaf.index) if type(leaf) is ParamRef else None)
    return out


class Program(_Run):
    """Runs a graph by its recorded schedule; called by the dispatcher hooks during a compiled forward."""

    stop_in_dynamo = True  # its STOP is caught inside the traced entry (``run``): nothing after it is traced

    def __init__(
        self,
        target: Target,
        graph: Graph,
        order: list[tuple[Any, int]],
        split: BackwardSplit | None = None,
        dynamic_conds: tuple[int, ...] = (),
        caches: dict[int, tuple[str, ...]] | None = None,
    ):
        super().__init__(target, graph)
        split = split or BackwardSplit(graph)
        self.n_params = len(graph.params)
        self.probes = {site: self.n_params + i for site, i in split.probes.items()}
        self.edits = split.edits
        self.needed = split.needed
        by_id = {n.id: n for n in graph.nodes}
        self.before: list[Node] = []
        self.after: list[Node] = []
        self.events: dict[Any, list[Node]] = {}
        for event, nid in order:
            node = by_id[nid]
            if event == _BEFORE:
                self.before.append(node)
            elif event == _AFTER:
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
        self.guards = effective_guards(graph.nodes) if dynamic_conds else {}
        # lifted `x[:, p]` reads: see _exec
        self.take_ids = frozenset(n.id for n in graph.nodes if n.op is Op.CALL and n.target is take)
        # nodes that change args[0] in place, found here: Dynamo traces _exec, and need not trace this test
        self.mutating = frozenset(n.id for n in graph.nodes if is_mutation_node(n))
        # straight-line code per plain value node (see _straight_line): what Dynamo inlines for it
        self.fast: dict[int, Any] = {}
        self.fast_target: dict[int, Any] = {}  # a mutating node's args[0], for the take bookkeeping
        for n in graph.nodes:
            if n.id in self.probes or n.id in self.guards:
                continue
            fn = _straight_line(n)
            if fn is not None:
                self.fast[n.id] = fn
                if n.id in self.mutating:
                    self.fast_target[n.id] = _straight_line(Node(n.id, Op.SAVE, None, n.args[:1]))
        # fast nodes no take bookkeeping concerns (see _exec)
        self.untracked = frozenset(
            nid
            for nid in self.fast
            if nid not in self.mutating
            and nid not in self.take_ids
            and not any(d in self.take_ids for d in by_id[nid].refs)
        )
        self.node_by_id = by_id
        self.takes: dict[int, tuple] = {}
        self.mutations = 0
        # tracer.cache(): event key -> (CACHE id, entry name, rows, output?) for each module its first run
        # recorded (see _capture); the CACHE node's value is {name: [output, inputs]} (CacheEntry on the host)
        self.caches = caches or {}
        self.cache_events: dict[tuple, list[tuple]] = {}
        for cid, names in self.caches.items():
            node = by_id[cid]
            options = dict(node.kwargs)
            rows = self._rows(Site("", SiteKind.OUTPUT, 0, node.invoke))
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
        self.family = None
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
        # per recorded event: its nodes less stops, its stops, and whether any node is a take (see _exec)
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
        self.params = params
        self.env = {}
        self.current = {}
        self.calls_in = {}
        self.calls_out = {}
        self.adhoc = 0
        self.committed = {}
        self.takes = {}
        self.mutations = 0
        for cid in self.caches:
            self.env[cid] = {}
        for node in self.before:
            self.env[node.id] = self._exec(node)
        output = None
        self.in_forward = True
        try:
            output = self.target.forward(*args, **kwargs)
        except _EarlyStop as stop:
            if stop.owner is not self:
                raise
            output = None
        finally:
            self.in_forward = False
        for node in self.after:
            self.env[node.id] = self._exec(node)
        if self.take_ids:
            self._refresh_saved(self.saved_ids + self.needed)
        env = self.env  # a needed value a condition on a Python value left out of the schedule is None
        saved = tuple(env.get(i) for i in self.saved_ids + self.needed + self.dynamic_conds)
        self.env = None
        return saved, output if self.graph.needs_output else None

    def _exec(self, node: Node) -> Any:
        fast = self.fast.get(node.id)
        if fast is not None and (not self.take_ids or node.id in self.untracked):
            return fast(self.env, self.params)
        if not self.take_ids:
            return self._exec_guarded(node)
        # Lifted ``x[:, p]`` (take) is a copy where eager mode has a view: keep the view's semantics. A take
        # read after an in-place write is taken again from its base; an in-place write to a take is put back.
        takes = self.takes
        for d in node.refs:
            t = takes.get(d)
            if t is not None and t[3] != self.mutations:
                self._retake(d)
        value = fast(self.env, self.params) if fast is not None else self._exec_guarded(node)
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

    def _exec_guarded(self, node: Node) -> Any:
        if node.op is Op.COND:
            value = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            return value.reshape(()).bool() if isinstance(value, torch.Tensor) else bool(value)
        guards = self.guards.get(node.id)
        if guards is not None:
            when = self._predicate(guards)
            if when is not None:
                return self._exec_when(node, when)
        return self._exec_plain(node)

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

    def _exec_when(self, node: Node, when: torch.Tensor) -> Any:
        """Run a node guarded by a tensor condition without branching: a SET writes ``where(when, new, old)``, an
        in-place change is undone where ``when`` is false, and a value is computed either way (the host drops a
        saved value whose condition was false, see ``cache.run_compiled``)."""
        op = node.op
        if op is Op.SET:
            new = resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
            old = self._read_site(node.target)
            self._write_site(node, _tree_zip_strict(lambda a, b: _select(when, a, b), new, old))
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
            value = self._exec_plain(node)
            target.copy_(torch.where(when, target, before))
            return value
        return self._exec_plain(node)

    def _exec_plain(self, node: Node) -> Any:
        probe = self.probes.get(node.id)
        if probe is None:
            return super()._exec(node)
        value = self._read_site(node.target) + self.params[probe]  # d loss / d probe = the activation's grad
        slot = self.edits.get(node.id)
        if slot is not None:
            value = grad_edit(value, slot)
        self._write_site(node, value)
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
            self.env[node.id] = self._exec(node)
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
            env[node.id] = self._exec(node)
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
                if (
                    old is not None
                ):  # a 0-d value keeps its shape: the 1-element gate would broadcast it to (1,)
                    v = torch.where(gate if v.dim() else gate.view(()), v, old)
                committed[node.id] = env[node.id] = v
        if member == self.family.size - 1:
            for node in stops:  # after committing: the stop ends the forward here
                self._exec(node)
        if not writes:
            return value
        if isinstance(new, torch.Tensor) and isinstance(value, torch.Tensor):
            return torch.where(gate, new, value)
        return _tree_zip(lambda a, b: torch.where(gate, a, b), new, value)


def _straight_line(node: Node):
    """``node`` as one generated function ``(env, params) -> value`` (``e[3].view(p[0], 2)``), or None.

    Dynamo inlines every Python call a program makes while it traces: one small function per node, with the
    arguments written out, costs it far less than the generic ``_exec`` / ``resolve`` path (recursive, one call
    per argument leaf). Only ops whose meaning is the plain Python expression: calls, methods, getattr,
    getitem, save.
    """
    consts: list[Any] = []

    def const(value: Any) -> str:
        consts.append(value)
        return f"c[{len(consts) - 1}]"

    def expr(value: Any) -> str:
        t = type(value)
        if t is Ref:
            return f"e[{value.id}]"
        if t is ParamRef:
            return f"p[{value.index}]"
        if t is tuple:
            return "(" + "".join(expr(v) + ", " for v in value) + ")"
        if t is list:
            return "[" + ", ".join(expr(v) for v in value) + "]"
        if t is slice:
            return f"slice({expr(value.start)}, {expr(value.stop)}, {expr(value.step)})"
        if value is None or t is bool or t is int:
            return repr(value)
        if t is dict or t is set:  # a fresh copy per call, as resolve builds one
            return f"{t.__name__}({const(value)})" if not _has_refs(value) else _NO
        return const(value)

    op = node.op
    args = [expr(a) for a in node.args]
    kwargs = [(k, expr(v)) for k, v in node.kwargs]
    if any(not k.isidentifier() for k, _ in kwargs):
        return None
    call = ", ".join(args + [f"{k}={v}" for k, v in kwargs])
    if op is Op.CALL:
        body = f"{const(node.target)}({call})"
    elif op is Op.METHOD and type(node.target) is str and node.target.isidentifier() and args:
        rest = ", ".join(args[1:] + [f"{k}={v}" for k, v in kwargs])
        body = f"{args[0]}.{node.target}({rest})"
    elif op is Op.GETATTR and type(node.target) is str and node.target.isidentifier() and not kwargs:
        body = f"{args[0]}.{node.target}"
    elif op is Op.GETITEM and len(args) == 2 and not kwargs:
        body = f"{args[0]}[{args[1]}]"
    elif op is Op.SAVE and len(args) == 1:
        body = args[0]
    else:
        return None
    if _NO in body:
        return None
    scope = {"slice": slice, "dict": dict, "set": set}
    return eval(f"lambda e, p, c=c: {body}", scope, {"c": tuple(consts)})  # noqa: S307


_NO = "<not straight-line>"


def _has_refs(value: Any) -> bool:
    found = []
    map_args(value, lambda leaf: found.append(leaf) if type(leaf) in (Ref, ParamRef) else None)
    return bool(found)


UNPREDICATED = {
    Op.STOP: "`tracer.stop()`",
    Op.SETATTR: "setting an attribute",
    Op.BACKWARD: "a backward pass",
    Op.GRAD: "reading `.grad`",
    Op.SET_GRAD: "setting `.grad`",
    Op.CACHE: "`tracer.cache()`",
}


def dynamic_conds_of(nodes, recorder: _Recorder) -> tuple[int, ...]:
    """The COND nodes the recorded schedule took both branches of: conditions on tensors."""
    return tuple(n.id for n in nodes if n.op is Op.COND and recorder.env.get(n.id) is BOTH)


def unpredicated_reason(nodes, guards: dict, dynamic_conds: tuple[int, ...]) -> str | None:
    """Why a node cannot run under a condition on a tensor (see UNPREDICATED), or None. ``guards``: the
    effective guards (:func:`effective_guards`)."""
    for n in nodes:
        if n.op in UNPREDICATED and any(g in dynamic_conds for g, _ in guards.get(n.id, ())):
            return f"{UNPREDICATED[n.op]} under a `tracer.cond` on a tensor is not compiled"
    return None


def effective_guards(nodes) -> dict[int, tuple[tuple[int, bool], ...]]:
    """Node id -> every (COND id, branch) that must hold for it to run in eager mode: its own guards, its
    conditions' guards, and those of every value it reads (a node reading a skipped value is skipped)."""
    found: dict[int, frozenset] = {}
    for n in nodes:
        guards = set(n.guards)
        for d in n.refs:
            guards |= found.get(d, frozenset())
        for g, _ in n.guards:
            guards |= found.get(g, frozenset())
        if guards:
            found[n.id] = frozenset(guards)
    return {nid: tuple(sorted(g)) for nid, g in found.items()}


def _select(when: torch.Tensor, new: Any, old: Any) -> Any:
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        if new.shape != old.shape:
            raise NotImplementedError(
                "a set under a `tracer.cond` on a tensor that changes the value's shape is not compiled"
            )
        return torch.where(when, new, old)
    if new is old:
        return new
    raise NotImplementedError(
        f"setting a {type(old).__name__} value under a `tracer.cond` on a tensor is not compiled"
    )


def _tree_zip_strict(fn, a: Any, b: Any) -> Any:
    if type(a) in (tuple, list) and type(b) in (tuple, list) and len(a) == len(b):
        return type(a)(_tree_zip_strict(fn, x, y) for x, y in zip(a, b))
    if type(a) is dict and type(b) is dict and a.keys() == b.keys():
        return {k: _tree_zip_strict(fn, a[k], b[k]) for k in a}
    return fn(a, b)


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
    """``is_mutation``, and the lowering's in-place writes (a lifted SETITEM / fused UPDATE)."""
    return is_mutation(node) or node.op is Op.CALL and (node.target is put or node.target is apply_writes)


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


class Dispatcher:
    """Hooks that forward module events to the program of the running entry, on the modules programs need.

    A module gets its pre-/post-hook the first time a program has an event there (:meth:`ensure`), and keeps it
    (so Dynamo's guards on the hook dicts of the entries compiled since stay valid); modules no program touches
    get none, so Dynamo traces their plain ``forward`` instead of inlining an inert hook at each of them. Inert
    when no program runs: outside a compiled call the model computes exactly what it computed before.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.program: Program | None = None
        self.handles = []
        self.hooked: set[tuple[str, bool]] = set()  # (module path, pre-hook?)
        self._regions: tuple | None = None  # see regions()
        self._region_fns: dict[type, Any] = {}

    def ensure(self, program: Program) -> None:
        """Hook the modules ``program`` has events on (a no-op once they are)."""
        points = program.hook_points
        if points <= self.hooked:
            return
        for path, pre in sorted(points - self.hooked):
            mod = self.module.get_submodule(path)
            if pre:
                self.handles.append(mod.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            else:
                self.handles.append(mod.register_forward_hook(self._post(path), with_kwargs=True))
            self.hooked.add((path, pre))
        self._regions = None

    def regions(self) -> tuple:
        """(member, its forward as a nested compile region, its parameters) for each repeated block no program
        looks inside.

        A member of a ModuleList of two or more modules of one class, with children, none of which (at any depth)
        is hooked: its hooks (events on the member itself) stay outside its ``forward``, so the region holds only
        model code. During a compiled call the member's ``forward`` is this region (``torch.compiler.
        nested_compile_region``): Inductor compiles the identical bodies once instead of once per member. Stable
        objects, so Dynamo's guards on them hold from call to call; recomputed when hooks are added.
        """
        if self._regions is not None:
            return self._regions
        hooked = {path for path, _ in self.hooked}
        found = []
        for path, mod in self.module.named_modules():
            if not isinstance(mod, torch.nn.ModuleList) or len(mod) < 2:
                continue
            members = list(mod)
            cls = type(members[0])
            if any(type(m) is not cls for m in members) or not any(True for _ in members[0].children()):
                continue
            if any(path == f or path.startswith(f + ".") for f, _ in found):
                continue  # inside a region already
            for i, member in enumerate(members):
                name = f"{path}.{i}" if path else str(i)
                inside = any(h.startswith(name + ".") for h in hooked)
                if inside or "forward" in member.__dict__:
                    continue
                found.append((name, member))
        self._regions = tuple(
            (member, self._region_fn(type(member), len(found)).__get__(member), tuple(member.parameters()))
            for _, member in found
        )
        return self._regions

    def usable_regions(self) -> tuple:
        """:meth:`regions`, less members with trainable parameters while grad mode is on: torch 2.13 computes
        wrong gradients through a nested compile region whose parameters require grad."""
        regions = self.regions()
        if regions and torch.is_grad_enabled():
            regions = tuple(r for r in regions if not any(p.requires_grad for p in r[2]))
        return regions

    def _region_fn(self, cls: type, count: int):
        fn = self._region_fns.get(cls)
        if fn is None:
            fn = torch.compiler.nested_compile_region(cls.forward, max_reuse_entries=max(8, count + 1))
            self._region_fns[cls] = fn
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.hooked = set()
        self._regions = None

    def _pre(self, path: str):
        def hook(mod, args, kwargs):
            program = self.program
            if program is None or program.adhoc:
                return None
            call = program.calls_in.get(path, 0)
            program.calls_in[path] = call + 1
            key = (path, SiteKind.INPUTS, call)
            if not program.handles(key):
                return None
            new = program.on_event(key, (args, kwargs))
            if not program.writes(key):
                return None
            return tuple(new[0]), dict(new[1])

        return hook

    def _post(self, path: str):
        def hook(mod, args, kwargs, output):
            program = self.program
            if program is None or program.adhoc:
                return None
            call = program.calls_out.get(path, 0)
            program.calls_out[path] = call + 1
            key = (path, SiteKind.OUTPUT, call)
            if not program.handles(key):
                return None
            new = program.on_event(key, output)
            return new if program.writes(key) else None

        return hook
