"""The reads-only fast path: a graph of site reads, saves of them and at most one stop runs without the scheduler.

The common ``model.layer.output.save()`` trace (truncated by ``passes/early_stop.py``) needs none of the
interpreter's bookkeeping: its plan (``plan.Reads``) lists, per event, the reads and their saves, and
``run_reads`` installs hooks that store them and raise the stop at the last event, where the general scheduler
would run it. Same values, errors and hooks left behind (none) as the interpreter; a hot path (per-event cost).

Also the two pieces both runners share: ``site_read`` (the value a site read gives from its event's value) and
``missed_error`` (the error of a read whose event never came).
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import execution_error, missed_site_error
from ...ir import Graph, Node, Site, SiteKind, format_node, format_site
from ...runtime import RunResult, Target, narrow
from .hooks import hook_modules
from .plan import Reads
from .states import EarlyStop

_INPUT, _INPUTS, _OUTPUT = SiteKind.INPUT, SiteKind.INPUTS, SiteKind.OUTPUT
_is_compiling = torch.compiler.is_compiling


def run_reads(target: Target, graph: Graph, reads: Reads, args: tuple, kwargs: dict) -> RunResult:
    """Run a graph of site reads and saves (``Reads``): hooks that store each read and its saves, the forward,
    and the stop. Same values, errors and hooks left behind (none) as the general ``Interpreter``."""
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
                read = site_read(node.target, value, invokes, batch)
            except Exception as e:
                raise execution_error(e, node.loc, format_node(node)) from e
            env[node.id] = read
            for sid in saves:
                env[sid] = read
        left[0] -= 1
        if stop is not None and not left[0] and not _is_compiling():  # see Interpreter.evaluate's STOP
            raise EarlyStop(stop, env)

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
        hook_modules(target.module, reads.hooks, pre_hook, post_hook, handles, wrap=True)
        try:
            output = target.forward(*args, **kwargs)
        except EarlyStop as e:
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
                raise missed_error(node, calls.get(node.target.path, 0))
    values = {nid: env[nid] for nid in reads.saved}
    stop_loc = stopped.loc if stopped is not None and stopped.target == "user" else None
    return RunResult(values, output, stop_loc)


def site_read(site: Site, value: Any, invokes: tuple, batch: int) -> Any:
    """What a site read gives from its event's value: the first input of ``(args, kwargs)`` for ``.input``,
    narrowed to the site's invoke rows (the fast paths' ``Interpreter.read_site``, which also notes row views)."""
    if site.kind is _INPUT:
        args, kwargs = value
        value = args[0] if args else next(iter(kwargs.values()), None)
    if site.invoke is not None:
        rows = invokes[site.invoke]
        value = narrow(value, rows.start, rows.stop, batch)
    return value


def missed_error(node: Node, ran: int):
    """The error of a site read whose event never came (the module ran ``ran`` times)."""
    detail = f"the module ran {ran} time(s) in this forward pass" if ran else "the module never ran"
    return missed_site_error(format_site(node), node.loc, detail)


__all__ = ["missed_error", "run_reads", "site_read"]
