"""Running a model's jobs, alone or co-batched: several queued traces as ONE batched forward.

A worker (the embedded server's thread, a Ray replica) hands :func:`run_jobs` the requests it has taken from
its queue. Plain traces whose inputs concatenate without padding (the same token length, the same input
keywords) and whose graphs only touch their own invokes' rows are merged into one graph: each job's nodes
renumbered after the previous job's, its params appended, its invokes shifted below the previous job's rows.
Refs are renumbered inside each job only, so no node of one job can read or write another's values: a
cross-invoke reference stays inside its job. The merged graph runs once through ``NNsight.run_graph`` (the
passes, the structure caches and the compiled backend as for any trace), and each job gets back the saved
values of its own nodes.

What co-batches (:func:`batch_key`; anything else runs alone, as before):

- a ``trace`` request, or a ``generate`` request whose rows run the same steps in a batch as alone (the same
  options, greedy, one beam, ``min_new_tokens`` at least ``max_new_tokens``: no row can end early on its
  end-of-sequence token while the batch goes on), not a session; without LOG (its lines are the job's own),
  explicit STOP (it would end every job's forward), gradients, caches, ad hoc module calls, module parameters
  read as values (``module_tensor``) or attribute writes; iteration blocks only in generations;
- every site read or written names one of the job's invokes (a whole-batch site, e.g. a persistent edit's,
  would touch every job) and is a module's ``output`` or ``input``, never ``inputs`` (keyword arguments hold
  values that are not per row: cache positions, masks); the root module only through ``.logits`` (its output
  also holds the KV cache, which is the whole batch's);
- inputs that are keyword arguments only (``input_ids`` and tensors of its shape, plus plain values), so that
  jobs with the same longest token length concatenate exactly as each job's own invokes do when it runs alone:
  every position and shape a job sees is its solo run's.

A merged run that raises re-runs its jobs one at a time, so the job at fault gets its own located error and
the others complete. A job whose saved values hold anything but tensors and plain data (an object the batch
shares, never narrowed to rows) is re-run alone too. A merged structure compiles once it has been seen
``--compile-merged-after`` times (default 16; the server's compile setting allowing): until then it runs on the
eager reference backend, since compiling a combination of jobs that does not come back blocks the worker for
seconds for nothing.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..ir import Graph, InvokeRows, Node, Op, ParamRef, Ref, Site, SiteKind, map_args, structure_key, verify
from ..ir.nodes import walk_nodes
from .jobs import (
    Request,
    SavedValues,
    deadline_criteria,
    error_document,
    read_request,
    result_document,
    run_request,
)
from .wire import pack, unpack


class JobIn(NamedTuple):
    """A job a worker runs: its request message and its key's limits; ``log`` receives its LOG lines."""

    payload: bytes
    max_seconds: float
    max_result: int
    log: Callable[[str], None] | None = None


@dataclass
class Outcome:
    """``("COMPLETED", result message)`` or ``("ERROR", the error as JSON)``, the job's LOG lines, how many
    jobs the forward that gave this outcome carried (1: it ran alone), and that forward's number on its worker."""

    status: str
    data: bytes | str
    logs: list[str]
    carried: int = 1
    forward: int = 0


# A merged structure compiles once it has been seen this many times. Compiling blocks the worker (seconds on a CPU:
# every queued job waits), and a mix of jobs rarely comes back: in a bench of 16 clients patching random blocks,
# compiling a combination on its second occurrence stalled the queue for 8-30 s and never paid back.
COMPILE_MERGED_AFTER = 16


@dataclass
class BatchStats:
    """What co-batching did on one worker: jobs per forward, merged runs that failed, compiled merged runs."""

    forwards: dict[int, int] = field(default_factory=dict)  # jobs in a forward -> how many such forwards
    reruns: int = 0  # jobs re-run alone after their merged run failed (or held a shared value)
    compiled: int = 0  # merged runs on the compiled backend
    seen: OrderedDict = field(default_factory=OrderedDict)  # merged structure key -> times seen (bounded)
    compile_after: int = (
        COMPILE_MERGED_AFTER  # occurrences of a merged structure before it compiles (0: never)
    )

    def count(self, jobs: int) -> int:
        """Count a forward that carried ``jobs`` jobs; its number."""
        self.forwards[jobs] = self.forwards.get(jobs, 0) + 1
        return sum(self.forwards.values())

    def document(self) -> dict:
        return {
            "jobs_per_forward": {str(k): v for k, v in sorted(self.forwards.items())},
            "reruns_alone": self.reruns,
            "compiled_merged_runs": self.compiled,
        }


