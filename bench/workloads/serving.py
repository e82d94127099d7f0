"""Serving throughput (issue 22): jobs per second of the intervention service with 16 clients at once, co-batching
off and on, embedded and on Ray Serve.

A real service process (``python -m intervene_compiler.remote``, compiled backend, its own data dir and key file)
hosts a checkpoint saved with ``save_pretrained``: GPT-2-small shapes with random seeded weights (``--full``: 12
blocks, width 768, 12 heads, vocab 50257; ``--quick``: the same with 2 blocks; ``--smoke``: the tiny GPT-2 of
``intervene_compiler.testing.save_tiny_lm``) and the small offline tokenizer. 16 client threads (one
``LanguageModel`` each, a meta model: the client never loads weights) each send one-prompt patch traces back to
back: set block L's last position to a vector, save the last-position logits; the prompt, L and the vector's
scale change from job to job, and every prompt has the same token length (co-batching merges only jobs of the same
length). The service's forwards get the run's ``--threads`` (the service's ``--threads``), embedded and in each replica.

Configurations, one service process each, one after the other: embedded co-batching off (``--max-batch 1``: a
forward per job), embedded co-batching on (``--max-batch 16 --batch-window-ms 50``), Ray Serve with 1 and with 2
replicas (co-batching on, through ``serve.batch``). Per configuration: warm-up (sequential jobs until every replica
has run one alone: its first compile), then a round of one job per client at once whose values are checked against
the same traces run locally (eager) before anything is timed, then the timed rounds: jobs/s, p50 / p99 ms per job,
and the jobs each forward carried (``GET /v1/stats``). The service and the clients share the machine's cores.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..harness import (
    NOT_INSTALLED,
    Row,
    Settings,
    Target,
    WorkloadResult,
    check_same,
    fmt_ratio,
    guarded,
    loadavg,
    log,
    median,
    ratio,
)

KEY = "serving"
TITLE = "Serving throughput (co-batching)"
JOBS_S = "jobs/s"
P50 = "p50 ms"
P99 = "p99 ms"
CLIENTS = 16
# the worker waits this long after taking a first job for others: long enough for the clients of the last forward
# to send their next jobs, so one forward carries most of the 16 (at 5 ms the clients split into two groups of
# about 8 that alternate: 19.4 jobs/s against 26.6 at 50 ms, p99 1.2 s against 1.0 s, --threads 2)
WINDOW_MS = 50.0
GOAL = (
    3.0  # co-batching on / off throughput asked for (judged in --full; the notes give the forward's own gain)
)


@dataclass(frozen=True)
class Config:
    name: str
    short: str  # in the summary line
    args: tuple[str, ...]
    replicas: int = 0  # 0: embedded (the service's own worker thread); else Ray Serve replicas

    @property
    def ray(self) -> bool:
        return self.replicas > 0


_ON = ("--max-batch", str(CLIENTS), "--batch-window-ms", f"{WINDOW_MS:g}")
OFF = Config("embedded, co-batching off", "off", ("--max-batch", "1"))
ON = Config("embedded, co-batching on", "on", _ON)
RAY1 = Config("Ray Serve, 1 replica, co-batching on", "Ray x1", ("--ray", "--replicas", "1", *_ON), 1)
RAY2 = Config("Ray Serve, 2 replicas, co-batching on", "Ray x2", ("--ray", "--replicas", "2", *_ON), 2)


@dataclass(frozen=True)
class Job:
    prompt: str
    layer: int
    value: float


# -- the service process -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat``'s fields after the command name (state first), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _tree(pid: int) -> dict[int, str]:
    """``pid`` and its descendants (Ray's processes, for a ``--ray`` service): pid -> start time (so a pid the
    kernel reused is never mistaken for one of them)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(name))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        fields = _stat(p)
        if fields is not None:
            out[p] = fields[19]
            todo += children.get(p, [])
    return out


