"""The service's models as Ray Serve deployments (``intervene-serve --ray``): replicas compute, the head keeps jobs.

The HTTP front, the key ring and the job store stay on the head, as in the embedded server. Each model is a Ray
Serve deployment of :class:`ModelReplica` (``--replicas N``, ``--gpus-per-replica G``): a replica loads the model
once and keeps its compiled-program cache; it runs a job's request (``server.run_payload``) and hands back the
result message or the error as data. On the head, a :class:`RayWorker` per model (the embedded server's
``ModelWorker`` interface) sends queued jobs to the deployment through its handle, several at a time, and Ray
Serve routes them to replicas. A replica that dies mid-job is restarted by Ray; the job is retried once, then
ends as ERROR with the reason: nothing is lost, nothing completes twice.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Any

from .store import JobStore

_STOP = object()


class ModelReplica:
    """One replica of a model's deployment (the class Ray Serve instantiates on a worker)."""

    def __init__(self, source: str, compile: bool = True):
        from ..models import LanguageModel

        self.model = LanguageModel(source, dispatch=True)
        self.compile = compile
        self.pid = os.getpid()

    def run(self, payload: bytes, max_seconds: float, max_result: int) -> tuple[str, Any, list[str], int]:
        from .server import run_payload

        status, data, logs = run_payload(self.model, payload, max_seconds, max_result, None, self.compile)
        return status, data, logs, self.pid


def deploy(name: str, source: str, replicas: int, gpus: float, compile: bool) -> Any:
    """Deploy ``source`` as the Ray Serve application ``name``; its handle."""
    from ray import serve

    options: dict[str, Any] = {"num_cpus": 0.5 if gpus == 0 else 1}
    if gpus:
        options["num_gpus"] = gpus
    deployment: Any = serve.deployment(ModelReplica)
    deployment = deployment.options(
        name="model", num_replicas=replicas, ray_actor_options=options, max_ongoing_requests=1
    )
    return serve.run(deployment.bind(source, compile), name=name, route_prefix=None)


class RayWorker(threading.Thread):
    """The head's side of one model's deployment: queued jobs go to the replicas, outcomes to the store."""

    def __init__(
        self, name: str, source: str, store: JobStore, replicas: int, gpus: float, compile: bool = True
    ):
        super().__init__(name=f"ray:{name}", daemon=True)
        self.model_name = name
        self.source = source
        self.store = store
        self.replicas = replicas
        self.gpus = gpus
        self.compile = compile
        self.jobs: queue.Queue = queue.Queue()
        self.model: Any = None  # models live on the replicas
        self.peers: dict = {}
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.running: str | None = None
        self.limits: dict[str, tuple[int, float]] = {}
        self.handle: Any = None
        self.seen: dict[str, int] = {}  # job id -> the pid of the replica that ran it (stats, tests)

    def submit(self, job_id: str, max_result_bytes: int, max_seconds: float) -> None:
        self.limits[job_id] = (max_result_bytes, max_seconds)
        self.store.set_status(job_id, "QUEUED")
        self.jobs.put(job_id)

    def stop(self) -> None:
        for _ in range(self.replicas * 2):
            self.jobs.put(_STOP)

    def run(self) -> None:
        app = "ic-" + "".join(c if c.isalnum() else "-" for c in self.model_name)[-40:]
        try:
            self.handle = deploy(app, self.source, self.replicas, self.gpus, self.compile)
        except BaseException as e:
            self.load_error = e
        finally:
            self.loaded.set()
        pumps = [threading.Thread(target=self._pump, daemon=True) for _ in range(self.replicas * 2)]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join()

    def _pump(self) -> None:
        while True:
            job_id = self.jobs.get()
            if job_id is _STOP:
                return
            try:
                self._run(job_id)
            finally:
                self.limits.pop(job_id, None)

    def _run(self, job_id: str) -> None:
        from .jobs import error_document
        from .server import begin_job, finish

        store = self.store
        begun = begin_job(self, job_id, "deploy")
        if begun is None:
            return
        payload, max_result, max_seconds = begun
        last: BaseException | None = None
        for _attempt in range(2):  # a replica that died mid-job: Ray restarts it; the job runs once more
            try:
                status, data, logs, pid = self.handle.run.remote(payload, max_seconds, max_result).result()
            except Exception as e:  # the replica died (RayActorError and kin) or Serve could not reach one
                last = e
                continue
            for line in logs:
                store.log(job_id, line)
            self.seen[job_id] = pid
            finish(store, job_id, status, data)
            return
        error = RuntimeError(f"the replica running the job failed twice: {type(last).__name__}: {last}")
        store.set_status(job_id, "ERROR", json.dumps(error_document(error)))


__all__ = ["ModelReplica", "RayWorker", "deploy"]