_SEEN_SIZE = 1024


def run_jobs(
    model: Any,
    jobs: list[JobIn],
    models: dict | None = None,
    compile: bool = True,
    stats: BatchStats | None = None,
    start: Callable[[list[int]], None] | None = None,
    done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``jobs`` on ``model``: those that can share a forward in merged runs, the rest one at a time, in the
    order the jobs came (a group runs where its first job came). One outcome per job, in order.

    ``start(indices)`` is called as a run begins, with the jobs it carries (a worker marks them RUNNING then, not
    before: a job still waiting behind another is QUEUED, and a server that stops is free to run it again);
    ``done(index, outcome)`` as each job's outcome is known (a worker stores it then, not after the whole batch)."""
    stats = stats if stats is not None else BatchStats()
    outcomes: list[Outcome | None] = [None] * len(jobs)
    requests: list[Request | None] = [None] * len(jobs)
    groups: dict[Any, list[int]] = {}

    def begin(members: list[int]) -> None:
        if start is not None:
            start(members)

    def end(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if done is not None:
            done(i, outcome)

    for i, job in enumerate(jobs):
        try:
            parsed = parse(job.payload, compile)
        except Exception as e:  # a stored request that no longer reads (checked at submission: not expected)
            begin([i])
            end(i, Outcome("ERROR", json.dumps(error_document(e)), []))
            continue
        requests[i] = parsed
        key = batch_key(parsed) if len(jobs) > 1 else None
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    for members in sorted(groups.values()):
        begin(members)
        if len(members) > 1:
            group = [r for r in (requests[i] for i in members) if r is not None]
            merged = _run_merged(model, group, [jobs[i] for i in members], stats)
            for i, outcome in zip(members, merged):
                end(i, outcome)
        else:
            (i,) = members
            request = requests[i]
            assert request is not None
            end(i, _alone(model, request, jobs[i], stats, models))
    return [o for o in outcomes if o is not None]


def parse(payload: bytes, compile: bool = True) -> Request:
    """The checked request of a stored message (a server without compiling runs ``compile=True`` requests
    eagerly: the values are the same)."""
    document, tensors = unpack(payload)
    request = read_request(document, tensors)
    if request.compile is True and not compile:
        request.compile = False
    return request


def run_alone(model: Any, request: Request, job: JobIn, models: dict | None = None) -> Outcome:
    """Run one job's request on ``model`` in its own forward(s); LOG lines go to ``job.log`` as they come."""
    from ..runtime.values import LOG_SINK

    logs: list[str] = []

    def sink(text: str) -> None:
        logs.append(text)
        if job.log is not None:
            job.log(text)

    LOG_SINK.sink = sink
    try:
        result = run_request(model, request, time.monotonic() + job.max_seconds, models)
        return _result(result, job.max_result, logs)
    except Exception as e:
        return Outcome("ERROR", json.dumps(error_document(e)), logs)
    finally:
        LOG_SINK.sink = None


def _result(result: Any, max_result: int, logs: list[str], carried: int = 1) -> Outcome:
    document, tensors = result_document(result)
    message = pack(document, tensors)
    if len(message) > max_result:
        error = {"type": None, "base": "ValueError", "loc": None, "hint": None}
        error["message"] = f"the result has {len(message)} bytes, more than this key's {max_result}"
        return Outcome("ERROR", json.dumps(error), logs, carried)
    return Outcome("COMPLETED", message, logs, carried)


# -- which jobs may share a forward --------------------------------------------------------------------------
_ALONE_OPS = frozenset(
    {Op.LOG, Op.STOP, Op.GRAD, Op.SET_GRAD, Op.BACKWARD, Op.CACHE, Op.MODULE, Op.SETATTR}
    | {Op.TRACE, Op.LOOP, Op.EXIT}
)
_SITE_OPS = frozenset({Op.SITE, Op.SET, Op.UPDATE})
_ROWS_KINDS = frozenset({SiteKind.OUTPUT, SiteKind.INPUT})


def batch_key(request: Request) -> Any:
    """What a job must share with others to run in one forward with them (None: it runs alone): the model's
    input layout (keyword names, the longest token length, dtypes, plain values), how it compiles, and a
    generation's options."""
    if request.kind not in ("trace", "generate") or not request.inputs:
        return None
    generate = None
    if request.kind == "generate":
        generate = _generation_key(request.generate)
        if generate is None:
            return None
    if not _own_rows_only(request.graph, request.kind == "generate"):
        return None
    length = 0
    names: tuple[str, ...] | None = None
    layout: list[tuple] = []
    for args, kwargs in request.inputs:
        ids = kwargs.get("input_ids")
        if args or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        if names is None:
            names = tuple(sorted(kwargs))
        elif tuple(sorted(kwargs)) != names:
            return None
        length = max(length, ids.shape[1])
        for name in names:
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                if value.shape != ids.shape:  # only tensors padded along with the ids
                    return None
                layout.append((name, value.dtype, value.device))
            elif value is None or isinstance(value, (bool, int, float, str)):
                layout.append((name, type(value), value))
            else:
                return None
    return (names, length, frozenset(layout), request.compile, generate)


def _generation_key(options: dict) -> Any:
    """Generations share a batch when every row runs the same steps as alone: greedy, one beam, and no row can
    stop early (an end-of-sequence token would end a row's run alone, but not the batch's): ``min_new_tokens``
    at least ``max_new_tokens``. Their options, or None."""
    if options.get("do_sample") or options.get("num_beams", 1) != 1:
        return None
    most = options.get("max_new_tokens")
    if not isinstance(most, int) or options.get("min_new_tokens", 0) < most or "max_length" in options:
        return None
    return frozenset(options.items())


def _own_rows_only(graph: Graph, generating: bool) -> bool:
    """Does every node of ``graph`` stay inside the job's own invokes' rows (see the module docstring)?"""
    invokes = len(graph.invokes)
    if graph.kind != "trace" or invokes == 0:
        return False
    users: dict[int, list[Node]] = {}
    for n in walk_nodes(graph.nodes):
        for d in n.refs:
            users.setdefault(d, []).append(n)
    for n in walk_nodes(graph.nodes):
        op = n.op
        if op in _ALONE_OPS or (op is Op.ITER and not generating) or (n.body and op is not Op.ITER):
            return False
        if n.invoke is not None and not 0 <= n.invoke < invokes:
            return False
        if op is Op.CALL and getattr(n.target, "__name__", None) == "module_tensor":
            return False
        if op in _SITE_OPS:
            site = n.target
            if not isinstance(site, Site) or site.invoke is None or not 0 <= site.invoke < invokes:
                return False
            if site.kind not in _ROWS_KINDS:
                return False
            if site.path == "":
                if op is not Op.SITE or site.kind is not SiteKind.OUTPUT:
                    return False
                if not all(u.op is Op.GETATTR and u.target == "logits" for u in users.get(n.id, [])):
                    return False
    return True


# -- merging and splitting ---------------------------------------------------------------------------------------
@dataclass
class _Span:
    """Where one job sits in a merged graph: its ids (nested graphs' too) moved by ``offset``, from ``first``
    to ``last``."""

    offset: int
    first: int
    last: int


def merge(graphs: list[Graph], inputs: list[list[tuple[tuple, dict]]]) -> tuple[Graph, list, list[_Span]]:
    """One graph running every job's nodes on its own invokes, the invokes' inputs in the same order, and each
    job's id span."""
    nodes: list[Node] = []
    params: list[Any] = []
    invokes: list[InvokeRows] = []
    spans: list[_Span] = []
    next_id = 0
    rows = 0
    for graph in graphs:
        ids = [n.id for n in walk_nodes(graph.nodes)]
        if not ids:
            continue
        offset = next_id - min(ids)
        nodes.extend(_moved(graph.nodes, offset, len(params), len(invokes)))
        spans.append(_Span(offset, next_id, max(ids) + offset))
        next_id = max(ids) + offset + 1
        params.extend(graph.params)
        for r in graph.invokes:
            invokes.append(InvokeRows(r.start + rows, r.stop + rows))
        rows += graph.invokes[-1].stop
    merged = Graph(
        tuple(nodes),
        tuple(params),
        tuple(invokes),
        "trace",
        any(g.needs_output for g in graphs),
    )
    verify(merged, where="co-batching")
    return merged, [pair for job in inputs for pair in job], spans


def _moved(nodes: tuple[Node, ...], offset: int, shift: int, base: int) -> list[Node]:
    """``nodes`` (and their nested graphs) with ids moved by ``offset``, params by ``shift``, invokes by
    ``base``."""

    def remap(leaf: Any) -> Any:
        return Ref(leaf.id + offset) if type(leaf) is Ref else ParamRef(leaf.index + shift)

    out = []
    for n in nodes:
        target = n.target
        if isinstance(target, Site):
            target = Site(target.path, target.kind, target.call, base + (target.invoke or 0))
        body = tuple(g.replace(nodes=tuple(_moved(g.nodes, offset, shift, base))) for g in n.body)
        out.append(
            Node(
                n.id + offset,
                n.op,
                target,
                map_args(n.args, remap),
                tuple((k, map_args(v, remap)) for k, v in n.kwargs),
                tuple((g + offset, b) for g, b in n.guards),
                tuple(a + offset for a in n.after),
                None if n.invoke is None else base + n.invoke,
                body,
                n.loc,
            )
        )
    return out


def _run_merged(model: Any, requests: list[Any], jobs: list[JobIn], stats: BatchStats) -> list[Outcome]:
    graph, inputs, spans = merge([r.graph for r in requests], [r.inputs for r in requests])
    rows = graph.invokes[-1].stop
    length = inputs[0][1]["input_ids"].shape[1]
    key = (structure_key(graph), rows, length)
    seen = stats.seen.get(key, 0) + 1
    stats.seen[key] = seen
    stats.seen.move_to_end(key)
    if len(stats.seen) > _SEEN_SIZE:
        stats.seen.popitem(last=False)
    compile = requests[0].compile is True and 0 < stats.compile_after <= seen
    generate = None
    if requests[0].kind == "generate":
        generate = dict(requests[0].generate)  # the same options for every job of the group (batch_key)
        deadline = time.monotonic() + min(j.max_seconds for j in jobs)  # past it, each job runs alone
        generate["stopping_criteria"] = deadline_criteria(deadline)
    try:
        result = model.run_graph(graph, inputs, compile=compile, generate=generate)
    except Exception:  # someone's error: every job runs alone, so each gets its own outcome
        stats.reruns += len(jobs)
        return [_alone(model, r, j, stats) for r, j in zip(requests, jobs)]
    forward = stats.count(len(jobs))
    stats.compiled += compile
    out = []
    for request, job, span in zip(requests, jobs, spans):
        values = {nid - span.offset: v for nid, v in result.values.items() if span.first <= nid <= span.last}
        skipped = {
            nid - span.offset: loc for nid, loc in result.skipped.items() if span.first <= nid <= span.last
        }
        if not all(_plain(v) for v in values.values()):
            stats.reruns += 1
            out.append(_alone(model, request, job, stats))
            continue
        outcome = _result(SavedValues(values, skipped), job.max_result, [], len(jobs))
        outcome.forward = forward
        out.append(outcome)
    return out


def _alone(
    model: Any, request: Request, job: JobIn, stats: BatchStats, models: dict | None = None
) -> Outcome:
    """Run one job in its own forward, counted as one."""
    outcome = run_alone(model, request, job, models)
    outcome.forward = stats.count(1)
    return outcome


def _plain(value: Any) -> bool:
    """Tensors and plain data only: nothing a merged batch shares whole (a KV cache object, a model output)."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, complex, str, torch.dtype)):
        return True
    t = type(value)
    if t is tuple or t is list or t is torch.Size:
        return all(_plain(v) for v in value)
    if t is dict:
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


__all__ = ["BatchStats", "JobIn", "Outcome", "batch_key", "merge", "parse", "run_alone", "run_jobs"]
