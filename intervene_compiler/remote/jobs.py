"""A remote job's request, read and checked; running it on a loaded model; its result and error as data.

The request document (``wire.py``)::

    {"version": 1, "model": "<id>", "kind": "trace" | "generate", "compile": bool,
     "graph": <ir.serialize data>, "inputs": <encoded list of (args, kwargs), one per invoke, prepared>,
     "generate": <encoded dict of generate() keyword arguments>}

:func:`read_request` checks everything before anything touches a model: the graph's callables resolve through the
allowlist only (``allowlist.py``), the verifier runs, sizes and nesting are bounded, ``generate()`` takes only the
listed keyword arguments with plain values. Every failure is a :class:`BadRequest` (the server answers 400 with
its message).
"""

from __future__ import annotations

import builtins
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import errors
from ..errors import InterventionError, SourceLoc
from ..ir import Graph, Op
from ..ir.nodes import walk_nodes
from ..ir.serialize import from_data
from .allowlist import UnsafeRequest, check_graph, safe_target
from .wire import WireError, decode, encode

MAX_NODES = 20_000
MAX_DEPTH = 16  # nested graphs (iteration blocks, sessions' loops)
# generate() keyword arguments a request may pass, and the plain types each may have
GENERATE_KWARGS = {
    "max_new_tokens": int,
    "min_new_tokens": int,
    "max_length": int,
    "do_sample": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "num_beams": int,
    "repetition_penalty": float,
    "no_repeat_ngram_size": int,
    "pad_token_id": int,
    "eos_token_id": int,
    "use_cache": bool,
    "cache_implementation": str,
}


class BadRequest(ValueError):
    """A request the server refuses before running it (400)."""


@dataclass
class SessionSlot:
    """One trace of a session request: the model it runs on, and its ``generate()`` options if it generates."""

    model: str
    generate: dict | None = None


@dataclass
class Request:
    model: str
    kind: str
    graph: Graph
    inputs: list[tuple[tuple, dict]]
    compile: bool = True
    generate: dict = field(default_factory=dict)
    slots: list[SessionSlot] = field(default_factory=list)  # a session's traces
    saved: set[int] = field(default_factory=set)  # a session's saved ids

    @property
    def models(self) -> set[str]:
        return {self.model, *(s.model for s in self.slots)}


def read_request(document: dict, tensors: list[torch.Tensor]) -> Request:
    """The checked request of a document (raises :class:`BadRequest`)."""
    try:
        return _read(document, tensors)
    except BadRequest:
        raise
    except (UnsafeRequest, WireError, InterventionError) as e:
        raise BadRequest(str(e)) from None
    except RecursionError:
        raise BadRequest("the request nests too deeply") from None
    except Exception as e:  # any other malformation: wrong types, arities, missing fields
        raise BadRequest(f"malformed request: {type(e).__name__}: {e}") from None


def _read(document: dict, tensors: list[torch.Tensor]) -> Request:
    model = document.get("model")
    kind = document.get("kind")
    if not isinstance(model, str) or not model:
        raise BadRequest("the request names no model")
    if kind not in ("trace", "generate", "session"):
        raise BadRequest(f"unknown request kind {kind!r}: 'trace', 'generate' or 'session'")
    data = document.get("graph")
    if not isinstance(data, dict):
        raise BadRequest("the request has no graph")
    _check_size(data)
    graph = from_data(data, tensors, resolve=safe_target)
    check_graph(graph)
    compile = document.get("compile", True)
    if not isinstance(compile, bool):
        raise BadRequest("`compile` must be true or false")
    if kind == "session":
        return _read_session(document, tensors, model, graph, compile)
    if graph.kind == "session" or any(n.op in _SESSION_OPS for n in walk_nodes(graph.nodes)):
        raise BadRequest("a trace request holds no session nodes")
    inputs = decode(document.get("inputs"), tensors)
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the request has no inputs (one (args, kwargs) per invoke)")
    pairs = []
    for item in inputs:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], tuple)
            and isinstance(item[1], dict)
        ):
            raise BadRequest("each input is an (args, kwargs) pair")
        if not all(isinstance(k, str) for k in item[1]):
            raise BadRequest("input keyword names are strings")
        pairs.append((item[0], item[1]))
    if len(pairs) != len(graph.invokes):
        raise BadRequest(f"the graph has {len(graph.invokes)} invokes but the request {len(pairs)} inputs")
    options = _generate_options(decode(document.get("generate", {"dict": []}), tensors))
    return Request(model, kind, graph, pairs, compile, options)


