"""What an eager run derives from a graph's nodes alone, built once per optimized nodes tuple (``plan_for``).

``GraphPlan``: the node and site maps, the modules to hook, the saved ids, whether the drain before the forward
has anything to do, and for plain graphs the per-event schedule (``_event_schedule``) that the interpreter's fast
visit follows and the reads-only schedule (``Reads``) that ``reads.run_reads`` follows. Also the op constants the
hot paths compare with (module-level aliases: ``Op.SITE`` is a slow enum class attribute lookup).

A module of its own because it is pure analysis of the IR (no hooks, no values) and both runners (the
interpreter and the reads-only path) start from it.
"""

from __future__ import annotations

from ...ir import Node, Op, Ref, SiteKind, is_mutation, saved_ids
from ...ir.nodes import walk_nodes
from ...runtime.source import owner_and_call
from ...runtime.target import nodes_memo

# hot paths compare ops with these module constants: ``Op.SITE`` is a (slow) enum class attribute lookup
_SITE, _SET, _UPDATE, _GRAD, _SET_GRAD = Op.SITE, Op.SET, Op.UPDATE, Op.GRAD, Op.SET_GRAD
_SETATTR, _STOP, _MODULE, _CACHE, _ITER = Op.SETATTR, Op.STOP, Op.MODULE, Op.CACHE, Op.ITER
_SAVE, _BACKWARD = Op.SAVE, Op.BACKWARD
_INPUT, _INPUTS, _OUTPUT = SiteKind.INPUT, SiteKind.INPUTS, SiteKind.OUTPUT
_SITE_OPS = frozenset({_SITE, _SET, _UPDATE})
_GRAD_OPS = frozenset({_GRAD, _SET_GRAD})
_WAITING_OPS = _SITE_OPS | _GRAD_OPS | {_ITER}  # ops that run only at their event (or are armed)
# ops Interpreter.evaluate handles itself (the rest are plain value ops of the interpreter)
_RUNNER_OPS = frozenset({_SET, _GRAD, _SET_GRAD, _SETATTR, _STOP, _MODULE, _CACHE, _BACKWARD})


class GraphPlan:
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
        "site_edits",
        "grad_backward",
        "grad_dependent",
        "skips",
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
        # event key -> in-place edits of that site's value (``out[:, 0] = v`` kept apart from the site by a reader,
        # not fused into an UPDATE): like a site node, each must run during its site's event, or the model never
        # sees it (a value computed later, by a later module); ``visit`` checks them when the event ends
        self.site_edits = site_edits(graph_nodes)
        # with several backward passes: GRAD/SET_GRAD node id -> the BACKWARD node whose pass gives its gradient
        self.grad_backward = grad_backward(graph_nodes)
        # module path -> its `.skip(value)` SET nodes (the module's forward is not called at their call)
        self.skips: dict[str, list[Node]] = {}
        for n in graph_nodes:
            if n.op is _SET and ("skip", True) in n.kwargs:
                self.skips.setdefault(n.target.path, []).append(n)
        # the nodes that run during a backward pass (in its gradient hooks): gradient reads and sets and what
        # depends on them; anything else waits for the pass to end (grad mode is off inside it)
        self.grad_dependent: frozenset[int] = frozenset()
        if self.has_grads:
            dependent: set[int] = set()
            for n in walk_nodes(graph_nodes):
                if n.op in _GRAD_OPS or any(d in dependent for d in n.refs):
                    dependent.add(n.id)
            self.grad_dependent = frozenset(dependent)
        # (path, hook its inputs, hook its outputs) per module the graph touches, in path order
        self.hooks = hook_paths(self.site_nodes)
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
        # op-level sites (envoy.source) come from a rewritten forward, which the general scheduler installs
        has_ops = any(owner_and_call(key[0]) is not None for key in self.site_nodes)
        self.events = (
            None
            if self.has_iter or self.has_cache or self.has_grads or has_ops
            else _event_schedule(graph_nodes)
        )
        self.reads = Reads.of(graph_nodes, self.saved) if self.events is not None else None


def grad_backward(nodes: tuple[Node, ...]) -> dict[int, int]:
    """Which backward pass each gradient read or set belongs to, when a graph has several (else empty).

    As in PyTorch, a gradient read after ``loss.backward(retain_graph=True)`` is that backward's; one read before
    any backward, or inside ``with loss.backward():`` (marked ``backward="next"`` when recorded), is the next one's.
    """
    backwards = [i for i, n in enumerate(nodes) if n.op is Op.BACKWARD]
    if len(backwards) < 2:
        return {}
    bound: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if n.op not in _GRAD_OPS:
            continue
        before = [b for b in backwards if b < i]
        after = [b for b in backwards if b > i]
        if (dict(n.kwargs).get("backward") == "next" or not before) and after:
            bound[n.id] = nodes[after[0]].id
        elif before:
            bound[n.id] = nodes[before[-1]].id
    return bound


