"""Remote execution (issue 19) against a real server process on a loopback port, started and stopped here.

The server (``python -m intervene_compiler.remote``) hosts the tiny GPT-2 and Llama checkpoints; each test runs the
same code remotely and locally and compares. Hostile requests must each get a 4xx with a message, leave the
server serving, and never run code (a canary file any code execution would create never appears).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.remote import wire
from intervene_compiler.remote.client import RemoteClient, RemoteError
from intervene_compiler.testing import stop_process

pytestmark = pytest.mark.remote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process on 127.0.0.1 with a data dir and a key file of its own."""

    def __init__(self, root, models: list[str]):
        from intervene_compiler.remote.keys import add_key

        self.root = root
        self.models = models
        self.data = str(root / "data")
        self.key_file = str(root / "keys.json")
        self.key = add_key(self.key_file, "alice")
        self.bob = add_key(self.key_file, "bob", models=[models[0]])
        self.tiny = add_key(self.key_file, "tiny", max_request_bytes=500, rate_per_minute=3)
        self.hasty = add_key(self.key_file, "hasty", max_seconds=1.0, max_result_bytes=4000)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> Server:
        args = [
            sys.executable,
            "-m",
            "intervene_compiler.remote",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for m in self.models:
            args += ["--model", m]
        args += ["--data-dir", self.data, "--api-keys", self.key_file, *extra]
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.root))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def server(lm_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    s = Server(root, [lm_dirs["gpt2"], lm_dirs["llama"]]).start()
    yield s
    s.stop()


@pytest.fixture
def remote(server, monkeypatch):
    """ic.CONFIG pointing at the test server with alice's key."""
    monkeypatch.setattr(ic.CONFIG.API, "HOST", f"127.0.0.1:{server.port}")
    monkeypatch.setattr(ic.CONFIG.API, "APIKEY", server.key)
    return server


def _patched_trace(lm, remote_flag):
    with lm.trace(remote=remote_flag) as tracer:
        with tracer.invoke("The quick brown fox"):
            clean = lm.transformer.h[0].output[:, -1]
            first = lm.transformer.h[0].output.save()
        with tracer.invoke("A slow red dog"):
            lm.transformer.h[0].output[:, -1] = clean
            patched = lm.lm_head.output[:, -1].save()
            scaled = (lm.transformer.h[1].output * 2).sum(-1).save()
    return first, patched, scaled


def test_trace_runs_remotely_as_locally(remote, lm_dirs, capsys):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    first, patched, scaled = _patched_trace(lm, True)
    assert not lm.dispatched  # the weights never load on the client
    assert isinstance(first, torch.Tensor) and first.value is first
    local = _patched_trace(ic.LanguageModel(lm_dirs["gpt2"]), False)
    for got, want in zip((first, patched, scaled), local):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lines = capsys.readouterr().err.splitlines()
    statuses = [line.split(" - ", 1)[1] for line in lines if " - " in line]
    assert statuses[:2] == ["RECEIVED", "QUEUED"] and "RUNNING" in statuses and statuses[-1] == "COMPLETED"


def _steered(lm, remote_flag):
    with lm.generate("Hello world", max_new_tokens=3, remote=remote_flag) as tracer:
        hidden = list().save()
        with tracer.all():
            lm.model.layers[0].output[:, -1] += 0.5
            hidden.append(lm.model.layers[-1].output[:, -1])
        tokens = lm.generator.output.save()
    return tokens, hidden


def test_generate_runs_remotely_as_locally(remote, lm_dirs):
    tokens, hidden = _steered(ic.LanguageModel(lm_dirs["llama"]), True)
    want_tokens, want_hidden = _steered(ic.LanguageModel(lm_dirs["llama"]), False)
    assert torch.equal(tokens, want_tokens)
    assert len(hidden) == len(want_hidden) == 3
    for got, want in zip(hidden, want_hidden):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_errors_come_back_as_local_errors(remote, lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    for flag in (True, False):
        with pytest.raises(IndexError) as info:
            with lm.trace("Hello world", remote=flag):
                lm.transformer.h[0].output[:, 99].save()  # the line both errors name
        assert isinstance(info.value, ic.InterventionError)
        assert "lm.transformer.h[0].output[:, 99].save()" in str(info.value)
        with pytest.raises(ic.SetShapeError, match="at your line"):
            with lm.trace("Hello world", remote=flag):
                lm.transformer.h[0].output = torch.zeros(3)
    with pytest.raises(RemoteError, match="does not serve"):
        with ic.LanguageModel(lm_dirs["gpt2"] + "/").trace("Hello", remote=True):
            pass


def test_non_blocking_jobs(remote, lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    jobs, saved = [], []
    for text in ("one two", "three four five", "six"):
        with lm.trace(text, remote=True, blocking=False) as tracer:
            saved.append(lm.transformer.h[1].output.save())
        jobs.append(tracer.job)
    assert all(isinstance(j.id, str) for j in jobs)
    for job, proxy, text in zip(jobs, saved, ("one two", "three four five", "six")):
        values = job.result(timeout=120)
        assert job.status == "COMPLETED" and len(values) == 1
        with lm.trace(text):
            want = lm.transformer.h[1].output.save()
        torch.testing.assert_close(proxy.value, want, rtol=1e-4, atol=1e-4)


def test_structure_is_compiled_once_for_all_users(remote, lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])

    def run(v: float):
        with lm.trace("Hello world", remote=True):
            lm.transformer.h[0].output[:, -1] = v
            logits = lm.lm_head.output[:, -1].save()
        return logits

    run(1.0)
    before = httpx.get(remote.url + "/v1/stats").json()
    out = run(2.0)  # the same structure, another value: a cache hit
    after = httpx.get(remote.url + "/v1/stats").json()
    assert after["cache_hits"] > before["cache_hits"] and after["compiles"] == before["compiles"]
    with lm.trace("Hello world"):
        lm.transformer.h[0].output[:, -1] = 2.0
        want = lm.lm_head.output[:, -1].save()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


# -- the HTTP API ------------------------------------------------------------------------------------------------
def _valid_message(lm_dir: str) -> bytes:
    """A request message as the client makes it (captured before it is sent)."""
    captured = {}

    def keep(self, message, loc=None):
        captured["message"] = message
        raise _Captured

    lm = ic.LanguageModel(lm_dir)
    original = RemoteClient.submit
    RemoteClient.submit = keep  # type: ignore[method-assign]
    try:
        with pytest.raises(_Captured):
            with lm.trace("Hello world", remote=True):
                (lm.transformer.h[0].output * 2).sum(-1).save()
                lm.transformer.h[1].output.shape  # noqa: B018 - a GETATTR node
    finally:
        RemoteClient.submit = original  # type: ignore[method-assign]
    return captured["message"]


class _Captured(Exception):
    pass


def _post(server, body: bytes, key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.post(server.url + "/v1/jobs", content=body, headers=headers, timeout=60)


def test_http_answers(server, lm_dirs):
    message = _valid_message(lm_dirs["gpt2"])
    assert _post(server, message, None).status_code == 401
    assert _post(server, message, "ic-wrong").status_code == 401
    ok = _post(server, message, server.key)
    assert ok.status_code == 200, ok.text
    doc, tensors = wire.unpack(message)
    other = wire.pack({**doc, "model": lm_dirs["llama"]}, tensors)
    assert _post(server, other, server.bob).status_code == 403  # bob may use the GPT-2 only
    unknown = wire.pack({**doc, "model": "org/not-served"}, tensors)
    r = _post(server, unknown, server.key)
    assert r.status_code == 404 and "does not serve" in r.json()["detail"]
    assert _post(server, message, server.tiny).status_code == 413  # over tiny's 500 bytes
    codes = [_post(server, b"x", server.tiny).status_code for _ in range(3)]
    assert codes == [400, 400, 429]  # tiny's rate: 3 a minute (the 413 counted)
    job = ok.json()["id"]
    status = httpx.get(server.url + f"/v1/jobs/{job}", headers={"X-API-Key": server.key}).json()
    assert status["id"] == job
    assert httpx.get(server.url + f"/v1/jobs/{job}", headers={"X-API-Key": server.bob}).status_code == 404
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/jobs" in schema["paths"] and "/v1/stats" in schema["paths"]
    stats = httpx.get(server.url + "/stats").json()
    assert {"compiles", "cache_hits", "fallbacks", "queue_depth"} <= set(stats)


def _hostile(message: bytes, canary: str) -> list[tuple[str, bytes]]:
    """Malformed or malicious requests, each made from a valid one."""
    doc, tensors = wire.unpack(message)
    cases: list[tuple[str, bytes]] = []

    def with_doc(name: str, change) -> None:
        d = json.loads(json.dumps(doc))
        change(d)
        cases.append((name, wire.pack(d, tensors)))

    def call_node(fn: str, args: list) -> dict:
        return {"id": 90, "op": "call", "target": {"fn": fn}, "args": {"tuple": args}, "kwargs": []}

    names = [
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "builtins.__import__",
        "builtins.open",
        "builtins.getattr",
        "builtins.setattr",
        "builtins.compile",
        "builtins.globals",
        "builtins.vars",
        "builtins.print",
        "builtins.breakpoint",
        "importlib.import_module",
        "subprocess.run",
        "subprocess.Popen",
        "torch.load",
        "torch.save",
        "torch.from_file",
        "torch.hub.load",
        "torch.jit.load",
        "torch.Tensor.untyped_storage",
        "torch.Tensor.apply_",
        "torch.Tensor.map_",
        "torch.Tensor.register_hook",
        "torch.Tensor.set_",
        "torch.Tensor.__reduce_ex__",
        "torch.Tensor.__setstate__",
        "operator.attrgetter",
        "operator.methodcaller",
        "operator.call",
        "pickle.loads",
        "shutil.rmtree",
        "intervene_compiler.remote.keys.add_key",
        "intervene_compiler.ir.targets.resolve_target",
        "torch._C._get_tracing_state",
        "math.__loader__",
        "numpy.load",
        "posix.system",
    ]
    for fn in names:
        arg = f"touch {canary}" if fn in ("os.system", "posix.system", "subprocess.run") else "1"
        with_doc(f"call {fn}", lambda d, fn=fn, arg=arg: d["graph"]["nodes"].append(call_node(fn, [arg])))
    for attr in (
        "__class__",
        "__dict__",
        "__globals__",
        "_modules",
        "grad_fn",
        "untyped_storage",
        "__init__",
        "x y",
    ):
        with_doc(
            f"getattr {attr}",
            lambda d, a=attr: d["graph"]["nodes"].append(
                {"id": 91, "op": "getattr", "target": a, "args": {"tuple": [{"ref": 0}]}, "kwargs": []}
            ),
        )
    for method in ("__reduce__", "untyped_storage", "apply_", "register_hook", "__setattr__", "storage"):
        with_doc(
            f"method {method}",
            lambda d, m=method: d["graph"]["nodes"].append(
                {"id": 92, "op": "method", "target": m, "args": {"tuple": [{"ref": 0}]}, "kwargs": []}
            ),
        )
    with_doc(
        "setattr __class__",
        lambda d: d["graph"]["nodes"].append(
            {
                "id": 93,
                "op": "setattr",
                "target": "__class__",
                "args": {"tuple": [{"ref": 0}, 1]},
                "kwargs": [],
            }
        ),
    )
    with_doc("dtype torch.load", lambda d: d["graph"]["nodes"][1]["args"]["tuple"].append({"dtype": "load"}))
    with_doc("unknown version", lambda d: d.update(version=99))
    with_doc("no version", lambda d: d.pop("version"))
    with_doc("unknown kind", lambda d: d.update(kind="exec"))
    with_doc("no graph", lambda d: d.pop("graph"))
    with_doc("graph a list", lambda d: d.update(graph=[]))
    with_doc("missing node ref", lambda d: d["graph"]["nodes"][1].update(args={"tuple": [{"ref": 999}, 2]}))
    with_doc("unknown op", lambda d: d["graph"]["nodes"][1].update(op="system"))
    with_doc("unknown value tag", lambda d: d["graph"]["nodes"][1].update(args={"tuple": [{"pickle": "x"}]}))
    with_doc(
        "tensor index out of range", lambda d: d["graph"]["nodes"][1].update(args={"tuple": [{"tensor": 99}]})
    )
    with_doc(
        "negative tensor index", lambda d: d["graph"]["nodes"][1].update(args={"tuple": [{"tensor": -1}]})
    )
    with_doc("no inputs", lambda d: d.update(inputs={"list": []}))
    with_doc("inputs not pairs", lambda d: d.update(inputs={"list": [1, 2]}))
    with_doc("more inputs than invokes", lambda d: d["inputs"]["list"].append(d["inputs"]["list"][0]))
    with_doc("generate option eval", lambda d: d.update(kind="generate", generate={"dict": [["eval", "1"]]}))
    with_doc(
        "generate option type",
        lambda d: d.update(kind="generate", generate={"dict": [["max_new_tokens", "x"]]}),
    )
    with_doc("compile a string", lambda d: d.update(compile="yes"))
    with_doc("model a number", lambda d: d.update(model=3))
    with_doc(
        "private module path",
        lambda d: d["graph"]["nodes"].append(
            {"id": 94, "op": "module", "target": "_modules", "args": {"tuple": []}, "kwargs": []}
        ),
    )
    with_doc("100k nodes", lambda d: d["graph"].update(nodes=[d["graph"]["nodes"][0]] * 100_000))
    deep: dict = {"nodes": []}
    node = deep
    for _ in range(40):
        inner: dict = {"kind": "trace", "needs_output": False, "invokes": [], "params": [], "nodes": []}
        node["nodes"] = [
            {"id": 0, "op": "iter", "target": None, "args": {"tuple": []}, "kwargs": [], "body": [inner]}
        ]
        node = inner
    with_doc("deep graphs", lambda d: d["graph"].update(nodes=deep["nodes"]))
    from safetensors.torch import save

    marker = '"args": {"tuple": [{"ref": 0}, 2]}'
    text = json.dumps(doc)
    assert marker in text
    deep_args = '"args": ' + '{"tuple": [' * 5000 + "1" + "]}" * 5000
    named = {str(i): t.contiguous() for i, t in enumerate(tensors)}
    cases.append(("deep value", save(named, metadata={"ic": text.replace(marker, deep_args, 1)})))
    # framing
    cases.append(("empty", b""))
    cases.append(("short", b"\x01\x02"))
    cases.append(("truncated", message[: len(message) // 2]))
    cases.append(("lying header length", (10**12).to_bytes(8, "little") + message[8:]))
    header_len = int.from_bytes(message[:8], "little")
    header = json.loads(message[8 : 8 + header_len])
    cases.append(
        ("not json", header_len.to_bytes(8, "little") + b"{" * header_len + message[8 + header_len :])
    )

    def with_header(name: str, change) -> None:
        h = json.loads(json.dumps(header))
        change(h)
        raw = json.dumps(h).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        cases.append((name, len(raw).to_bytes(8, "little") + raw + message[8 + header_len :]))

    with_header("no metadata", lambda h: h.pop("__metadata__"))
    with_header("metadata not json", lambda h: h["__metadata__"].update(ic="{{"))
    with_header("metadata a list", lambda h: h["__metadata__"].update(ic="[]"))
    with_header("huge declared shape", lambda h: h["0"].update(shape=[1 << 40, 1 << 20]))
    with_header("wrong dtype", lambda h: h["0"].update(dtype="PYOBJ"))
    with_header("offsets past the end", lambda h: h["0"].update(data_offsets=[0, 1 << 40]))
    with_header("tensor named x", lambda h: h.update(x=h.pop("0")))
    cases.append(("a pickle", b"\x80\x04\x95" + b"cos\nsystem\n(Vtouch " + canary.encode() + b"\ntR."))
    cases.append(("json body", json.dumps({"graph": "x"}).encode()))
    return cases


def test_hostile_requests_get_a_4xx_and_run_nothing(server, lm_dirs, tmp_path, remote):
    canary = str(tmp_path / "canary")
    message = _valid_message(lm_dirs["gpt2"])
    cases = _hostile(message, canary)
    assert len(cases) >= 60
    for name, body in cases:
        r = _post(server, body, server.key)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert r.json().get("detail"), name
    assert not os.path.exists(canary)
    lm = ic.LanguageModel(lm_dirs["gpt2"])  # the server still serves
    with lm.trace("Hello world", remote=True):
        out = lm.transformer.h[0].output.save()
    assert out.shape[-1] == 64


# -- sessions ------------------------------------------------------------------------------------------------------
def _session(lm, remote_flag):
    with lm.session(remote=remote_flag) as session:
        with lm.trace("The quick brown fox"):
            clean = lm.transformer.h[0].output[:, -1]  # no .save(): a value passed between traces
        with lm.trace("A slow red dog"):
            lm.transformer.h[0].output[:, -1] = clean
            patched = lm.lm_head.output[:, -1].save()
        session.log("patched")
        hidden = ic.list().save()
        with session.iter(["one", "two three", "four"], return_context=True) as (text, iterator):
            with lm.trace(text):
                hidden.append(lm.transformer.h[1].output[:, -1])
                last = lm.lm_head.output[:, -1].argmax(-1).save()
            with iterator.cond(ic.apply(len, hidden) == 2):
                iterator.exit()
    return patched, hidden, last


def test_a_session_is_one_remote_job(remote, lm_dirs, capsys):
    got = _session(ic.LanguageModel(lm_dirs["gpt2"]), True)
    lines = capsys.readouterr().err
    assert lines.count(" - RECEIVED") == 1 and " - LOG: patched" in lines  # one job; its log line
    want = _session(ic.LanguageModel(lm_dirs["gpt2"]), False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert len(got[1]) == len(want[1]) == 2  # exit() after the second item
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[2], want[2])


def _lora_training(llama, init, remote_flag):
    """The walkthrough's LoRA training in a session (its weights start from ``init`` so that the remote and local
    runs start equal: inside a session ``torch.randn`` runs where the session does)."""
    from torch.utils.data import DataLoader

    module = llama.model.layers[-1].mlp
    answer = llama.tokenizer.encode(" Paris")[1]
    dataset = [["_", answer]] * 4
    with llama.session(remote=remote_flag) as session:
        WA = torch.nn.Parameter(init.clone(), requires_grad=True).save()
        WB = torch.nn.Parameter(torch.zeros(init.shape[1], init.shape[0]), requires_grad=True).save()
        optimizer = torch.optim.AdamW([WA, WB], lr=0.5)
        with session.iter(DataLoader(dataset, batch_size=2)) as batch:
            with llama.trace(batch[0]):
                module.output = torch.matmul(torch.matmul(module.input[0][0], WA), WB) + module.output
                loss = torch.nn.functional.cross_entropy(llama.lm_head.output[:, -1], batch[1])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        session.log("trained")
    return WA, WB


def test_lora_training_in_a_remote_session(remote, lm_dirs):
    init = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    got = _lora_training(ic.LanguageModel(lm_dirs["llama"]), init, True)
    want = _lora_training(ic.LanguageModel(lm_dirs["llama"]), init, False)
    assert got[1].abs().sum() > 0  # it trained
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)


def test_non_blocking_session(remote, lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.session(remote=True, blocking=False) as session:
        with lm.trace("Hello world"):
            out = lm.transformer.h[0].output.save()
    session.job.wait(timeout=120)
    with lm.trace("Hello world"):
        want = lm.transformer.h[0].output.save()
    torch.testing.assert_close(out.value, want, rtol=1e-4, atol=1e-4)


def test_time_and_result_limits(remote, lm_dirs, monkeypatch):
    """A job past its key's time limit ends as ERROR with the reason, a result over its size too; the next job on
    that model is correct."""
    monkeypatch.setattr(ic.CONFIG.API, "APIKEY", remote.hasty)
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with pytest.raises(TimeoutError, match="time limit"):
        with lm.session(remote=True) as session:
            seen = ic.list().save()
            with session.iter(["Hello world"] * 5000) as text:
                with lm.trace(text):
                    seen.append(lm.transformer.h[0].output[0, -1, 0])
    with pytest.raises(ValueError, match="more than this key's"):
        with lm.trace("Hello world " * 8, remote=True):
            lm.lm_head.output.save()  # 384 logits x ~40 positions x 4 bytes
    monkeypatch.setattr(ic.CONFIG.API, "APIKEY", remote.key)
    with lm.trace("Hello world", remote=True):
        got = lm.transformer.h[1].output.save()
    with lm.trace("Hello world"):
        want = lm.transformer.h[1].output.save()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- load and faults -----------------------------------------------------------------------------------------------
def test_eight_clients_twenty_five_jobs_each(remote, lm_dirs):
    """8 concurrent clients x 25 jobs: none lost, none mixed up, each equal to the local run."""
    import threading

    prompts = ["Hello world", "The quick brown fox", "one two three", "A slow red dog", "four"]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        lm = ic.LanguageModel(
            lm_dirs["gpt2"]
        )  # each client its own (meta) model: blocks on one model take turns
        try:
            for j in range(25):
                with lm.trace(prompts[(c + j) % len(prompts)], remote=True):
                    lm.transformer.h[0].output[:, -1] = float(c * 25 + j) / 100
                    logits = lm.lm_head.output[:, -1].save()
                results[(c, j)] = logits
        except BaseException as e:  # reported below
            errors.append(e)

    ic.CONFIG.APP.REMOTE_LOGGING = False
    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        ic.CONFIG.APP.REMOTE_LOGGING = True
    assert not errors, errors[:3]
    assert len(results) == 200
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    for (c, j), got in results.items():
        with lm.trace(prompts[(c + j) % len(prompts)]):
            lm.transformer.h[0].output[:, -1] = float(c * 25 + j) / 100
            want = lm.lm_head.output[:, -1].save()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _wait_status(client: RemoteClient, job_id: str, wanted: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)["status"]
        if status in wanted:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {wanted}")


def test_kill_and_restart(lm_dirs, tmp_path, monkeypatch):
    """kill -9 with a job running and jobs queued, restart on the same data dir: the completed result is still
    there, the running job ends as ERROR with the reason, the queued ones run, a blocking client gets its value.
    A batch window of 1 s makes the worker take the queued jobs with the running one (co-batching): they still wait
    as QUEUED, not RUNNING, so the restarted server runs them."""
    import threading

    window = ("--batch-window-ms", "1000")
    server = Server(tmp_path, [lm_dirs["gpt2"]]).start("--eager", *window)
    monkeypatch.setattr(ic.CONFIG.API, "HOST", f"127.0.0.1:{server.port}")
    monkeypatch.setattr(ic.CONFIG.API, "APIKEY", server.key)
    monkeypatch.setattr(ic.CONFIG.APP, "REMOTE_LOGGING", False)
    try:
        lm = ic.LanguageModel(lm_dirs["gpt2"])
        with lm.trace("Hello world", remote=True) as tracer:
            lm.transformer.h[0].output.save()
        done = tracer.job.id
        with lm.session(remote=True, blocking=False) as session:  # long: 3000 traces
            seen = ic.list().save()
            with session.iter(["Hello world"] * 3000) as text:
                with lm.trace(text):
                    seen.append(lm.transformer.h[0].output[0, -1, 0])
        running = session.job.id
        queued = []
        for text in ("one two", "three"):
            with lm.trace(text, remote=True, blocking=False) as tracer:
                proxy = lm.transformer.h[1].output.save()
            queued.append((tracer.job, proxy, text))
        client = RemoteClient()
        _wait_status(client, running, {"RUNNING"})
        blocking: dict = {}

        def wait_blocking() -> None:
            other = ic.LanguageModel(lm_dirs["gpt2"])
            try:
                with other.trace("blocking client", remote=True):
                    value = other.transformer.h[1].output.save()
                blocking["value"] = value
            except BaseException as e:  # a clear error is allowed, a hang is not
                blocking["error"] = e

        waiter = threading.Thread(target=wait_blocking)
        waiter.start()
        time.sleep(0.5)
        server.kill()
        server.start("--eager", *window)
        assert _wait_status(client, running, {"COMPLETED", "ERROR"}) == "ERROR"
        assert "stopped while the job was running" in json.dumps(client.status(running)["error"])
        for job, proxy, text in queued:
            job.wait(timeout=120)
            with lm.trace(text):
                want = lm.transformer.h[1].output.save()
            torch.testing.assert_close(proxy.value, want, rtol=1e-4, atol=1e-4)
        document, tensors = wire.unpack(client.download(done))  # completed before the kill: still there
        assert document["values"]
        waiter.join(timeout=180)
        assert not waiter.is_alive()
        assert "value" in blocking or isinstance(blocking.get("error"), ic.InterventionError), blocking
        stats = httpx.get(server.url + "/v1/stats").json()
        assert "RUNNING" not in stats["jobs"] and "QUEUED" not in stats["jobs"], stats
    finally:
        server.stop()


# -- generated requests: schemathesis on the OpenAPI schema, hypothesis mutations of a valid request ---------------
import schemathesis  # noqa: E402 - the fuzzing part of this file
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def api_operations(server):
    schema = schemathesis.openapi.from_dict(httpx.get(server.url + "/openapi.json").json())
    schema.config.update(base_url=server.url)
    return [result.ok() for result in schema.get_all_operations()]


@given(data=st.data())
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_http_requests_never_fail_server_side(server, api_operations, data):
    """schemathesis: requests generated from the served OpenAPI schema (every route, path parameters, headers,
    binary bodies) are answered without a server error, a refusal with a message."""
    operation = data.draw(st.sampled_from(api_operations))
    case = data.draw(operation.as_strategy())
    import requests

    with requests.Session() as session:  # closed here: an unclosed socket would warn in a later test
        response = case.call(session=session, headers={"X-API-Key": server.key})
    assert response.status_code < 500, (case, response.status_code, response.text[:300])
    if 400 <= response.status_code < 500:
        assert response.json().get("detail")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_mutated_requests_get_an_answer_and_run_nothing(server, lm_dirs, tmp_path_factory, data):
    message = _MESSAGES.get("gpt2") or _MESSAGES.setdefault("gpt2", _valid_message(lm_dirs["gpt2"]))
    if data.draw(st.booleans()):  # bytes
        body = bytearray(message)
        for _ in range(data.draw(st.integers(1, 8))):
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        body = bytes(body)
    else:  # the document: one field replaced by any JSON value
        doc, tensors = wire.unpack(message)
        paths = [p for p in _paths(doc) if p]
        path = data.draw(st.sampled_from(paths))
        value = data.draw(_JSON)
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        body = wire.pack(doc, tensors)
    r = _post(server, body, server.key)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200:  # accepted: it ends, as a result or an error, never a crash of the server
        client = RemoteClient(f"127.0.0.1:{server.port}", server.key)
        assert _wait_status(client, r.json()["id"], {"COMPLETED", "ERROR"}) in ("COMPLETED", "ERROR")
    else:
        assert r.json().get("detail")


_MESSAGES: dict[str, bytes] = {}


# -- the walkthrough's remote cells ([37]-[42], [49]) on the tiny Llama, remote against local -------------------
def test_walkthrough_remote_cells(remote, lm_dirs, capsys):
    def cells(remote_flag):
        llama = ic.LanguageModel(lm_dirs["llama"])
        out = {}
        with llama.trace("The Eiffel Tower is in the city of", remote=remote_flag):  # [37]
            hidden_states = llama.model.layers[-1].output.save()
            output = llama.output.save()
        out["hidden"], out["logits"] = hidden_states, output["logits"]
        with llama.session(remote=remote_flag) as session:  # [39]
            session.log("-- Early Stop --")
            session.exit()
        with llama.session(remote=remote_flag) as session:  # [41]
            li = ic.list()
            [li.append([num]) for num in range(0, 3)]
            li2 = ic.list().save()
            with session.iter(li) as item:
                with session.iter(item) as item_2:
                    li2.append(item_2)
        out["li2"] = li2
        with llama.session(remote=remote_flag) as session:  # [42]
            with session.iter([0, 1, 2, 3], return_context=True) as (item, iterator):
                iterator.log(item)
                with iterator.cond(item == 2):
                    iterator.exit()
        with llama.generate("Hello", max_new_tokens=3, remote=remote_flag):  # [49], without the LoRA
            generated = llama.generator.output.save()
        out["generated"] = generated
        return out

    got = cells(True)
    err = capsys.readouterr().err
    assert " - LOG: -- Early Stop --" in err
    assert [line.split("LOG: ")[1] for line in err.splitlines() if " - LOG: " in line][1:] == ["0", "1", "2"]
    want = cells(False)
    assert type(got["logits"]) is torch.Tensor or isinstance(got["logits"], torch.Tensor)
    torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    assert got["li2"] == want["li2"] == [0, 1, 2]
    assert torch.equal(got["generated"], want["generated"])


def test_options_a_remote_trace_honours_or_refuses(remote, lm_dirs):
    """``compile=False`` reaches the service (the job runs eagerly: nothing compiles); ``reuse=True`` cannot apply
    to a remote trace and raises rather than being ignored."""
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    before = httpx.get(remote.url + "/v1/stats").json()
    with lm.trace("an eager remote trace", remote=True, compile=False):
        lm.transformer.h[0].output[:, 0] = 3.0
        got = lm.transformer.h[1].output.save()
    after = httpx.get(remote.url + "/v1/stats").json()
    assert after["compiles"] == before["compiles"] and after["cache_hits"] == before["cache_hits"]
    with lm.trace("an eager remote trace"):
        lm.transformer.h[0].output[:, 0] = 3.0
        want = lm.transformer.h[1].output.save()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ic.TracingError, match="reuse=True"):
        lm.trace("Hello", remote=True, reuse=True)


def test_a_remote_block_reading_weights_says_it_cannot_yet(lm_dirs, monkeypatch):
    """The client's model is a meta model: a parameter used as a value has no data to send. A clear error at the
    user's line, before anything is posted (the host below serves nothing)."""
    monkeypatch.setattr(ic.CONFIG.API, "HOST", f"127.0.0.1:{_free_port()}")
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with pytest.raises(ic.TracingError, match="parameters or buffers") as info:
        with lm.trace("Hello", remote=True):
            lm.transformer.h[0].mlp.c_fc.weight[:] = 0
            lm.lm_head.output.save()
    assert info.value.loc is not None and info.value.loc.filename == __file__
