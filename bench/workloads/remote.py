"""Remote execution (issue 19): what a remote trace costs over loopback, and latency with 8 clients at once.

A real service process (``python -m intervene_compiler.remote``, compiled backend, its own data dir and key file)
hosts a tiny GPT-2 checkpoint saved with ``save_pretrained``; the client loads the same folder with
``LanguageModel`` (config and tokenizer only, for the remote rows). The trace: set block 0's last position to a
value, save the last-position logits. Systems, one process: ours locally (eager and ``compile=True``, the
baseline), ours with ``remote=True`` (one client, the same structure every call: the service's compile-cache
hits). Then 8 client threads each send jobs back to back (one ``LanguageModel`` each: blocks on one model take
turns): p50 / p99 latency per job and jobs per second. Every remote value is checked against the local one first.
The service runs on the same cores as the clients, so its compute competes with them: on a 2-core machine the
8-client latencies are an upper bound.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

from ..harness import (
    Row,
    Settings,
    Target,
    WorkloadResult,
    check_same,
    fmt_ratio,
    guarded,
    log,
    median,
    ratio,
)
from .serving import Service

KEY = "remote"
TITLE = "Remote execution"
MS = "ms/call"
CLIENTS = 8


def _trace(lm, value: float, **options):
    with lm.trace("The Eiffel Tower is in the city of", **options):
        lm.transformer.h[0].output[:, -1] = value
        logits = lm.lm_head.output[:, -1].save()
    return logits


def run(settings: Settings) -> WorkloadResult:
    result = WorkloadResult(
        KEY,
        TITLE,
        measures=(
            "ms per trace (median of interleaved samples): ours locally vs ours with remote=True over loopback "
            f"(the service a separate process); then {CLIENTS} client threads at once: p50 / p99 ms per job"
        ),
        primary=MS,
        mode=settings.mode,
    )

    def body():
        import intervene_compiler as ic
        from intervene_compiler.testing import save_tiny_lm

        root = tempfile.mkdtemp(prefix="bench_remote_")
        folder = save_tiny_lm(os.path.join(root, "tiny-gpt2"))
        result.notes.append(
            "model: the tiny GPT-2 of intervene_compiler.testing.save_tiny_lm (2 blocks, width 64): the row is "
            "the round trip, not the model's compute; service: compiled backend, SQLite WAL, loopback HTTP + "
            "websocket"
        )
        with Service(folder, root) as service:
            saved_host, saved_key, saved_log = (
                ic.CONFIG.API.HOST,
                ic.CONFIG.API.APIKEY,
                ic.CONFIG.APP.REMOTE_LOGGING,
            )
            ic.CONFIG.API.HOST, ic.CONFIG.API.APIKEY = f"127.0.0.1:{service.port}", service.key
            ic.CONFIG.APP.REMOTE_LOGGING = False
            try:
                _measure(settings, result, folder)
            finally:
                ic.CONFIG.API.HOST, ic.CONFIG.API.APIKEY = saved_host, saved_key
                ic.CONFIG.APP.REMOTE_LOGGING = saved_log

    return guarded(result, body)


def _measure(settings: Settings, result: WorkloadResult, folder: str) -> None:
    import intervene_compiler as ic

    local = ic.LanguageModel(folder)
    local_compiled = ic.LanguageModel(folder, compile=True)
    remote = ic.LanguageModel(folder)
    values = {
        "ours local eager": _trace(local, 0.5),
        "ours local compile=True": _trace(local_compiled, 0.5),
        "ours remote=True": _trace(remote, 0.5, remote=True),
    }
    result.checks.append(check_same("last-position logits", values, "ours local eager"))
    assert not remote.dispatched  # the weights never loaded on the client
    if not settings.time_it:
        for name in values:
            result.rows.append(Row(name, "one client", {}, role="ours", note="checks only (smoke)"))
        return
    calls = {"ours local eager": 20, "ours local compile=True": 20, "ours remote=True": 10}
    fns = {
        "ours local eager": lambda: _trace(local, 0.25),
        "ours local compile=True": lambda: _trace(local_compiled, 0.25),
        "ours remote=True": lambda: _trace(remote, 0.25, remote=True),
    }
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(settings.overhead_repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    for name, s in samples.items():
        role = "baseline" if name == "ours local eager" else "ours"
        result.rows.append(Row(name, "one client", {MS: median(s) * 1000}, role=role))
    jobs = 25 if settings.mode == "full" else 10
    log(f"{TITLE}: {CLIENTS} clients x {jobs} jobs")
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        lm = ic.LanguageModel(folder)
        try:
            for j in range(jobs):
                start = time.perf_counter()
                _trace(lm, (c * jobs + j) / 100, remote=True)
                with lock:
                    latencies.append(time.perf_counter() - start)
        except BaseException as e:  # reported as the row's status
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    group = f"{CLIENTS} clients"
    result.rows.append(
        Row(
            "ours remote=True, p50",
            group,
            {MS: p50, "jobs/s": len(latencies) / wall},
            role="ours",
            note=f"{len(latencies)} jobs in {wall:.1f} s",
        )
    )
    result.rows.append(Row("ours remote=True, p99", group, {MS: p99}, role="ours"))
    one = result.value("ours remote=True", group="one client")
    eager = result.value("ours local eager", group="one client")
    r = ratio(one, eager)
    result.targets.append(
        Target("a remote trace over loopback: round trip (reported, no target)", fmt_ratio(r), None)
    )
    result.summary = (
        f"{TITLE}: one remote trace {one:.1f} ms vs local eager {eager:.2f} ms ({fmt_ratio(r)}); "
        f"{CLIENTS} clients: p50 {p50:.0f} ms, p99 {p99:.0f} ms, {len(latencies) / wall:.1f} jobs/s"
    )
