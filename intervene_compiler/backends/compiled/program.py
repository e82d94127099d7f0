"""A compiled program: the eager semantics as a static schedule, replayed inside one Dynamo-traced forward.

``record_schedule`` runs the eager runner once on fake tensors and notes at which event (before the forward, a
module's input or output, after the forward) each node ran: the schedule is exactly what the reference backend
does for this structure. :class:`Program` replays it: persistent dispatcher hooks (installed once per model,
inert outside a compiled call) hand each module event to the program, which runs that event's nodes in order.
Dynamo inlines the hooks, so model and interventions become one FX graph; STOP raises inside it and is caught in
the entry, so nothing after the last needed module is traced or compiled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ...ir import Graph, Node, Op, SiteKind
from ..eager.runner import _EarlyStop, _Run

_BEFORE, _AFTER = "before", "after"


class _Recorder(_Run):
    """The eager runner, noting the event each node runs at (and printing nothing)."""

    def __init__(self, model, graph: Graph):
        super().__init__(model, graph)
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
        return super()._exec(node)


def record_schedule(model, graph: Graph, args: tuple, kwargs: dict) -> list[tuple[Any, int]]:
    """The (event, node id) order in which the eager backend runs ``graph``, found on fake tensors."""
    from ...tracing.fakes import _to_fake

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        fake_graph = graph.replace(params=tuple(_to_fake(p, mode) for p in graph.params))
        recorder = _Recorder(model, fake_graph)
        recorder.execute(_to_fake(args, mode), _to_fake(kwargs, mode))
    return recorder.order


class Program(_Run):
    """Runs a graph by its recorded schedule; called by the dispatcher hooks during a compiled forward."""

    def __init__(self, model, graph: Graph, order: list[tuple[Any, int]]):
        super().__init__(model, graph)
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
        self.saved_ids = tuple(
            n.args[0].id for n in graph.nodes if n.op is Op.SAVE and type(n.args[0]).__name__ == "Ref"
        )
        # events whose value is replaced (a SET): only these hooks return a new value; known statically
        self.replaces = {key for key, nodes in self.events.items() if any(n.op is Op.SET for n in nodes)}
        ran = {nid for _, nid in order}
        self.saved_ids = tuple(i for i in self.saved_ids if i in ran)

    def run(self, params: tuple, args: tuple, kwargs: dict) -> tuple[tuple, Any]:
        """One call: the body of the compiled entry function."""
        self.params = params
        self.env = {}
        self.current = {}
        self.calls_in = {}
        self.calls_out = {}
        self.adhoc = 0
        for node in self.before:
            self.env[node.id] = self._exec(node)
        output = None
        self.in_forward = True
        try:
            output = self.model._forward(*args, **kwargs)
        except _EarlyStop:
            output = None
        self.in_forward = False
        for node in self.after:
            self.env[node.id] = self._exec(node)
        saved = tuple(self.env[i] for i in self.saved_ids)
        self.env = None
        return saved, output if self.graph.needs_output else None

    def on_event(self, key: tuple, value: Any) -> Any:
        nodes = self.events.get(key)
        if nodes is None:
            return value
        self.current[key] = value
        for node in nodes:
            self.env[node.id] = self._exec(node)
        return self.current.pop(key)


class Dispatcher:
    """Hooks on every module of a model that forward module events to the program of the running entry.

    Installed once and kept (so Dynamo's guards on the hook dicts stay valid); inert when no program runs, so
    outside a compiled call the model computes exactly what it computed before.
    """

    def __init__(self, module: torch.nn.Module):
        self.program: Program | None = None
        self.handles = []
        for path, mod in module.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post(path), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, path: str):
        def hook(mod, args, kwargs):
            program = self.program
            if program is None or program.adhoc:
                return None
            call = program.calls_in.get(path, 0)
            program.calls_in[path] = call + 1
            key = (path, SiteKind.INPUTS, call)
            if key not in program.events:
                return None
            new = program.on_event(key, (args, kwargs))
            if key not in program.replaces:
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
            if key not in program.events:
                return None
            new = program.on_event(key, output)
            return new if key in program.replaces else None

        return hook