def _alive(pid: int, start: str) -> bool:
    """Whether the process that started at ``start`` still runs as ``pid`` (not a zombie, not a reused pid)."""
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def _cpu_seconds(pids: dict[int, str]) -> float:
    """CPU time (user + system, with reaped children's) of these processes so far."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


class Service:
    """One service process (``python -m intervene_compiler.remote``) hosting ``folder``, with ``config``'s options
    (none: the defaults) and ``threads`` torch threads; on exit it is stopped and waited for, with every process it
    started (Ray's), and its port is closed before the next one starts. The remote workload uses it too."""

    def __init__(self, folder: str, root: str, config: Config | None = None, threads: int | None = None):
        from intervene_compiler.remote.keys import add_key

        self.folder = folder
        self.config = config if config is not None else Config("defaults", "defaults", ())
        self.threads = threads
        os.makedirs(root, exist_ok=True)
        self.keys = os.path.join(root, "keys.json")
        self.key = add_key(self.keys, "bench", rate_per_minute=1_000_000)
        self.port = _free_port()
        self.data = os.path.join(root, "data")
        self.log = os.path.join(root, "server.log")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Service:
        import httpx

        args = [
            sys.executable,
            "-m",
            "intervene_compiler.remote",
            "--model",
            self.folder,
            "--port",
            str(self.port),
        ]
        args += ["--data-dir", self.data, "--api-keys", self.keys, *self.config.args]
        # torch threads per forward, in the service process and in each Ray replica; without --address the
        # service starts a Ray instance of its own
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited: " + open(self.log).read()[-2000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not start within 300 s")

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/v1/stats", timeout=30).json()

    def forwards(self) -> dict[int, int]:
        """Jobs per forward so far: jobs one forward carried -> how many such forwards."""
        (model,) = self.stats()["batching"].values()
        return {int(k): v for k, v in model["jobs_per_forward"].items()}

    def replicas_used(self) -> dict:
        """Ray: the replicas (by process id) that have run jobs so far, and how many each ran."""
        (model,) = self.stats()["replicas"].values() if self.config.ray else ({},)
        return model

    def pids(self) -> dict[int, str]:
        return _tree(self.proc.pid) if self.proc is not None else {}

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        started = self.pids()
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn stops, then the service (and Ray: serve.shutdown, ray.shutdown)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # what the service started and has not ended yet (Ray's processes take a few seconds after ray.shutdown)
        deadline = time.monotonic() + 30
        left = [p for p, t in started.items() if _alive(p, t)]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [p for p in left if _alive(p, started[p])]
        for pid in left:
            log(f"{TITLE}: ending process {pid} the service left behind")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 30
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)


# -- the model, the prompts, the jobs ----------------------------------------------------------------------------


def _checkpoint(settings: Settings, root: str) -> tuple[str, str]:
    """The folder of the model the service hosts (saved with ``save_pretrained``) and what it is."""
    import torch

    from .. import models

    if settings.mode == "smoke":
        from intervene_compiler.testing import save_tiny_lm

        folder = save_tiny_lm(os.path.join(root, "tiny-gpt2"))
        return folder, "the tiny GPT-2 of intervene_compiler.testing.save_tiny_lm (2 blocks, width 64)"
    from transformers import GPT2Config, GPT2LMHeadModel

    layers = 12 if settings.mode == "full" else settings.sweep_layers
    folder = os.path.join(root, "gpt2-small")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_embd=settings.width,
        n_head=settings.heads,
        vocab_size=settings.vocab,
        n_positions=1024,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    models.tokenizer().save_pretrained(folder)
    what = (
        f"GPT-2-small shapes, {layers} blocks{'' if layers == 12 else ' (--quick; --full: 12)'}, width "
        f"{settings.width}, {settings.heads} heads, vocab {settings.vocab}, random seeded weights, the small "
        "offline tokenizer (ids below 384)"
    )
    return folder, what