class Reads:
    """The schedule of a graph that only reads sites and saves them, with at most a stop after the last read (the
    common ``model.layer.output.save()`` trace, truncated by ``passes/early_stop.py``): ``reads.run_reads`` runs
    it with no scheduler at all. At each hooked event it fills its site reads and their saves; the stop ends the
    forward once every event was seen, which is when the general scheduler runs it (it waits for every read).
    """

    __slots__ = ("events", "hooks", "stop", "saved", "nodes")

    def __init__(self, events: dict, hooks: tuple, stop: Node | None, saved: tuple, nodes: tuple) -> None:
        self.events = events  # event key -> ((site node, its saves' ids), ...) in program order
        self.hooks = hooks  # as GraphPlan.hooks
        self.stop = stop
        self.saved = saved
        self.nodes = nodes  # program order, for the error of a read that never happened

    @classmethod
    def of(cls, graph_nodes: tuple[Node, ...], saved: tuple) -> Reads | None:
        events: dict[tuple, list] = {}
        reads: dict[int, tuple[Node, list]] = {}
        stop = None
        for n in graph_nodes:
            if n.guards or n.body or stop is not None:
                return None
            op = n.op
            if op is _SITE:
                entry: tuple[Node, list[int]] = (n, [])
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
        hooks = hook_paths({k: () for k in frozen})
        return cls(frozen, hooks, stop, saved, tuple(graph_nodes))


def _event_schedule(graph_nodes: tuple[Node, ...]) -> dict[tuple, tuple] | None:
    """For a graph without guards, steps, caches or gradients: event key -> ``(node, others)`` for every node
    that (transitively) waits for that event, in program order; ``others`` are the other events it waits for
    (None when none). None for any other graph.

    Without guards nothing is skipped, so once the drain before the forward is over, a node is ready exactly when
    every event it waits for has been visited (a site access: while its own event is active). At a visit of
    ``key`` during the forward that is not nested in another event (nor in a node that runs the model), the
    interpreter runs the candidates whose ``others`` were all visited before (``Interpreter._visit_fast``)
    instead of trying every pending node: what the general scheduler (``Interpreter.drain``) would run at that
    event, in the same order.
    """
    waits: dict[int, frozenset[tuple]] = {}
    events: dict[tuple, list] = {}
    empty: frozenset[tuple] = frozenset()
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


# methods that return a view of their receiver: an in-place edit through one edits the receiver
_VIEW_METHODS = frozenset(
    {
        "view",
        "view_as",
        "narrow",
        "select",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "expand",
        "t",
    }
)


def site_edits(graph_nodes: tuple[Node, ...]) -> dict[tuple, list[int]]:
    """Event key -> ids of the in-place edits (setitems, in-place methods) of that site's value or a view of it."""
    by_id = {n.id: n for n in graph_nodes}
    out: dict[tuple, list[int]] = {}
    for n in graph_nodes:
        if n.op is Op.UPDATE or not is_mutation(n) or not n.args:
            continue
        obj = n.args[0]
        while type(obj) is Ref:
            base = by_id.get(obj.id)
            if base is None:
                break
            if base.op is _SITE:
                out.setdefault(base.target.key, []).append(n.id)
                break
            if (
                base.op is Op.GETITEM
                or base.op is Op.GETATTR
                or base.op is Op.METHOD
                and base.target in _VIEW_METHODS
            ):
                obj = base.args[0] if base.args else None
            else:
                break
    return out


def hook_paths(site_nodes: dict) -> tuple[tuple[str, bool, bool], ...]:
    paths_in = {key[0] for key in site_nodes if key[1] is SiteKind.INPUTS}
    paths_out = {key[0] for key in site_nodes if key[1] is SiteKind.OUTPUT}
    return tuple((path, path in paths_in, path in paths_out) for path in sorted(paths_in | paths_out))


_PLANS_SIZE = 256


def plan_for(graph_nodes: tuple[Node, ...], plans: dict) -> GraphPlan:
    """The plan of ``graph_nodes``, from ``plans`` (the model's ``ModelCaches.plans``) when made before
    (``runtime.nodes_memo``)."""
    return nodes_memo(plans, graph_nodes, None, _PLANS_SIZE, lambda: GraphPlan(graph_nodes))


__all__ = ["GraphPlan", "Reads", "hook_paths", "plan_for"]
