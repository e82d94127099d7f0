"""The intervention service: FastAPI + uvicorn in one process, one worker thread per model.

``intervene-serve --model ID_OR_FOLDER [--model ...] --host 127.0.0.1 --port N --data-dir DIR --api-keys FILE``
(or ``python -m intervene_compiler.remote``). The HTTP front accepts, checks and stores jobs; each model's
:class:`ModelWorker` (its own thread, its model loaded once, the compiled backend on by default) runs that model's
jobs in order: it takes the jobs queued within ``--batch-window-ms`` of the first, up to ``--max-batch``, and runs
those that can share a forward as one batched forward (co-batching, ``batching.py``), the others one at a time.
A job is a request (``jobs.py``): the IR as data, never code.

Routes (the OpenAPI schema is at ``/openapi.json``):

- ``POST /v1/jobs``: the request (a safetensors message, ``application/octet-stream``), key in ``X-API-Key`` (or
  ``ndif-api-key``). 401 no or unknown key, 403 a model the key may not use, 404 a model not served, 413 over the
  key's request size, 429 over its rate, 400 anything malformed or outside the allowlist (message says what).
  200: ``{"id", "status"}``.
- ``GET /v1/jobs/{id}``: status, events (``RECEIVED``, ``QUEUED``, ``RUNNING``, ``LOG``, ``COMPLETED``,
  ``ERROR``), the error as data.
- ``GET /v1/jobs/{id}/result``: the result message of a COMPLETED job (409 before).
- ``WS /v1/jobs/{id}/events``: the same events, pushed as they happen, until the job ends.
- ``GET /v1/models``, ``GET /v1/stats`` (compiles, cache hits, fallbacks, queue depth, jobs by status, jobs per
  forward).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from .batching import COMPILE_MERGED_AFTER, BatchStats, JobIn, run_jobs
from .jobs import BadRequest, error_document, read_request
from .keys import ApiKey, KeyRing, add_key
from .store import TERMINAL, JobStore
from .wire import WireError, unpack

_STOP = object()


class ModelWorker(threading.Thread):
    """Runs one model's jobs, in order, on its own thread (the model is loaded once, by this thread)."""

    def __init__(
        self,
        name: str,
        source: str,
        store: JobStore,
        compile: bool = True,
        load: dict | None = None,
        peers: dict | None = None,
        max_batch: int = 1,
        window: float = 0.0,
        compile_after: int = COMPILE_MERGED_AFTER,
    ):
        super().__init__(name=f"worker:{name}", daemon=True)
        self.peers = peers if peers is not None else {}  # model name -> worker: a session's other models
        self.model_name = name
        self.source = source
        self.store = store
        self.compile = compile
        self.load = load or {}
        self.jobs: queue.Queue = queue.Queue()
        self.model: Any = None
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.running: str | None = None
        self.limits: dict[str, tuple[int, float]] = {}  # job id -> (max result bytes, max seconds)
        self.max_batch = max_batch  # jobs one forward may carry (co-batching: batching.py)
        self.window = window  # seconds to wait for more jobs after the first
        self.batching = BatchStats(compile_after=compile_after)

    def submit(self, job_id: str, max_result_bytes: int, max_seconds: float) -> None:
        self.limits[job_id] = (max_result_bytes, max_seconds)
        self.store.set_status(job_id, "QUEUED")
        self.jobs.put(job_id)

    def stop(self) -> None:
        self.jobs.put(_STOP)

    def run(self) -> None:
        from ..models import LanguageModel

        try:
            self.model = LanguageModel(self.source, dispatch=True, **self.load)
        except BaseException as e:  # every job for this model then ends with the reason
            self.load_error = e
        finally:
            self.loaded.set()
        while True:
            batch, stop = take_batch(self.jobs, self.max_batch, self.window)
            try:
                if batch:
                    self._run(batch)
            finally:
                self.running = None
                for job_id in batch:
                    self.limits.pop(job_id, None)
            if stop:
                return

    def _run(self, batch: list[str]) -> None:
        store = self.store
        jobs: list[str] = []
        inputs: list[JobIn] = []
        for job_id in batch:
            read = read_job(self, job_id, "load")
            if read is not None:
                payload, max_result, max_seconds = read
                jobs.append(job_id)
                inputs.append(JobIn(payload, max_seconds, max_result, _logger(store, job_id)))
        if not jobs:
            return

        def start(indices: list[int]) -> None:  # RUNNING as its forward begins: the rest stay QUEUED
            self.running = jobs[indices[0]]
            for i in indices:
                store.set_status(jobs[i], "RUNNING")

        def done(i: int, outcome: Any) -> None:  # stored as soon as known, not after the whole batch
            finish(store, jobs[i], outcome.status, outcome.data)

        models = {name: w.model for name, w in self.peers.items() if w.model is not None}
        run_jobs(self.model, inputs, models, self.compile, self.batching, start, done)


