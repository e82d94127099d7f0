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
import time
from typing import Any

from .batching import COMPILE_MERGED_AFTER, BatchStats, JobIn, run_jobs
from .store import JobStore

_STOP = object()


class ModelReplica:
    """One replica of a model's deployment (the class Ray Serve instantiates on a worker): the model loaded
    once, its compiled programs, and its co-batching (``batching.run_jobs``), fed by Ray Serve's own request
    batching (``serve.batch``: the requests that reach the replica within the window, up to ``max_batch``)."""

    def __init__(
        self,
        source: str,
        compile: bool = True,
        max_batch: int = 1,
        window: float = 0.0,
        gpus: float = 0.0,
        compile_after: int = COMPILE_MERGED_AFTER,
    ):
        from ..models import LanguageModel

        # --threads reaches a replica as OMP_NUM_THREADS (the runtime env), which torch takes as its thread count
        # with GPUs (Ray sets CUDA_VISIBLE_DEVICES to the replica's), accelerate spreads the model over them
        self.model = LanguageModel(source, device_map="auto" if gpus else None, dispatch=True)
        self.compile = compile
        self.pid = os.getpid()
        self.stats = BatchStats(compile_after=compile_after)
        self.batched = _batched(max_batch, window).__get__(self)

    async def run(self, payload: bytes, max_seconds: float, max_result: int) -> tuple:
        """One job: ``(status, data, logs, jobs its forward carried, that forward's number, this replica's
        pid)``."""
        return await self.batched((payload, max_seconds, max_result))

    def run_many(self, items: list[tuple[bytes, float, int]]) -> list[tuple]:
        outcomes = run_jobs(self.model, [JobIn(*item) for item in items], None, self.compile, self.stats)
        return [(o.status, o.data, o.logs, o.carried, o.forward, self.pid) for o in outcomes]


def _batched(max_batch: int, window: float) -> Any:
    """``serve.batch`` around :meth:`ModelReplica.run_many` with this deployment's size and window."""
    from ray import serve

    @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=window)
    async def batched(self: ModelReplica, items: list) -> list:
        return self.run_many(items)

    return batched


def deploy(
    name: str,
    source: str,
    replicas: int,
    gpus: float,
    compile: bool,
    max_batch: int = 1,
    window: float = 0.0,
    compile_after: int = COMPILE_MERGED_AFTER,
) -> Any:
    """Deploy ``source`` as the Ray Serve application ``name``; its handle."""
    from ray import serve

    options: dict[str, Any] = {"num_cpus": 0.5 if gpus == 0 else 1}
    if gpus:
        options["num_gpus"] = gpus
    deployment: Any = serve.deployment(ModelReplica)
    deployment = deployment.options(
        name="model", num_replicas=replicas, ray_actor_options=options, max_ongoing_requests=max_batch
    )
    bound = deployment.bind(source, compile, max_batch, window, gpus, compile_after)
    return serve.run(bound, name=name, route_prefix=None)


class RayWorker(threading.Thread):
    """The head's side of one model's deployment: queued jobs go to the replicas, outcomes to the store."""

    def __init__(
        self,
        name: str,
        source: str,
        store: JobStore,
        replicas: int,
        gpus: float,
        compile: bool = True,
        max_batch: int = 1,
        window: float = 0.0,
        compile_after: int = COMPILE_MERGED_AFTER,
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
        self.max_batch = max_batch
        self.window = window
        self.batching = _Carried()
        self.compile_after = compile_after  # the replicas' --compile-merged-after
        self.app = "ic-" + "".join(c if c.isalnum() else "-" for c in name)[-40:]  # the Serve application
        self.pumps = replicas * max(2, max_batch)  # requests in flight: enough for every replica to batch

    def submit(self, job_id: str, max_result_bytes: int, max_seconds: float) -> None:
        self.limits[job_id] = (max_result_bytes, max_seconds)
        self.store.set_status(job_id, "QUEUED")
        self.jobs.put(job_id)

    def stop(self) -> None:
        for _ in range(self.pumps):
            self.jobs.put(_STOP)

    def run(self) -> None:
        try:
            self.handle = deploy(
                self.app,
                self.source,
                self.replicas,
                self.gpus,
                self.compile,
                self.max_batch,
                self.window,
                self.compile_after,
            )
        except BaseException as e:
            self.load_error = e
        finally:
            self.loaded.set()
        pumps = [threading.Thread(target=self._pump, daemon=True) for _ in range(self.pumps)]
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
        for attempt in range(2):  # a replica that died mid-job: Ray restarts it; the job runs once more
            if attempt:
                self._await_replicas()
            try:
                response = self.handle.run.remote(payload, max_seconds, max_result)
                # bounded: a request Serve routed to a replica as it died can wait forever
                status, data, logs, carried, forward, pid = response.result(timeout_s=max_seconds + _GRACE)
            except Exception as e:  # the replica died (RayActorError and kin), no answer, or no replica
                last = e
                then = "sending it again" if attempt == 0 else "giving up"
                print(
                    f"intervene-serve: job {job_id}: the replica failed ({type(e).__name__}); {then}",
                    flush=True,
                )
                continue
            for line in logs:
                store.log(job_id, line)
            self.seen[job_id] = pid
            self.batching.add(pid, forward, carried)
            finish(store, job_id, status, data)
            return
        error = RuntimeError(f"the replica running the job failed twice: {type(last).__name__}: {last}")
        store.set_status(job_id, "ERROR", json.dumps(error_document(error)))

    def _await_replicas(self, timeout: float = 120.0) -> None:
        """Wait until Serve has noticed the failure and the deployment is healthy again (a new replica running),
        so that the job is not sent to the replica that died."""
        from ray import serve

        time.sleep(2.0)  # the controller's health check and the router's replica list lag the death
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                app = serve.status().applications.get(self.app)
                if app is not None and all(d.status == "HEALTHY" for d in app.deployments.values()):
                    return
            except Exception:  # the controller restarting: ask again
                pass
            time.sleep(0.5)


_GRACE = 120.0  # seconds a replica's answer may take beyond the job's own limit (queueing behind a batch)


class _Carried:
    """The head's view of its replicas' co-batching: each job reports how many jobs its forward carried."""

    def __init__(self) -> None:
        self.forwards: dict[tuple[int, int], int] = {}  # (replica pid, forward number) -> jobs it carried
        self.lock = threading.Lock()

    def add(self, pid: int, forward: int, carried: int) -> None:
        with self.lock:
            self.forwards[(pid, forward)] = carried

    def document(self) -> dict:
        with self.lock:
            sizes = list(self.forwards.values())
        return {"jobs_per_forward": {str(k): sizes.count(k) for k in sorted(set(sizes))}}


__all__ = ["ModelReplica", "RayWorker", "deploy"]
