"""The recorded schedule: at which event each node of a graph runs, as the eager interpreter decides it.

``record_schedule`` runs the eager interpreter once on fake tensors (a :class:`Recorder`, an ``Interpreter``
subclass) and notes at which event (``BEFORE`` the forward, a module's input or output key, ``AFTER`` it) each
node ran: the schedule is exactly what the reference backend does for this structure, so the compiled
:class:`~.program.Program` replaying it cannot disagree with eager mode on when a node runs. A module of its own:
recording is a one-time step per compiled key, with its own subclass of the interpreter, separate from the replay.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ...ir import Graph, Node, Op
from ...runtime import Target, fake_copy, resolve, to_fake
from ..eager import Interpreter

BEFORE, AFTER = "before", "after"  # the events before and after the forward (module events are site keys)


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


class Recorder(Interpreter):
    """The eager interpreter, noting the event each node runs at (and printing nothing).

    A ``tracer.cond`` on a tensor records both branches (:data:`BOTH`); one on a Python value keeps its value,
    so its false branch is left out of the schedule (those nodes are skipped, as in eager mode).
    """

    event_schedule = False  # it overrides visit, run_node and evaluate, which the fast visit would bypass

    def __init__(self, target: Target, graph: Graph):
        super().__init__(target, graph)
        self.order: list[tuple[Any, int]] = []
        self.started = False

    def visit(self, key, value):
        self.started = True
        return super().visit(key, value)

    def run_node(self, node: Node) -> None:
        event = next(reversed(self.active)) if self.active else (AFTER if self.started else BEFORE)
        self.order.append((event, node.id))
        super().run_node(node)

    def evaluate(self, node: Node) -> Any:
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
        return super().evaluate(node)


def record_schedule(target: Target, graph: Graph, args: tuple, kwargs: dict) -> Recorder:
    """Run ``graph`` eagerly on fake tensors; the recorder holds the (event, node id) order and fake values."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # an op that fails on fakes (the user's shape mistake, reported by the eager run) would also be logged, with
    # a traceback, by torch's fake tensor module: the eager run's error is the one the user should see
    log = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, log.disabled = log.disabled, True
    # the model's code sees ``torch.compiler.is_compiling()`` as Dynamo will show it, so the fake run takes the
    # path the compiled program takes: transformers' MoE experts pick ``F.grouped_mm`` when not compiling, whose
    # fake kernel accepts only bfloat16 (the CPU kernel takes float32), and a custom op with a fake kernel under
    # Dynamo
    compiling, torch.compiler._is_compiling_flag = torch.compiler._is_compiling_flag, True
    try:
        with mode, torch.no_grad():
            fake_graph = graph.replace(params=tuple(to_fake(p, mode) for p in graph.params))
            recorder = Recorder(target, fake_graph)
            # copies: a KV cache object passed in (past_key_values=) is updated by the forward, which must not
            # write fake tensors into the user's object
            recorder.execute(fake_copy(args, mode), fake_copy(kwargs, mode))
    finally:
        log.disabled = disabled
        torch.compiler._is_compiling_flag = compiling
    return recorder


def dynamic_conds_of(nodes, recorder: Recorder) -> tuple[int, ...]:
    """The COND nodes the recorded schedule took both branches of: conditions on tensors."""
    return tuple(n.id for n in nodes if n.op is Op.COND and recorder.env.get(n.id) is BOTH)


__all__ = ["AFTER", "BEFORE", "BOTH", "Recorder", "dynamic_conds_of", "record_schedule"]