def take_batch(jobs: queue.Queue, max_batch: int, window: float) -> tuple[list[str], bool]:
    """The next jobs of a worker's queue: wait for one, then take what else comes within ``window`` seconds
    (what is queued already, when 0), up to ``max_batch``. Also whether the queue asked the worker to stop."""
    first = jobs.get()
    if first is _STOP:
        return [], True
    batch = [first]
    deadline = time.monotonic() + window
    while len(batch) < max_batch:
        remaining = deadline - time.monotonic()
        try:
            job_id = jobs.get(timeout=remaining) if remaining > 0 else jobs.get_nowait()
        except queue.Empty:
            break
        if job_id is _STOP:
            return batch, True
        batch.append(job_id)
    return batch, False


def _logger(store: JobStore, job_id: str) -> Any:
    return lambda text: store.log(job_id, text)


def read_job(worker: Any, job_id: str, what: str) -> tuple[bytes, int, float] | None:
    """A worker's job's request: ``(payload, max result bytes, max seconds)``, or None when the worker's model
    failed to ``what`` (the job then ends as ERROR with the reason)."""
    store = worker.store
    max_result, max_seconds = worker.limits.get(job_id, (256 << 20, 300.0))
    if worker.load_error is not None:
        error = RuntimeError(f"the model {worker.model_name!r} failed to {what}: {worker.load_error}")
        store.set_status(job_id, "ERROR", json.dumps(error_document(error)))
        return None
    with open(store.payload_path(job_id), "rb") as f:
        return f.read(), max_result, max_seconds


def begin_job(worker: Any, job_id: str, what: str) -> tuple[bytes, int, float] | None:
    """:func:`read_job`, the job then marked RUNNING."""
    read = read_job(worker, job_id, what)
    if read is not None:
        worker.store.set_status(job_id, "RUNNING")
    return read


def finish(store: JobStore, job_id: str, status: str, data: bytes | str) -> None:
    """Store a job's outcome: the result file before the COMPLETED status, or the ERROR with its reason."""
    if status == "COMPLETED":
        assert isinstance(data, bytes)
        store.write_file(store.result_path(job_id), data)
        store.set_status(job_id, "COMPLETED")
    else:
        store.set_status(job_id, "ERROR", data if isinstance(data, str) else data.decode())


