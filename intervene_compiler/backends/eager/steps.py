"""Steps for the eager runner: ITER nodes (``tracer.all()``, ``tracer.iter[...]``) run their body once per step.

A step is one call of the root module (in ``generate``, one new token). When step ``k`` starts (the root's
forward pre-hook) every armed ITER node whose selection contains ``k`` gets a fresh instance of its body: the body
nodes are reset to pending and join the runner's normal scheduler, with their step-relative sites
(``Site.call < 0``) registered for this step. While an instance is live the ITER node's value is ``k`` (body nodes
read it as the step index). When the step ends (the root's forward hook) every body node must have run; the
instance closes, and after the selection's last step the ITER node is done, so nodes ordered after the block
(a truncating stop, a read of a list the block appended to) can run.

A module with ``runs_ahead_of_step = True`` (``model.generator.streamer``: ``generate`` streams the ids a step's
forward will take before that forward) is called between steps: its event is kept and given to the next step when
it starts, as that step's first call of the module (nnsight's count: the streamer's call ``k`` is step ``k``). An
event after the last step is given to none.
"""

from __future__ import annotations

from typing import Any

from ...errors import InterventionError, MissedSiteError, missed_site_error
from ...ir import Node, Op, SiteKind, format_node, format_site
from ...ir.nodes import walk_nodes
from ...ir.steps import first_step, format_steps, last_step, step_matches
from .plan import _SITE_OPS
from .states import NodeState

_DONE, _SKIPPED, _ARMED, _LIVE = NodeState.DONE, NodeState.SKIPPED, NodeState.ARMED, NodeState.LIVE


def _runs_ahead(root: Any, path: str) -> bool:
    try:
        return bool(getattr(root.get_submodule(path), "runs_ahead_of_step", False))
    except AttributeError:
        return False


class Steps:
    """Per-run step state of one :class:`~intervene_compiler.backends.eager.interpreter.Interpreter`."""

    def __init__(self, run: Any, iters: list[Node]):
        self.run = run
        self.iters = iters
        self.bodies = {n.id: n.body[0].nodes for n in iters}
        self.step = -1  # the current (or last) step; -1 before the first forward
        self.in_step = False
        self.start_in: dict[str, int] = {}
        self.start_out: dict[str, int] = {}
        self.live: dict[int, tuple[Node, ...]] = {}  # ITER id -> its running instance's body nodes
        self.ran: dict[int, list[int]] = {n.id: [] for n in iters}
        ahead: set[str] = set()
        for it in iters:
            for n in walk_nodes(it.body[0].nodes):
                run.nodes[n.id] = n
                if n.op in _SITE_OPS:  # registered now so their modules get hooks; filled while live
                    run.site_nodes.setdefault(n.target.key, [])
                    if _runs_ahead(run.module, n.target.path):
                        ahead.add(n.target.path)
        self.ahead = frozenset(ahead)  # paths of step-relative sites on modules called ahead of the step
        self.kept: dict[tuple, tuple[int, Any]] = {}  # (path, kind) -> (call, value) of the last such event

    @classmethod
    def create(cls, run: Any) -> Steps | None:
        iters = [n for n in run.graph.nodes if n.op is Op.ITER]
        return cls(run, iters) if iters else None

    def install(self, handles: list) -> None:
        root = self.run.module
        handles.append(root.register_forward_pre_hook(self._begin, prepend=True))
        handles.append(root.register_forward_hook(self._end))

    def relative(self, key: tuple) -> tuple | None:
        """The step-relative key of a module event ``(path, kind, call)``, while a step runs."""
        if not self.in_step:
            return None
        path, kind, call = key
        start = (self.start_out if kind is SiteKind.OUTPUT else self.start_in).get(path, 0)
        return (path, kind, -1 - (call - start))

    def ahead_of_step(self, key: tuple, value: Any) -> None:
        """Keep an event of a module called ahead of the step (between steps) for the next step."""
        if not self.in_step and key[0] in self.ahead:
            self.kept[key[:2]] = (key[2], value)

    # -- step boundaries ---------------------------------------------------------------------------------------
    def _begin(self, module, args) -> None:
        run = self.run
        if run.adhoc:
            return
        self.step += 1
        self.in_step = True
        self.start_in = dict(run.calls_in)
        self.start_out = dict(run.calls_out)
        state = run.state
        for node in self.iters:
            if state.get(node.id) is None:
                run.try_node(node)  # arms it once its guards are known
            if state.get(node.id) == _ARMED and step_matches(node.target, self.step):
                self._instantiate(node)
        kept, self.kept = self.kept, {}
        for (path, kind), (call, value) in kept.items():  # this step's first call of the module
            starts = self.start_out if kind is SiteKind.OUTPUT else self.start_in
            starts[path] = call
            rel = (path, kind, -1)
            if run.site_nodes.get(rel):
                run.visit(rel, value)
        run.drain()

    def _instantiate(self, node: Node) -> None:
        run = self.run
        body = self.bodies[node.id]
        for n in body:
            run.state.pop(n.id, None)
            if n.op in _SITE_OPS:
                run.site_nodes[n.target.key].append(n.id)
        run.env[node.id] = self.step
        run.state[node.id] = _LIVE
        self.live[node.id] = body
        self.ran[node.id].append(self.step)
        run.pending = sorted(set(run.pending).union(n.id for n in body))

    def _end(self, module, args, output) -> None:
        run = self.run
        if run.adhoc:
            return
        run.drain()
        for iter_id, body in list(self.live.items()):
            missing = [n for n in body if run.state.get(n.id) not in (_DONE, _SKIPPED)]
            if missing:
                raise self._unfinished(missing[0])
            for n in body:
                if n.op in _SITE_OPS:
                    run.site_nodes[n.target.key].remove(n.id)
            del self.live[iter_id]
            done = last_step(run.nodes[iter_id].target) == self.step
            run.state[iter_id] = _DONE if done else _ARMED
        self.in_step = False
        run.drain()

    def finish(self) -> None:
        """After the forward: close open-ended blocks; a block whose steps never all came is an error."""
        run = self.run
        state = run.state
        for node in self.iters:
            s = state.get(node.id)
            if s == _SKIPPED:  # a false cond around the block: everything inside counts as skipped
                for n in walk_nodes(node.body[0].nodes):
                    state.setdefault(n.id, _SKIPPED)
                continue
            if s not in (_ARMED, _DONE, _LIVE):
                continue
            wanted = last_step(node.target)
            wanted = first_step(node.target) if wanted is None else wanted
            if wanted > self.step:
                raise MissedSiteError(
                    f"tracer.iter[{format_steps(node.target)}] asks for step {wanted}, but the model ran "
                    f"{self.step + 1} step(s)",
                    node.loc,
                    "generate more tokens (`max_new_tokens`; `min_new_tokens` keeps an early EOS from ending "
                    "generation), or select steps that exist",
                )
            state[node.id] = _DONE

    def _unfinished(self, node: Node) -> InterventionError:
        if node.op in _SITE_OPS:
            detail = f"the module did not run (that often) during step {self.step}"
            return missed_site_error(format_site(node), node.loc, detail)
        return InterventionError(
            f"{format_node(node)} was not computed during step {self.step}: a value it needs was not produced "
            "in that step",
            node.loc,
            "inside `tracer.all()` / `tracer.iter[...]`, use values produced in the same step or before the block",
        )


__all__ = ["Steps"]