_SESSION_OPS = frozenset({Op.TRACE, Op.LOOP, Op.EXIT})


def _generate_options(options: Any) -> dict:
    if not isinstance(options, dict):
        raise BadRequest("generate options must be a mapping")
    for k, v in options.items():
        kind_of = GENERATE_KWARGS.get(k)
        if kind_of is None:
            raise BadRequest(f"generate() option {k!r} is not accepted remotely")
        if not isinstance(v, kind_of) or (kind_of is int and isinstance(v, bool)):
            raise BadRequest(f"generate() option {k!r} must be a {kind_of.__name__}")
    return options


def _read_session(document: dict, tensors: list, model: str, graph: Graph, compile: bool) -> Request:
    """A session request: its graph (TRACE nodes name slots), one slot per trace, the ids it saves."""
    if graph.kind != "session":
        raise BadRequest("a session request's graph is a session graph")
    slots_data = document.get("traces")
    if not isinstance(slots_data, list):
        raise BadRequest("a session request lists its traces (none when it runs no model)")
    slots = []
    for item in slots_data:
        if not isinstance(item, dict) or not isinstance(item.get("model"), str):
            raise BadRequest("each trace of a session names its model")
        gen = item.get("generate")
        slots.append(
            SessionSlot(item["model"], None if gen is None else _generate_options(decode(gen, tensors)))
        )
    for n in walk_nodes(graph.nodes):
        if n.op is Op.TRACE and not (type(n.target) is int and 0 <= n.target < len(slots)):
            raise BadRequest(f"a trace node names slot {n.target!r}, but the session has {len(slots)} traces")
    saved = document.get("saved")
    if not isinstance(saved, list) or not all(type(i) is int for i in saved):
        raise BadRequest("a session request lists the ids it saves")
    return Request(model, "session", graph, [], compile, {}, slots, set(saved))


def _check_size(data: dict) -> None:
    """Bound the node count and nesting before building anything from the data."""
    count = 0
    stack = [(data, 0)]
    while stack:
        graph, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"the graph nests more than {MAX_DEPTH} levels")
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
            raise BadRequest("a graph is an object with a list of nodes")
        count += len(graph["nodes"])
        if count > MAX_NODES:
            raise BadRequest(f"the graph has more than {MAX_NODES} nodes")
        for node in graph["nodes"]:
            if not isinstance(node, dict):
                raise BadRequest("a node is an object")
            for body in node.get("body", ()) or ():
                stack.append((body, depth + 1))


# -- running ---------------------------------------------------------------------------------------------------
class JobTimeout(RuntimeError):
    """A job ran past its key's time limit."""


def run_request(model: Any, request: Request, deadline: float | None = None, models: Any = None) -> Any:
    """Run a checked request on a loaded ``LanguageModel`` (``NNsight.run_graph``); a generate request stops with
    :class:`JobTimeout` at the first step past ``deadline`` (``time.monotonic()``). A session runs its traces on
    ``models[name]`` (``backends/session.run_session``), each trace checking the deadline first."""
    if request.kind == "session":
        return _run_session(request, models or {request.model: model}, deadline)
    generate = None
    if request.kind == "generate":
        generate = dict(request.generate)
        if deadline is not None:
            generate["stopping_criteria"] = deadline_criteria(deadline)
    return model.run_graph(request.graph, request.inputs, compile=request.compile, generate=generate)


@dataclass
class SavedValues:
    """Saved values by node id, and the saves a false ``tracer.cond`` skipped (a run's result, as
    :func:`result_document` reads it): a session's, or one job's share of a co-batched run."""

    values: dict
    skipped: dict = field(default_factory=dict)


def _run_session(request: Request, models: dict, deadline: float | None) -> SavedValues:
    from ..execute import run_session

    missing = sorted({slot.model for slot in request.slots} - set(models))
    if missing:
        raise BadRequest(f"this server does not serve {', '.join(missing)}")
    traces = [_Slot(models[slot.model], slot, request.compile, deadline) for slot in request.slots]
    values = run_session(request.graph, traces, request.saved)
    return SavedValues(values)