class Service:
    """The server's state: the store, the key ring, one worker per model."""

    def __init__(
        self,
        models: dict[str, str],
        data_dir: str,
        api_keys: str,
        compile: bool = True,
        ray: dict | None = None,
        max_batch: int = 1,
        window: float = 0.0,
        compile_merged_after: int = COMPILE_MERGED_AFTER,
        threads: int | None = None,
    ):
        self.store = JobStore(data_dir)
        self.keys = KeyRing(api_keys)
        self.workers: dict[str, Any] = {}
        # {"address", "replicas": {model: count}, "gpus"}: the models are Ray Serve deployments (ray_serving.py)
        self.ray = ray
        if ray is not None:
            import ray as ray_module

            from .ray_serving import RayWorker

            # no address: a new local instance ("local"), never a cluster RAY_ADDRESS or `ray start` left behind
            address = ray.get("address") or "local"
            env = {"env_vars": {"OMP_NUM_THREADS": str(threads)}} if threads else None
            ray_module.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env)
            # for the operator (ray status, ray.kill, more nodes joining); never served over HTTP: Ray runs
            # any code its clients send
            print(f"intervene-serve: Ray at {ray_module.get_runtime_context().gcs_address}", flush=True)
            from ray import serve

            serve.start(proxy_location="Disabled")  # our HTTP front serves; no Serve HTTP proxy on port 8000
            for name, source in models.items():
                replicas = ray["replicas"].get(name, ray["replicas"].get("", 1))
                self.workers[name] = RayWorker(
                    name,
                    source,
                    self.store,
                    replicas,
                    ray["gpus"],
                    compile,
                    max_batch,
                    window,
                    compile_merged_after,
                )
        else:
            if threads:  # the workers' forwards run in this process
                torch.set_num_threads(threads)
            for name, source in models.items():
                self.workers[name] = ModelWorker(
                    name,
                    source,
                    self.store,
                    compile,
                    peers=self.workers,
                    max_batch=max_batch,
                    window=window,
                    compile_after=compile_merged_after,
                )
        self.started = time.time()

    def start(self) -> None:
        """Start the workers one at a time, each once the one before has loaded its model (``from_pretrained``
        changes process-wide state and imports lazily: two loads at once can mix weights up or fail), then queue
        the jobs a stopped server had accepted."""
        for w in self.workers.values():
            w.start()
            w.loaded.wait()
        for job in self.store.recover():  # jobs a stopped server had accepted run now
            worker = self.workers.get(job.model)
            if worker is None:
                self.store.set_status(
                    job.id, "ERROR", json.dumps({"message": "the model is no longer served"})
                )
                continue
            key = next((k for k in self.keys.keys if k.name == job.key_name), None)
            worker.submit(job.id, *(_limits(key)))

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
        for w in self.workers.values():
            w.join(timeout=30)
        if self.ray is not None:
            import ray
            from ray import serve

            if self.ray.get("address"):  # someone's cluster: remove our applications only, then disconnect
                for w in self.workers.values():
                    serve.delete(w.app)
            else:
                serve.shutdown()
            ray.shutdown()
        self.store.close()

    def stats(self) -> dict:
        from .. import compile_stats

        stats = compile_stats()
        return {
            "compiles": stats.get("compiles"),
            "cache_hits": stats.get("cache_hits"),
            "fallbacks": stats.get("fallbacks"),
            "queue_depth": {name: w.jobs.qsize() for name, w in self.workers.items()},
            "running": {name: w.running for name, w in self.workers.items()},
            "jobs": self.store.counts(),
            "uptime_s": time.time() - self.started,
            # Ray: per model, how many jobs each replica (by process id) ran
            "replicas": {
                name: _count(getattr(w, "seen", {}).values()) for name, w in self.workers.items() if self.ray
            },
            # co-batching, per model: how many jobs each forward carried, jobs re-run alone, compiled merged runs
            "batching": {name: w.batching.document() for name, w in self.workers.items()},
        }


def _limits(key: ApiKey | None) -> tuple[int, float]:
    if key is None:
        return 256 << 20, 300.0
    return key.max_result_bytes, key.max_seconds


