"""Co-batching (issue 22): queued jobs for one model run as ONE batched forward, each job its own invokes.

In-process tests build real request messages with the client (``remote=True``, the submission captured instead
of posted) and run them through ``remote.batching.run_jobs`` on a loaded model, against each job run alone and a
local run. The server test sends 32 jobs from 8 clients to a real server process with co-batching on.
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from test_remote import Server

import intervene_compiler as ic
from intervene_compiler.remote import batching
from intervene_compiler.remote.jobs import error_from, read_result
from intervene_compiler.remote.wire import pack, unpack
from intervene_compiler.tracing import remote as remote_tracing

PROMPTS = ["The quick brown fox", "A slow red dog", "Hello world", "One two three four five six"]


@pytest.fixture(scope="module")
def served(lm_dirs):
    """The model as the service holds it (weights loaded)."""
    return ic.LanguageModel(lm_dirs["gpt2"], dispatch=True)


@pytest.fixture
def capture(monkeypatch):
    """Requests the client would post, kept as messages instead."""
    messages: list[bytes] = []
    monkeypatch.setattr(ic.CONFIG.API, "HOST", "127.0.0.1:9")
    monkeypatch.setattr(
        remote_tracing,
        "_submit",
        lambda owner, doc, tensors, loc, blocking: messages.append(pack(doc, tensors)),
    )
    return messages


def _job(lm, i: int, remote: bool):
    """Job ``i``: two invokes of different lengths (left padding inside the job), a cross-invoke patch, saves."""
    with lm.trace(**({"remote": True, "blocking": False} if remote else {})) as tracer:
        with tracer.invoke(PROMPTS[i % 3]):
            clean = lm.transformer.h[i % 2].output[:, -1]
            hidden = lm.transformer.h[0].output.save()
        with tracer.invoke(PROMPTS[(i + 1) % 3]):
            lm.transformer.h[i % 2].output[:, -1] = clean * (i + 1)
            logits = lm.lm_head.output[:, -1].save()
            root = lm.output.logits[:, -2].save()
    return hidden, logits, root


def _values(outcome) -> list[torch.Tensor]:
    assert outcome.status == "COMPLETED", outcome.data
    values, _ = read_result(*unpack(outcome.data))
    return [values[k] for k in sorted(values)]


def test_cobatched_jobs_equal_their_solo_runs(lm_dirs, served, capture):
    client = ic.LanguageModel(lm_dirs["gpt2"])
    for i in range(6):
        _job(client, i, True)
    jobs = [batching.JobIn(m, 60.0, 1 << 30) for m in capture]
    requests = [batching.parse(m) for m in capture]
    keys = [batching.batch_key(r) for r in requests]
    assert all(k is not None for k in keys)
    assert len(set(keys)) == 2  # two longest lengths among the jobs: two forwards
    stats = batching.BatchStats()
    outcomes = batching.run_jobs(served, jobs, None, False, stats)
    sizes = [keys.count(k) for k in keys]
    assert stats.forwards == {n: 1 for n in sizes} and stats.reruns == 0
    local = ic.LanguageModel(lm_dirs["gpt2"])
    for i, outcome in enumerate(outcomes):
        assert outcome.carried == sizes[i]
        alone = _values(batching.run_alone(served, requests[i], jobs[i]))
        want = [v.value for v in _job(local, i, False)]
        got = _values(outcome)
        assert [g.shape for g in got] == [w.shape for w in want]  # the job's own rows and positions only
        for g, a, w in zip(got, alone, want):
            torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_failing_job_gets_its_own_error_and_the_others_complete(lm_dirs, served, capture):
    client = ic.LanguageModel(lm_dirs["gpt2"])
    _job(client, 0, True)
    with client.trace(remote=True, blocking=False) as tracer:  # the same longest length as the others
        with tracer.invoke(PROMPTS[0]):
            client.transformer.h[0].output[:, 99].save()  # out of bounds: raises inside the merged forward
        with tracer.invoke(PROMPTS[1]):
            client.transformer.h[1].output.save()
    _job(client, 3, True)
    keys = [batching.batch_key(batching.parse(m)) for m in capture]
    assert keys[0] is not None and keys.count(keys[0]) == 3
    stats = batching.BatchStats()
    outcomes = batching.run_jobs(
        served, [batching.JobIn(m, 60.0, 1 << 30) for m in capture], None, False, stats
    )
    assert [o.status for o in outcomes] == ["COMPLETED", "ERROR", "COMPLETED"]
    assert stats.reruns == 3 and stats.forwards == {1: 3}
    import json

    error = error_from(json.loads(outcomes[1].data))
    assert isinstance(error, IndexError) and "output[:, 99]" in str(error)
    assert error.loc is not None and error.loc.lineno > 0  # the user's line
    local = ic.LanguageModel(lm_dirs["gpt2"])
    for outcome, i in ((outcomes[0], 0), (outcomes[2], 3)):
        for g, w in zip(_values(outcome), (v.value for v in _job(local, i, False))):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_each_run_starts_its_own_jobs_in_arrival_order_and_stores_them_as_it_ends(lm_dirs, served, capture):
    """A worker marks a job RUNNING as its forward begins and stores it as it ends: a job taken with a long one
    but waiting behind it stays QUEUED (a server killed meanwhile runs it again), and no completed result waits for
    the rest of the batch."""
    client = ic.LanguageModel(lm_dirs["gpt2"])
    with client.trace(PROMPTS[0], remote=True, blocking=False):  # runs alone: the root output
        client.output.save()
    _job(client, 0, True)  # these two share a forward
    with client.trace(PROMPTS[3], remote=True, blocking=False):  # alone: another longest length
        client.transformer.h[0].output.save()
    _job(client, 3, True)
    events: list[tuple] = []
    outcomes = batching.run_jobs(
        served,
        [batching.JobIn(m, 60.0, 1 << 30) for m in capture],
        None,
        False,
        batching.BatchStats(),
        lambda indices: events.append(("start", *indices)),
        lambda i, outcome: events.append(("done", i, outcome.status)),
    )
    assert [o.status for o in outcomes] == ["COMPLETED"] * 4
    assert events == [
        ("start", 0),
        ("done", 0, "COMPLETED"),
        ("start", 1, 3),
        ("done", 1, "COMPLETED"),
        ("done", 3, "COMPLETED"),
        ("start", 2),
        ("done", 2, "COMPLETED"),
    ]


def test_jobs_that_cannot_share_a_forward_run_alone(lm_dirs, served, capture):
    client = ic.LanguageModel(lm_dirs["gpt2"])
    with client.trace(PROMPTS[0], remote=True, blocking=False):  # the model output holds the whole KV cache
        client.output.save()
    with client.trace(PROMPTS[0], remote=True, blocking=False):  # keyword arguments: not per row
        client.transformer.h[0].inputs.save()
    with client.trace(PROMPTS[0], remote=True, blocking=False) as tracer:  # its log lines are its own
        tracer.log(client.transformer.h[0].output.sum())
    with client.trace(PROMPTS[0], remote=True, blocking=False) as tracer:  # a stop ends the whole forward
        client.transformer.h[0].output.save()
        tracer.stop()
    with client.generate(PROMPTS[0], max_new_tokens=2, remote=True, blocking=False):
        client.generator.output.save()
    with client.edit() as edited:  # a persistent edit addresses the whole batch: it would touch every job
        client.transformer.h[0].output[:] = 0
    with edited.trace(PROMPTS[0], remote=True, blocking=False):
        edited.transformer.h[1].output.save()
    requests = [batching.parse(m) for m in capture]
    assert [batching.batch_key(r) for r in requests] == [None] * 6
    _job(client, 0, True)
    plain = batching.parse(capture[-1])
    assert batching.batch_key(plain) is not None
    stats = batching.BatchStats()
    outcomes = batching.run_jobs(
        served, [batching.JobIn(m, 60.0, 1 << 30) for m in capture], None, False, stats
    )
    assert all(o.status == "COMPLETED" for o in outcomes), [
        o.data for o in outcomes if o.status != "COMPLETED"
    ]
    assert stats.forwards == {1: 7}


def test_a_merged_structure_compiles_once_it_repeats(lm_dirs, served, capture):
    client = ic.LanguageModel(lm_dirs["gpt2"])
    for i in range(2):
        with client.trace(PROMPTS[0], remote=True, blocking=False):
            client.transformer.h[1].output[:, -1] = float(i + 1)
            client.lm_head.output[:, -1].save()
    stats = batching.BatchStats(compile_after=2)  # the server's --compile-merged-after
    rounds = [
        batching.run_jobs(served, [batching.JobIn(m, 60.0, 1 << 30) for m in capture], None, True, stats)
    ]
    assert stats.compiled == 0  # a combination seen once runs eagerly
    before = ic.compile_stats()["compiles"]
    rounds.append(
        batching.run_jobs(served, [batching.JobIn(m, 60.0, 1 << 30) for m in capture], None, True, stats)
    )
    rounds.append(
        batching.run_jobs(served, [batching.JobIn(m, 60.0, 1 << 30) for m in capture], None, True, stats)
    )
    assert stats.compiled == 2 and ic.compile_stats()["compiles"] == before + 1  # compiled once, then a hit
    for eager, compiled in zip(rounds[0], rounds[2]):
        for a, b in zip(_values(eager), _values(compiled)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _generation(lm, i: int, remote: bool, **options):
    extra = {"remote": True, "blocking": False} if remote else {}
    with lm.generate(PROMPTS[i % 2], max_new_tokens=4, **options, **extra) as tracer:
        hidden = list().save()
        with tracer.all():
            lm.model.layers[0].output[:, -1] += 0.25 * (i + 1)
            hidden.append(lm.model.layers[-1].output[:, -1])
        tokens = lm.generator.output.save()
    return tokens, hidden


def test_generations_that_run_the_same_steps_share_a_batch(lm_dirs, capture):
    served = ic.LanguageModel(lm_dirs["llama"], dispatch=True)
    client = ic.LanguageModel(lm_dirs["llama"])
    for i in range(4):
        _generation(client, i, True, min_new_tokens=4)
    _generation(client, 4, True)  # may end early on its end-of-sequence token: alone
    keys = [batching.batch_key(batching.parse(m)) for m in capture]
    assert keys[4] is None and all(k is not None for k in keys[:4])
    stats = batching.BatchStats()
    outcomes = batching.run_jobs(
        served, [batching.JobIn(m, 60.0, 1 << 30) for m in capture], None, False, stats
    )
    assert sum(n for n in stats.forwards.values()) < 5 and stats.reruns == 0
    local = ic.LanguageModel(lm_dirs["llama"])
    for i, outcome in enumerate(outcomes):
        values = _values(outcome)
        want_tokens, want_hidden = _generation(local, i, False, **({"min_new_tokens": 4} if i < 4 else {}))
        tokens = next(v for v in values if isinstance(v, torch.Tensor))
        assert torch.equal(tokens, want_tokens.value)
        hidden = next(v for v in values if isinstance(v, list))
        assert len(hidden) == len(want_hidden) == 4
        for a, b in zip(hidden, want_hidden):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merging_keeps_each_job_inside_its_own_rows(lm_dirs, capture):
    client = ic.LanguageModel(lm_dirs["gpt2"])
    for i in range(3):
        _job(client, i, True)
    requests = [batching.parse(m) for m in capture]
    graph, inputs, spans = batching.merge([r.graph for r in requests], [r.inputs for r in requests])
    assert len(graph.invokes) == 6 and len(inputs) == 6
    rows = [(r.start, r.stop) for r in graph.invokes]
    assert rows == [(i, i + 1) for i in range(6)]
    for j, span in enumerate(spans):
        own = {n.id for n in graph.nodes if span.first <= n.id <= span.last}
        for n in graph.nodes:
            if n.id in own:
                assert set(n.deps) <= own  # no reference leaves the job
                site = n.target if n.op.name in ("SITE", "SET", "UPDATE") else None
                if site is not None:
                    assert site.invoke in (2 * j, 2 * j + 1)  # and no site outside its invokes


@pytest.mark.remote
def test_32_jobs_from_8_clients_cobatched_on_the_server(lm_dirs, tmp_path, monkeypatch):
    server = Server(tmp_path, [lm_dirs["gpt2"]]).start("--max-batch", "16", "--batch-window-ms", "150")
    try:
        monkeypatch.setattr(ic.CONFIG.API, "HOST", f"127.0.0.1:{server.port}")
        monkeypatch.setattr(ic.CONFIG.API, "APIKEY", server.key)
        monkeypatch.setattr(ic.CONFIG.APP, "REMOTE_LOGGING", False)
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def client(c: int) -> None:
            lm = ic.LanguageModel(lm_dirs["gpt2"])
            try:
                for j in range(4):
                    i = c * 4 + j
                    if i == 13:  # one job raises inside its batch
                        with lm.trace(PROMPTS[1], remote=True, blocking=False) as tracer:
                            lm.transformer.h[0].output[:, 99].save()
                    else:
                        with lm.trace(remote=True, blocking=False) as tracer:
                            with tracer.invoke(PROMPTS[i % 4]):
                                lm.transformer.h[i % 2].output[:, -1] = float(i) / 10
                                saved = [lm.lm_head.output[:, -1].save()]
                                if i % 3 == 0:
                                    saved.append(lm.transformer.h[1].output.save())
                    results[i] = [tracer.job, saved if i != 13 else None]
                for j in range(4):
                    job = results[c * 4 + j][0]
                    try:
                        job.wait(timeout=300)
                    except Exception as e:  # the failing job's error, raised as a local run raises it
                        results[c * 4 + j][1] = e
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        local = ic.LanguageModel(lm_dirs["gpt2"])
        for i in range(32):
            if i == 13:
                error = results[i][1]
                assert isinstance(error, IndexError) and "output[:, 99]" in str(error)
                continue
            with local.trace(PROMPTS[i % 4]):
                local.transformer.h[i % 2].output[:, -1] = float(i) / 10
                want = [local.lm_head.output[:, -1].save()]
                if i % 3 == 0:
                    want.append(local.transformer.h[1].output.save())
            for got, w in zip(results[i][1], want):
                torch.testing.assert_close(got.value, w.value, rtol=1e-5, atol=1e-5)
        stats = httpx.get(server.url + "/v1/stats").json()
        forwards = stats["batching"][lm_dirs["gpt2"]]["jobs_per_forward"]
        assert sum(int(k) * v for k, v in forwards.items()) >= 32
        assert max(int(k) for k in forwards) > 1, forwards  # jobs shared forwards
        assert stats["jobs"].get("COMPLETED") == 31 and stats["jobs"].get("ERROR") == 1
    finally:
        server.stop()


@pytest.mark.remote
def test_the_docs_sweep_runs_against_a_server(lm_dirs, tmp_path, monkeypatch, capsys):
    """docs/serving.md's patching sweep, as written, against a server process; its effects equal local runs."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    sweep = text.split("## A patching sweep", 1)[1]
    code = re.search(r"```python\n(.*?)```", sweep, re.S).group(1)
    server = Server(tmp_path, [lm_dirs["gpt2"]]).start("--batch-window-ms", "20")
    try:
        monkeypatch.setattr(ic.CONFIG.API, "HOST", f"127.0.0.1:{server.port}")
        monkeypatch.setattr(ic.CONFIG.API, "APIKEY", server.key)
        monkeypatch.setattr(ic.CONFIG.APP, "REMOTE_LOGGING", False)
        scope = {"MODEL": lm_dirs["gpt2"]}
        exec(compile(code, "docs/serving.md", "exec"), scope)
        forwards = httpx.get(server.url + "/v1/stats").json()["batching"][lm_dirs["gpt2"]]["jobs_per_forward"]
    finally:
        server.stop()
    local = ic.LanguageModel(lm_dirs["gpt2"])
    effect, prompts, targets = scope["effect"], scope["prompts"], scope["targets"]
    assert effect.shape == (len(prompts), len(local.transformer.h))
    for i, prompt in enumerate(prompts):
        with local.trace(prompt):
            clean = local.lm_head.output[:, -1].save()
        for layer in range(effect.shape[1]):
            with local.trace(prompt):
                local.transformer.h[layer].output[:, -1] = 0
                logits = local.lm_head.output[:, -1].save()
            want = clean[0, targets[i]] - logits[0, targets[i]]
            torch.testing.assert_close(effect[i, layer], want, rtol=1e-4, atol=1e-4)
    assert max(int(k) for k in forwards) > 1, forwards  # the sweep's jobs shared forwards


def test_the_service_passes_its_batching_options_to_its_workers(lm_dirs, tmp_path):
    """--max-batch, --batch-window-ms, --compile-merged-after and --threads reach the embedded workers."""
    from intervene_compiler.remote.keys import add_key
    from intervene_compiler.remote.server import Service

    add_key(str(tmp_path / "keys.json"), "alice")
    threads = torch.get_num_threads()
    try:
        service = Service(
            {"gpt2": lm_dirs["gpt2"]},
            str(tmp_path / "data"),
            str(tmp_path / "keys.json"),
            max_batch=4,
            window=0.01,
            compile_merged_after=5,
            threads=1,
        )
        worker = service.workers["gpt2"]
        assert (worker.max_batch, worker.window, worker.batching.compile_after) == (4, 0.01, 5)
        assert torch.get_num_threads() == 1
        service.store.close()
    finally:
        torch.set_num_threads(threads)