def _prompts(tokenizer: Any) -> list[str]:
    """At least ``CLIENTS`` different prompts with one token length (the most common one of the templates')."""
    names = ("John", "Mary", "Alice", "Bob")
    by_length: dict[int, list[str]] = {}
    for a, b, place, thing in itertools.product(
        names, names, ("store", "park", "city"), ("a drink", "the book")
    ):
        if a != b:
            text = f"After {a} and {b} went to the {place}, {a} gave {thing} to"
            by_length.setdefault(len(tokenizer(text)["input_ids"]), []).append(text)
    prompts = max(by_length.values(), key=len)
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == 1 and len(prompts) >= CLIENTS, (lengths, len(prompts))
    return prompts


def _job(prompts: list[str], layers: int, client: int, index: int) -> Job:
    """Client ``client``'s job ``index``: the clients of one round send different prompts; the patched block and
    the scale are drawn per job (seeded). Not a schedule periodic in ``index``: the service compiles a merged
    forward once the same jobs' structures have come together ``--compile-merged-after`` times, and a periodic
    schedule would bring the same combination back every period."""
    draw = random.Random(client * 10_007 + index)
    return Job(prompts[(client + 5 * index) % len(prompts)], draw.randrange(layers), draw.randint(-8, 8) / 10)


@functools.lru_cache(maxsize=4)
def _direction(width: int) -> Any:
    """The patched vector's direction (seeded): a constant written into the last block's output would reach the
    final layer norm as a constant vector, whose normalization amplifies rounding differences a hundredfold."""
    import torch

    return torch.randn(width, generator=torch.Generator().manual_seed(2))


def _trace(lm, job: Job, **options):
    value = job.value * _direction(lm.config.n_embd)
    with lm.trace(job.prompt, **options):
        lm.transformer.h[job.layer].output[:, -1] = value
        logits = lm.lm_head.output[:, -1].save()
    return logits


def _round(
    clients: list, jobs: Callable[[int], list[Job]]
) -> tuple[list[float], float, dict[tuple[int, int], Any]]:
    """Every client sends its jobs back to back, all clients at once: ``(seconds per job, wall seconds, the values
    by (client, job number))``."""
    latencies: list[float] = []
    values: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(clients) + 1)

    def client(c: int) -> None:
        mine = jobs(c)
        barrier.wait()
        try:
            for j, job in enumerate(mine):
                start = time.perf_counter()
                value = _trace(clients[c], job, remote=True)
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
                    values[c, j] = value
        except BaseException as e:  # raised below, after every thread ended
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(clients))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return latencies, wall, values


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _mean_carried(forwards: dict[int, int]) -> float | None:
    n = sum(forwards.values())
    return sum(k * v for k, v in forwards.items()) / n if n else None