def create_app(service: Service) -> Any:
    app = FastAPI(
        title="intervene_compiler service",
        version="1",
        description="Intervention jobs on the models this server hosts: the IR as data, never code.",
    )

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    def _key(request: Request) -> ApiKey:
        given = request.headers.get("x-api-key") or request.headers.get("ndif-api-key")
        key = service.keys.find(given)
        if key is None:
            raise HTTPException(401, "missing or unknown API key (header X-API-Key)")
        return key

    @app.post(
        "/v1/jobs",
        summary="Submit a job (a safetensors request message)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "parameters": [
                {"name": "X-API-Key", "in": "header", "required": True, "schema": {"type": "string"}}
            ],
        },
    )
    async def submit(request: Request) -> dict:
        key = _key(request)
        if not service.keys.allow_request(key):
            raise HTTPException(429, f"more than {key.rate_per_minute} requests a minute for this key")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > key.max_request_bytes:
            raise HTTPException(413, f"the request is over this key's {key.max_request_bytes} bytes")
        body = await request.body()
        if len(body) > key.max_request_bytes:
            raise HTTPException(413, f"the request is over this key's {key.max_request_bytes} bytes")
        try:
            document, tensors = await asyncio.to_thread(unpack, body)
            model = document.get("model")
            if not isinstance(model, str):
                raise BadRequest("the request names no model")
            if not key.may_use(model):
                raise HTTPException(403, f"this key may not use the model {model!r}")
            worker = service.workers.get(model)
            if worker is None:
                raise HTTPException(404, f"this server does not serve the model {model!r}")
            checked = await asyncio.to_thread(read_request, document, tensors)
            if service.ray is not None and len(checked.models) > 1:
                raise HTTPException(
                    400,
                    "a session using several models does not run on Ray replicas yet (each holds one model): "
                    "run it on a server without --ray, or split it into one session per model",
                )
            for other in sorted(checked.models - {model}):
                if not key.may_use(other):
                    raise HTTPException(403, f"this key may not use the model {other!r}")
                if other not in service.workers:
                    raise HTTPException(404, f"this server does not serve the model {other!r}")
        except (WireError, BadRequest) as e:
            raise HTTPException(400, str(e)) from None
        except RecursionError:
            raise HTTPException(400, "the request nests too deeply") from None
        job_id = await asyncio.to_thread(service.store.create, key.name, model, body)
        worker.submit(job_id, key.max_result_bytes, key.max_seconds)
        return {"id": job_id, "status": "QUEUED"}

    def _job(job_id: str, key: ApiKey) -> Any:
        job = service.store.get(job_id) if job_id.isalnum() else None
        if job is None or job.key_name != key.name:
            raise HTTPException(404, f"no job {job_id!r} for this key")
        return job

    @app.get("/v1/jobs/{job_id}", summary="A job's status and events")
    async def status(job_id: str, request: Request) -> dict:
        job = _job(job_id, _key(request))
        events = service.store.events(job.id)
        return {
            "id": job.id,
            "model": job.model,
            "status": job.status,
            "error": _error_data(job.error),
            "events": [_event(seq, st, msg) for seq, st, msg in events],
        }

    @app.get("/v1/jobs/{job_id}/result", summary="The result message of a completed job")
    async def result(job_id: str, request: Request) -> Response:
        job = _job(job_id, _key(request))
        if job.status != "COMPLETED":
            raise HTTPException(409, f"the job is {job.status}, not COMPLETED")
        path = service.store.result_path(job.id)
        data = await asyncio.to_thread(_read, path)
        return Response(content=data, media_type="application/octet-stream")

    @app.websocket("/v1/jobs/{job_id}/events")
    async def events(websocket: WebSocket, job_id: str) -> None:
        given = websocket.headers.get("x-api-key") or websocket.headers.get("ndif-api-key")
        key = service.keys.find(given)
        job = service.store.get(job_id) if job_id.isalnum() and key is not None else None
        if key is None or job is None or job.key_name != key.name:
            await websocket.close(code=4404)
            return
        await websocket.accept()
        seen = -1
        try:
            while True:
                for seq, st, msg in service.store.events(job_id, seen):
                    seen = seq
                    await websocket.send_json(_event(seq, st, msg))
                    if st in TERMINAL:
                        await websocket.close()
                        return
                await asyncio.sleep(0.02)
        except WebSocketDisconnect:
            return

    @app.get("/v1/models", summary="The models this server hosts")
    async def models() -> dict:
        return {"models": sorted(service.workers)}

    @app.get("/v1/stats", summary="Compiles, cache hits, fallbacks, queue depth")
    async def stats() -> dict:
        return service.stats()

    @app.get("/stats", summary="The same as /v1/stats")
    async def stats_alias() -> dict:
        return service.stats()

    return app