class _Slot:
    """A session trace on the server (``backends.session.SessionTrace``): inputs prepared by the model, the
    bound graph run by ``run_graph``."""

    loc: SourceLoc | None = None  # the trace's line is the client's: errors name their own lines

    def __init__(self, model: Any, slot: SessionSlot, compile: bool, deadline: float | None):
        self.model = model
        self.slot = slot
        self.compile = compile
        self.deadline = deadline

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, int]:
        return self.model.prepare_inputs(*args, **kwargs)

    def run(self, graph: Graph, prepared: list[tuple[tuple, dict]]) -> dict[int, Any]:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimeout("the job ran past its time limit")
        generate = None if self.slot.generate is None else dict(self.slot.generate)
        if generate is not None and self.deadline is not None:
            generate["stopping_criteria"] = deadline_criteria(self.deadline)
        return dict(self.model.run_graph(graph, prepared, compile=self.compile, generate=generate).values)


def deadline_criteria(deadline: float) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if time.monotonic() > deadline:
                raise JobTimeout("the job ran past its time limit")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Deadline()])


def result_document(result: Any) -> tuple[dict, list[torch.Tensor]]:
    """A run's saved values (and the saves a false ``tracer.cond`` skipped) as a result document."""
    tensors: list[torch.Tensor] = []
    values = [[nid, encode(v, tensors)] for nid, v in result.values.items()]
    skipped = [[nid, _loc_data(loc)] for nid, loc in result.skipped.items()]
    return {"version": 1, "values": values, "skipped": skipped}, tensors


def read_result(
    document: dict, tensors: list[torch.Tensor]
) -> tuple[dict[int, Any], dict[int, SourceLoc | None]]:
    values = {int(nid): decode(v, tensors) for nid, v in document.get("values", [])}
    skipped = {int(nid): _loc_from(loc) for nid, loc in document.get("skipped", [])}
    return values, skipped


# -- errors as data ----------------------------------------------------------------------------------------------
def error_document(error: BaseException) -> dict:
    """An error as data: our error class (or the builtin exception type it derives from), message, line, fix."""
    if isinstance(error, InterventionError):
        cls = type(error)
        known = getattr(errors, cls.__name__, None) is cls
        return {
            "type": cls.__name__ if known else None,
            "base": _builtin_base(cls),
            "message": error.message,
            "loc": _loc_data(error.loc),
            "hint": error.hint,
        }
    if isinstance(error, JobTimeout):
        return {"type": None, "base": "TimeoutError", "message": str(error), "loc": None, "hint": None}
    return {
        "type": None,
        "base": _builtin_base(type(error)),
        "message": f"the server failed running the job: {type(error).__name__}: {error}",
        "loc": None,
        "hint": None,
    }


def error_from(document: dict, loc: SourceLoc | None = None) -> BaseException:
    """The exception an error document describes, as a local run raises it; ``loc`` (the user's ``with``
    line) for an error that names no line (the model's own)."""
    message = str(document.get("message", "the job failed"))
    hint = document.get("hint")
    at = _loc_from(document.get("loc")) or loc
    name = document.get("type")
    cls = getattr(errors, name, None) if isinstance(name, str) and name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, InterventionError):
        return cls(message, at, hint)
    base = document.get("base")
    base_cls = getattr(builtins, base, None) if isinstance(base, str) and base.isidentifier() else None
    if not (isinstance(base_cls, type) and issubclass(base_cls, Exception)):
        base_cls = RuntimeError
    try:
        original = base_cls(message)
    except Exception:
        original = RuntimeError(message)
    return errors.wrapped_error(original, message, at, hint)


def _builtin_base(cls: type) -> str:
    for b in cls.__mro__:
        if b.__module__ == "builtins" and b not in (Exception, BaseException, object):
            return b.__name__
    return "RuntimeError"


def _loc_data(loc: SourceLoc | None) -> list | None:
    return None if loc is None else [loc.filename, loc.lineno, loc.function]


def _loc_from(data: Any) -> SourceLoc | None:
    if (
        isinstance(data, list)
        and len(data) == 3
        and isinstance(data[0], str)
        and isinstance(data[1], int)
        and isinstance(data[2], str)
    ):
        return SourceLoc(data[0], data[1], data[2])
    return None


__all__ = [
    "BadRequest",
    "JobTimeout",
    "deadline_criteria",
    "Request",
    "SavedValues",
    "error_document",
    "error_from",
    "read_request",
    "read_result",
    "result_document",
    "run_request",
]
