"""The service on Ray Serve (issue 22, first part): ``intervene-serve --ray --replicas 2`` on a local Ray instance
the server process starts, the same client against it, results equal to local runs, jobs on both replicas."""

from __future__ import annotations

import httpx
import pytest
import torch
from test_remote import Server, _patched_trace, _session, _steered  # noqa: E402

import intervene_compiler as ic

pytestmark = pytest.mark.remote


@pytest.fixture(scope="module")
def ray_server(lm_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_server")
    s = Server(root, [lm_dirs["gpt2"], lm_dirs["llama"]]).start("--ray", "--replicas", "2")
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
    replicas = httpx.get(on_ray.url + "/v1/stats").json()["replicas"][lm_dirs["gpt2"]]
    assert len(replicas) == 2, replicas  # both replicas ran jobs