def _replicas(parser: argparse.ArgumentParser, given: list[str]) -> dict[str, int]:
    """``--replicas`` values as {model: count}; "" is every other model's count."""
    out: dict[str, int] = {}
    for item in given:
        name, _, count = item.rpartition("=")
        if not count.isdigit() or int(count) < 1:
            parser.error(f"--replicas {item!r}: give N or MODEL=N with N at least 1")
        out[name] = int(count)
    return out


def _count(values: Any) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _event(seq: int, status: str, message: str | None) -> dict:
    out: dict[str, Any] = {"seq": seq, "status": status}
    if message is not None:
        out["message"] = _error_data(message) if status == "ERROR" else message
    return out


def _error_data(text: str | None) -> Any:
    """A stored error: the error as data, or (a plain message) that message as data."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {"message": text}
    return data if isinstance(data, dict) else {"message": text}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="intervene-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="a hub id or folder (repeat for more)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--data-dir", default="ic_serve_data")
    parser.add_argument(
        "--api-keys", required=True, help="the key file (see intervene_compiler/remote/keys.py)"
    )
    parser.add_argument(
        "--add-key", metavar="NAME", help="make a key named NAME in --api-keys, print it, exit"
    )
    parser.add_argument(
        "--eager", action="store_true", help="run jobs eagerly (default: the compiled backend)"
    )
    parser.add_argument(
        "--compile-merged-after",
        type=int,
        default=COMPILE_MERGED_AFTER,
        metavar="N",
        help="co-batching: compile a merged combination of jobs once seen N times (0: never); default 16",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for each model's forwards (default: torch's)"
    )
    parser.add_argument("--ray", action="store_true", help="deploy the models on Ray Serve (ray_serving.py)")
    parser.add_argument(
        "--address", default=None, help="with --ray: a cluster's address ('auto'); default: local"
    )
    parser.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="N|MODEL=N",
        help="with --ray: replicas per model (N for every model, MODEL=N for one; repeat)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="co-batching: most jobs one forward carries (1: every job runs alone); default 16",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="co-batching: how long a worker waits for more jobs after the first (0: only those queued)",
    )
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per replica")
    args = parser.parse_args(argv)
    if not args.ray and (args.address or args.replicas or args.gpus_per_replica):
        parser.error("--address, --replicas and --gpus-per-replica need --ray")
    if args.max_batch < 1 or args.batch_window_ms < 0 or args.compile_merged_after < 0:
        parser.error("--max-batch is at least 1, --batch-window-ms and --compile-merged-after at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads is at least 1")
    replicas = _replicas(parser, args.replicas)
    if args.add_key:
        print(add_key(args.api_keys, args.add_key))
        return
    if not args.model:
        parser.error("give at least one --model")
    import uvicorn

    os.makedirs(args.data_dir, exist_ok=True)
    ray = None
    if args.ray:
        unknown = sorted(set(replicas) - set(args.model) - {""})
        if unknown:
            parser.error(f"--replicas names models not served: {', '.join(unknown)}")
        ray = {"address": args.address, "replicas": replicas, "gpus": args.gpus_per_replica}
    service = Service(
        {m: m for m in args.model},
        args.data_dir,
        args.api_keys,
        compile=not args.eager,
        ray=ray,
        max_batch=args.max_batch,
        window=args.batch_window_ms / 1000,
        compile_merged_after=args.compile_merged_after,
        threads=args.threads,
    )
    service.start()
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    finally:
        service.stop()


__all__ = ["ModelWorker", "Service", "create_app", "main"]
