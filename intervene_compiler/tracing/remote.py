"""``remote=True`` on the front-end side: a block sent to the intervention service instead of run here.

When a remote block exits, :func:`run_remote` packs the recorded graph (with the model's edits) and the prepared
inputs into a request (``remote/jobs.py``, ``remote/wire.py``), submits it (``remote/client.py``), and, when
blocking, follows the job and keeps its saved values on the tracer, which binds them as after a local run. The
model's weights are never loaded here: the request names the model by the id it was created from.
``blocking=False`` returns at once; ``tracer.job`` is a :class:`RemoteJob` whose ``wait()`` binds the values.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SourceLoc
from ..ir import Graph


class RemoteJob:
    """A submitted block's job: ``id``, ``status``, ``wait()``, ``result()``."""

    def __init__(self, client: Any, job_id: str, tracer: Any, loc: SourceLoc | None):
        self.client = client
        self.id = job_id
        self._tracer = tracer
        self._loc = loc
        self._done = False

    @property
    def status(self) -> str:
        """The job's status now (``RECEIVED``, ``QUEUED``, ``RUNNING``, ``COMPLETED``, ``ERROR``)."""
        return str(self.client.status(self.id)["status"])

    def wait(self, timeout: float | None = None) -> RemoteJob:
        """Follow the job until it ends; then the block's saved values are bound (``h.value``), or its error is
        raised."""
        if not self._done:
            from ..remote.client import follow

            values, skipped = follow(self.client, self.id, self._loc, timeout)
            _bind(self._tracer, values, skipped)
            self._done = True
        return self

    def result(self, timeout: float | None = None) -> dict[int, Any]:
        """Wait, then the saved values by node id (the block's saved proxies hold them too: ``h.value``)."""
        self.wait(timeout)
        return dict(self._tracer._results or {})

    def __repr__(self) -> str:
        return f"<RemoteJob {self.id}>"


def _bind(tracer: Any, values: dict, skipped: dict) -> None:
    if getattr(tracer, "_tracers", None) is not None:  # a session: it and its traces hold the values
        tracer._results.update(values)
        if not tracer._finished:
            tracer._finish(None)
        return
    tracer._results = values
    tracer._skipped = skipped
    tracer._stop_loc = None
    tracer.output = None


def _model_id(model: Any, loc: SourceLoc | None) -> str:
    from ..remote.client import RemoteError

    source = getattr(getattr(model, "_checkpoint", None), "source", None)
    if source is None:
        raise RemoteError(
            "remote execution needs a model the service hosts, named by its id",
            loc,
            "load it with `LanguageModel('<hub id or folder the service serves>')`",
        )
    return str(source)


def run_remote_session(session: Any, graph: Graph, saved: set[int], blocking: bool) -> bool:
    """Submit a whole session as one job (its traces, loops, logs and training state run on the service);
    returns whether its values are bound (blocking)."""
    from ..ir.serialize import to_data
    from ..remote.wire import VERSION, encode

    loc = session._with_loc
    data, tensors = to_data(_portable(graph))
    slots = []
    for tracer in session._tracers:  # the options' tensors (if any) follow the graph's in the same list
        options = getattr(tracer, "_generate_kwargs", None)
        slots.append(
            {
                "model": _model_id(tracer.model, loc),
                "generate": None if options is None else encode(dict(options), tensors),
            }
        )
    document = {
        "version": VERSION,
        "model": slots[0]["model"] if slots else _model_id(session.model, loc),
        "kind": "session",
        "compile": session._remote.get("compile") is not False,
        "graph": data,
        "traces": slots,
        "saved": sorted(saved),
    }
    _submit(session, document, tensors, loc, blocking)
    return blocking


def _submit(owner: Any, document: dict, tensors: list, loc: SourceLoc | None, blocking: bool) -> None:
    """Send a request; ``owner.job`` is its job, followed to the end when ``blocking``."""
    from ..remote.client import RemoteClient
    from ..remote.wire import pack

    if any(t.is_meta for t in tensors):  # a module's parameter or buffer read on the client's meta model
        from ..errors import TracingError

        raise TracingError(
            "a remote block cannot use the model's parameters or buffers as values yet: the weights live on the "
            "service, and this client's copy of the model has none",
            loc,
            "compute with activations (module inputs and outputs) instead, or run the block locally",
        )
    client = RemoteClient()
    job_id = client.submit(pack(document, tensors), loc)
    owner.job = job = RemoteJob(client, job_id, owner, loc)
    if blocking:
        job.wait()


def _portable(graph: Graph) -> Graph:
    """The session graph with each value that cannot travel as data but can be iterated (a ``DataLoader`` given
    to ``session.iter``) replaced by the list of its items, taken here, once, as the local run would."""
    from ..errors import SerializationError
    from ..ir.serialize import value_to_data

    params = list(graph.params)
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor):
            continue
        try:
            value_to_data(p, [])
        except SerializationError:
            if hasattr(p, "__iter__") and not isinstance(p, (str, bytes, dict)):
                params[i] = list(p)
    return graph.replace(params=tuple(params))


def run_remote(tracer: Any, graph: Graph, prepared: list, kind: str, options: dict, blocking: bool) -> None:
    """Submit the block; wait for it when ``blocking`` (see the module docstring)."""
    from ..ir.serialize import to_data
    from ..remote.wire import VERSION, encode

    loc = tracer._with_loc
    source = _model_id(tracer.model, loc)
    data, tensors = to_data(graph)
    document = {
        "version": VERSION,
        "model": source,
        "kind": kind,
        # the service compiles each structure once for all its users, unless the caller said compile=False
        "compile": tracer._remote.get("compile") is not False,
        "graph": data,
        "inputs": encode([(tuple(a), dict(k)) for a, k in prepared], tensors),
        "generate": encode(dict(options), tensors),
    }
    _submit(tracer, document, tensors, loc, blocking)


__all__ = ["RemoteJob", "run_remote"]