def _since(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


# -- the workload ------------------------------------------------------------------------------------------------


def run(settings: Settings) -> WorkloadResult:
    jobs = 8 if settings.mode == "full" else 3
    result = WorkloadResult(
        KEY,
        TITLE,
        measures=(
            f"{CLIENTS} client threads at once, each sending {jobs} one-prompt patch traces back to back to a "
            "service process (loopback HTTP + websocket): jobs/s (higher is better), p50 / p99 ms per job, and "
            "the mean jobs per forward, with co-batching off and on, embedded and on Ray Serve"
        ),
        primary=P50,
        mode=settings.mode,
    )
    result.plots = [
        {"metric": JOBS_S, "title": f"{CLIENTS} clients: jobs/s (higher is better)", "log": False},
        {"metric": P99, "title": f"{CLIENTS} clients: p99 ms per job", "log": False},
    ]

    def body():
        import intervene_compiler as ic

        root = tempfile.mkdtemp(prefix="bench_serving_")
        saved = (ic.CONFIG.API.HOST, ic.CONFIG.API.APIKEY, ic.CONFIG.APP.REMOTE_LOGGING)
        try:
            ic.CONFIG.APP.REMOTE_LOGGING = False
            _measure(settings, result, root, jobs)
        finally:
            ic.CONFIG.API.HOST, ic.CONFIG.API.APIKEY, ic.CONFIG.APP.REMOTE_LOGGING = saved
            shutil.rmtree(root, ignore_errors=True)

    return guarded(result, body)


def _measure(settings: Settings, result: WorkloadResult, root: str, jobs: int) -> None:
    import torch

    import intervene_compiler as ic

    start_load = loadavg()
    threads = torch.get_num_threads()  # the run's --threads: the service's forwards get as many
    folder, what = _checkpoint(settings, root)
    local = ic.LanguageModel(folder)  # the reference: the same traces, locally, eager
    prompts = _prompts(local.tokenizer)
    layers = len(local.transformer.h)
    clients = [ic.LanguageModel(folder) for _ in range(CLIENTS)]
    length = len(local.tokenizer(prompts[0])["input_ids"])
    result.notes.append(
        f"model: {what}; {len(prompts)} prompts of {length} tokens; each job sets one of the {layers} blocks' "
        "last position (drawn per job, seeded) to a seeded random vector times -0.8 to 0.8; service: compiled "
        f"backend, SQLite WAL, loopback HTTP + websocket; co-batching on: --max-batch {CLIENTS} --batch-window-ms "
        f"{WINDOW_MS:g}"
    )
    configs = [OFF, ON] if settings.mode == "smoke" else [OFF, ON, RAY1, RAY2]
    reference: dict[tuple[int, int], Any] = {}
    group = f"{CLIENTS} clients x {jobs} jobs"
    for i, config in enumerate(configs):
        if config.ray:
            try:
                import ray  # noqa: F401
                from ray import serve  # noqa: F401
            except ImportError as e:
                result.rows.append(
                    Row(config.name, group, {}, status=NOT_INSTALLED, note=f"ray[serve]: {e}", role="ours")
                )
                continue
        log(f"{TITLE}: {config.name}")
        with Service(folder, os.path.join(root, f"service-{i}"), config, threads) as service:
            ic.CONFIG.API.HOST, ic.CONFIG.API.APIKEY = f"127.0.0.1:{service.port}", service.key
            _configuration(settings, result, config, service, clients, local, reference, prompts, jobs, group)
    if not settings.time_it:
        return
    off, on = result.value(OFF.name, JOBS_S, group), result.value(ON.name, JOBS_S, group)
    gain = ratio(on, off)
    p99 = ratio(result.value(ON.name, P99, group), result.value(OFF.name, P99, group))
    result.targets.append(
        Target(
            f"{CLIENTS} clients, embedded: co-batching on / off, jobs/s (>= {GOAL:g}x asked)",
            fmt_ratio(gain),
            None if gain is None or settings.mode != "full" else gain >= GOAL,
        )
    )
    result.targets.append(
        Target(f"{CLIENTS} clients, embedded: co-batching on / off, p99 ms (reported)", fmt_ratio(p99), None)
    )
    ray2 = ratio(result.value(RAY2.name, JOBS_S, group), result.value(RAY1.name, JOBS_S, group))
    if ray2 is not None:
        result.targets.append(
            Target("Ray Serve: 2 replicas / 1 replica, jobs/s (reported)", fmt_ratio(ray2), None)
        )
    result.notes.append(
        f"the service and the {CLIENTS} client threads share this machine's {os.cpu_count()} cores (the clients "
        "trace and pack in one Python process); load average at the start / end: "
        f"{start_load} / {loadavg()}; torch threads per forward: {threads} (the run's --threads, given to the "
        "service as its --threads: the embedded worker and each Ray replica), so a 2-replica service may use "
        "twice the cores of the others"
    )
    _ceiling(result, folder, length)
    rates = ", ".join(
        f"{c.short} {v:.1f}" for c in configs if (v := result.value(c.name, JOBS_S, group)) is not None
    )
    result.summary = f"{TITLE}: {CLIENTS} clients, jobs/s {rates}; co-batching on / off {fmt_ratio(gain)}"


def _configuration(
    settings: Settings,
    result: WorkloadResult,
    config: Config,
    service: Service,
    clients: list,
    local: Any,
    reference: dict,
    prompts: list[str],
    jobs: int,
    group: str,
) -> None:
    layers = len(local.transformer.h)

    def check(what: str, values: dict[tuple[int, int], Any]) -> None:
        keys = sorted(values)
        for key in keys:
            if key not in reference:
                reference[key] = _trace(local, _job(prompts, layers, *key))
        result.checks.append(
            check_same(
                f"{config.name}: the last-position logits of {what}",
                {"ours local eager": [reference[k] for k in keys], config.name: [values[k] for k in keys]},
                "ours local eager",
                atol=1e-4,
            )
        )

    # warm-up: jobs one at a time until every replica has run one alone (its first compile: seconds)
    start = time.perf_counter()
    for k in range(8 * max(1, config.replicas)):
        _trace(clients[0], _job(prompts, layers, 0, 100 + k), remote=True)
        if len(service.replicas_used()) >= config.replicas:
            break
    # one job per client at once, checked against the same traces run locally before anything is timed
    before = service.forwards()
    _, _, values = _round(clients, lambda c: [_job(prompts, layers, c, 0)])
    check(f"{len(values)} jobs sent at once (forwards {_since(before, service.forwards())})", values)
    warm = time.perf_counter() - start
    if not settings.time_it:
        result.rows.append(Row(config.name, group, {}, role="ours", note="checks only (smoke)"))
        return
    before, stats = service.forwards(), service.stats()
    cpu_service, cpu_clients = _cpu_seconds(service.pids()), time.process_time()
    latencies, wall, values = _round(
        clients, lambda c: [_job(prompts, layers, c, 1 + j) for j in range(jobs)]
    )
    cpu_clients = time.process_time() - cpu_clients
    cpu_service = _cpu_seconds(service.pids()) - cpu_service
    forwards, after = _since(before, service.forwards()), service.stats()
    check(
        "every client's last timed job",
        {(c, j + 1): v for (c, j), v in values.items() if j == jobs - 1},
    )
    carried = _mean_carried(forwards)
    n = len(latencies)
    mean = "?" if carried is None else f"{carried:.1f}"
    if config.ray:  # the replicas compile: the head's counters do not see it
        compiles = f"replicas used {len(service.replicas_used())}"
    else:
        (a,), (b,) = after["batching"].values(), stats["batching"].values()
        compiles = (
            f"compiles while timed {after['compiles'] - stats['compiles']} (merged runs compiled "
            f"{a['compiled_merged_runs'] - b['compiled_merged_runs']})"
        )
    result.rows.append(
        Row(
            config.name,
            group,
            {JOBS_S: n / wall, P50: median(latencies) * 1000, P99: _percentile(latencies, 0.99) * 1000},
            role="ours",
            note=(
                f"{n} jobs in {wall:.1f} s; mean {mean} jobs per forward (jobs: forwards {forwards}); "
                f"{compiles}; CPU per job: service {cpu_service / n * 1000:.0f} ms, clients "
                f"{cpu_clients / n * 1000:.0f} ms; warm-up {warm:.0f} s"
            ),
        )
    )
    log(f"{TITLE}: {config.name}: {n / wall:.2f} jobs/s, mean {mean} jobs per forward")


def _ceiling(result: WorkloadResult, folder: str, length: int) -> None:
    """The forward alone, in this process with the service's thread count: batch 1 vs batch ``CLIENTS``, the
    most co-batching can gain on this machine."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    times = {}
    with torch.no_grad():
        for batch in (1, CLIENTS):
            ids = torch.randint(1, 384, (batch, length), generator=torch.Generator().manual_seed(0))
            model(ids)
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                model(ids)
                samples.append(time.perf_counter() - start)
            times[batch] = median(samples)
    gain = CLIENTS * times[1] / times[CLIENTS]
    result.notes.append(
        f"the plain forward alone (from_pretrained, eager, every position's logits, {torch.get_num_threads()} "
        f"thread(s) as the service): batch 1 {times[1] * 1000:.0f} ms, batch {CLIENTS} "
        f"{times[CLIENTS] * 1000:.0f} ms: batching {CLIENTS} prompts into one forward gains {gain:.1f}x here"
    )
