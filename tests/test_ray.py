"""The service on Ray Serve (issue 22): ``intervene-serve --ray --replicas 2 --replicas LLAMA=1`` on a local Ray
instance the server process starts (2 replicas of the tiny GPT-2, 1 of the tiny Llama), the same client against
it, results equal to local runs, jobs on both GPT-2 replicas, a replica killed (``ray.kill``) mid-job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch
from test_remote import Server, _patched_trace, _session, _steered, _wait_status  # noqa: E402

import intervene_compiler as ic

pytestmark = pytest.mark.remote


@pytest.fixture(scope="module")
def ray_server(lm_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_server")
    s = Server(root, [lm_dirs["gpt2"], lm_dirs["llama"]]).start(
        "--ray", "--replicas", "2", "--replicas", f"{lm_dirs['llama']}=1"
    )
    yield s
    s.stop()


@pytest.fixture
def on_ray(ray_server, monkeypatch):
    monkeypatch.setattr(ic.CONFIG.API, "HOST", f"127.0.0.1:{ray_server.port}")
    monkeypatch.setattr(ic.CONFIG.API, "APIKEY", ray_server.key)
    monkeypatch.setattr(ic.CONFIG.APP, "REMOTE_LOGGING", False)
    return ray_server


def test_the_client_runs_against_ray_replicas(on_ray, lm_dirs):
    got = _patched_trace(ic.LanguageModel(lm_dirs["gpt2"]), True)
    want = _patched_trace(ic.LanguageModel(lm_dirs["gpt2"]), False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    tokens, hidden = _steered(ic.LanguageModel(lm_dirs["llama"]), True)
    want_tokens, want_hidden = _steered(ic.LanguageModel(lm_dirs["llama"]), False)
    assert torch.equal(tokens, want_tokens)
    for a, b in zip(hidden, want_hidden):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    got_s = _session(ic.LanguageModel(lm_dirs["gpt2"]), True)
    want_s = _session(ic.LanguageModel(lm_dirs["gpt2"]), False)
    torch.testing.assert_close(got_s[0], want_s[0], rtol=1e-4, atol=1e-4)
    assert len(got_s[1]) == len(want_s[1]) == 2
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with pytest.raises(
        IndexError, match="out of bounds"
    ) as info:  # the error a local run raises, at this line
        with lm.trace("Hello", remote=True):
            lm.transformer.h[0].output[:, 99].save()
    assert isinstance(info.value, ic.InterventionError) and "output[:, 99]" in str(info.value)


def test_a_session_across_models_is_refused_on_ray(on_ray, lm_dirs):
    from intervene_compiler.remote.client import RemoteError

    gpt2, llama = ic.LanguageModel(lm_dirs["gpt2"]), ic.LanguageModel(lm_dirs["llama"])
    with pytest.raises(RemoteError, match="several models"):
        with gpt2.session(remote=True):
            with gpt2.trace("Hello"):
                gpt2.transformer.h[0].output.save()
            with llama.trace("Hello"):
                llama.model.layers[0].output.save()


def test_jobs_spread_over_both_replicas(on_ray, lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    jobs = []
    for i in range(8):
        with lm.trace("Hello world", remote=True, blocking=False) as tracer:
            lm.transformer.h[0].output[:, -1] = float(i)
            logits = lm.lm_head.output[:, -1].save()
        jobs.append((tracer.job, logits, i))
    for job, logits, i in jobs:
        job.wait(timeout=300)
        with lm.trace("Hello world"):
            lm.transformer.h[0].output[:, -1] = float(i)
            want = lm.lm_head.output[:, -1].save()
        torch.testing.assert_close(logits.value, want, rtol=1e-4, atol=1e-4)
    stats = httpx.get(on_ray.url + "/v1/stats").json()
    replicas = stats["replicas"][lm_dirs["gpt2"]]
    assert len(replicas) == 2, replicas  # both replicas ran jobs
    assert len(stats["replicas"][lm_dirs["llama"]]) == 1  # the Llama has one replica
    forwards = stats["batching"][lm_dirs["gpt2"]]["jobs_per_forward"]
    assert sum(int(k) * v for k, v in forwards.items()) >= 8


_KILL = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
names = [a for a in ray.util.list_named_actors(all_namespaces=True)
         if a["name"].startswith("SERVE_REPLICA") and sys.argv[2] in a["name"]]
assert len(names) == 1, names
replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
print("ready", flush=True)
sys.stdin.readline()
ray.kill(replica)
print("killed", flush=True)
"""


def _long_session(lm, remote_flag, **options):
    with lm.session(remote=remote_flag, **options) as session:
        with session.iter(range(300)) as i:
            with lm.trace("Hello world"):
                lm.model.layers[0].output[:, -1] = i / 1000
                last = lm.lm_head.output[:, -1].save()
    return session, last


def test_a_replica_killed_mid_job_is_retried_once(on_ray, lm_dirs):
    """``ray.kill`` on the Llama's only replica while its job runs: Ray starts a new replica, the job runs once
    more and completes with the local value (or, failing twice, ends as ERROR with the reason); never lost or
    hanging, and the service keeps serving."""
    address = re.search(r"Ray at (\S+)", (on_ray.root / "server.log").read_text()).group(1)
    with subprocess.Popen(  # connected to the cluster before the job starts: it kills at once when asked
        [sys.executable, "-c", _KILL, address, "llama"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},  # a local instance requires its token (~/.ray)
    ) as killer:
        try:
            assert killer.stdout.readline().strip() == "ready"
            lm = ic.LanguageModel(lm_dirs["llama"])
            # eager on the replica: a fresh replica's compile takes minutes on a loaded 2-core machine
            session, last = _long_session(lm, True, blocking=False, compile=False)
            client = session.job.client
            _wait_status(client, session.job.id, {"RUNNING"})
            time.sleep(0.5)  # the request has reached the replica
            killer.stdin.write("\n")
            killer.stdin.flush()
            assert killer.stdout.readline().strip() == "killed"
            killer.wait(timeout=60)
        finally:
            killer.kill()
    assert client.status(session.job.id)["status"] == "RUNNING"  # killed mid-job
    assert _wait_status(client, session.job.id, {"COMPLETED", "ERROR"}, timeout=300) == "COMPLETED"
    session.job.wait(timeout=60)
    _, want = _long_session(ic.LanguageModel(lm_dirs["llama"]), False)
    torch.testing.assert_close(last.value, want.value, rtol=1e-4, atol=1e-4)
    events = [e["status"] for e in client.status(session.job.id)["events"]]
    assert events.count("COMPLETED") == 1 and "ERROR" not in events
    log = (on_ray.root / "server.log").read_text()
    assert f"job {session.job.id}: the replica failed (ActorDiedError); sending it again" in log
    with pytest.raises(TypeError, match="remote=True"):  # locally each trace takes its own compile=
        ic.LanguageModel(lm_dirs["llama"]).session(compile=False)
    tokens, _ = _steered(ic.LanguageModel(lm_dirs["llama"]), True)  # the new replica serves
    want_tokens, _ = _steered(ic.LanguageModel(lm_dirs["llama"]), False)
    assert torch.equal(tokens, want_tokens)
