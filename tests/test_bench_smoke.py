"""The benchmark harness (``python -m bench``): every workload's agreement checks on the smallest shapes.

This runs what the quick mode checks before it times anything (each system's result allclose to plain PyTorch's)
on tiny models, without timing: a workload fails only if a system errors or the systems disagree. The compile-cost
workload (fresh processes) is left to ``python -m bench run``. Peers (nnsight, TransformerLens) join when installed.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # `bench/` is a folder at the repository root, not an installed package
    sys.path.insert(0, ROOT)

pytestmark = [
    pytest.mark.bench,
    pytest.mark.filterwarnings("ignore"),  # peers' deprecation chatter is not ours to fail on
]

WORKLOADS = ["overhead", "patching", "generation", "training", "memory", "scale", "remote", "serving"]


@pytest.mark.compiled  # the overhead and generation workloads run compile=True and torch.compile
def test_every_workload_checks_agree_on_tiny_shapes(tmp_path):
    from bench.__main__ import run

    threads = torch.get_num_threads()
    from bench import harness

    results = run(
        mode="smoke", out=str(tmp_path), only=WORKLOADS, floors=False, fresh_cache=False, device="cpu"
    )
    assert torch.get_num_threads() == threads  # the harness leaves the process as it found it
    assert harness._sync is None  # no synchronization around CPU timings
    assert [r.key for r in results] == WORKLOADS
    assert {r.device for r in results} == {"cpu"}
    for r in results:
        assert r.failed is None, f"{r.key}: {r.failed}"
        assert r.checks, f"{r.key} checked nothing"
        ours = [row for row in r.rows if row.role == "ours"]
        assert ours, f"{r.key} has no row of ours"
    report = (tmp_path / "report.md").read_text()
    for r in results:
        assert f"## {r.title}" in report
    assert (tmp_path / ".gitignore").read_text().strip().endswith("*")


def test_disagreement_fails_the_workload():
    from bench.harness import Disagreement, WorkloadResult, check_same, guarded

    a = torch.ones(3)
    assert "allclose" in check_same("x", {"plain": a, "ours": a + 1e-7}, "plain")
    with pytest.raises(Disagreement, match="ours differs from plain"):
        check_same("x", {"plain": a, "ours": a + 1}, "plain")

    def body():
        check_same("x", {"plain": a, "ours": a * 2}, "plain")

    result = guarded(WorkloadResult("k", "K", "m", "s"), body)
    assert result.failed.startswith("systems disagree")
    assert "FAILED" in result.summary


def test_settings_device_reaches_models_and_inputs():
    """Every model and input helper puts what it builds on ``settings.device`` (``meta``: no GPU needed)."""
    from bench import models
    from bench.harness import settings_for

    settings = settings_for("smoke")
    assert settings.device == "cpu" and not settings.cuda
    settings.device = "meta"
    hf = models.gpt2(settings, 1)
    assert {p.device.type for p in hf.parameters()} == {"meta"}
    assert all(c.lm_head.weight.device.type == "meta" for c in models.copies(hf, 2))
    assert models.token_ids(settings).device.type == "meta"
    settings.device = "cpu"
    assert models.gpt2(settings, 1).lm_head.weight.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_exits_with_a_clear_error(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--smoke", "--device", "cuda", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "--device cuda: CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing ran, nothing was written


def test_peer_failing_on_cuda_is_a_row_status_and_the_compile_child_gets_the_device(monkeypatch):
    from bench import harness
    from bench.workloads import compile_cost

    def broken():
        raise RuntimeError("Expected all tensors to be on the same device")

    settings = harness.settings_for("smoke")
    settings.device = "cuda"  # no CUDA call is made: only what the harness does with a peer's error
    value, status = harness.peer_attempt(settings, "peer", broken)
    assert value is None and status.startswith(harness.PEER_FAILED) and "same device" in status
    with pytest.raises(RuntimeError):  # ours and plain PyTorch still fail the workload
        harness.peer_attempt(settings, "ours", broken)
    settings.device = "cpu"
    with pytest.raises(RuntimeError):  # on CPU a peer's error fails the workload as before
        harness.peer_attempt(settings, "peer", broken)

    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"system": "plain"}\n', stderr="")

    monkeypatch.setattr(compile_cost.subprocess, "run", fake_run)
    settings.device = "cuda:0"
    assert compile_cost._child("plain", settings, "/nonexistent") == {"system": "plain"}
    assert seen[0][seen[0].index("--device") + 1] == "cuda:0"


def test_device_checks_and_timing_sync():
    from bench import harness

    harness.check_device("cpu")
    with pytest.raises(SystemExit, match="not a torch device"):
        harness.check_device("gpu0")
    with pytest.raises(SystemExit, match="only cpu and cuda"):
        harness.check_device("meta")
    assert harness.device_label("cpu") == "cpu"
    previous = harness.use_device("cpu")
    try:
        assert harness._sync is None  # CPU timings read the clock without any synchronization
    finally:
        harness.restore_sync(previous)


def test_report_table_per_group_metrics_and_primary():
    """The scale workload's tables: each group shows its own metrics, and its ratios use its own first metric."""
    from bench.harness import Row, WorkloadResult
    from bench.report import table

    result = WorkloadResult("k", "K", "m", primary="sweep s", group_primary={"load": "peak MB"})
    result.rows = [
        Row("plain", "sweep", {"sweep s": 2.0}, role="baseline"),
        Row("ours", "sweep", {"sweep s": 1.0}, role="ours"),
        Row("plain", "load", {"peak MB": 100.0}, role="baseline"),
        Row("ours", "load", {"peak MB": 120.0}, role="ours"),
    ]
    text = "\n".join(table(result))
    sweep, load = text.split("**load**")
    assert "peak MB" not in sweep and "sweep s" not in load
    assert "| ours | 1.00 | 0.50x |" in sweep
    assert "| ours | 120 | 1.20x |" in load
    assert result.value("ours", group="load") == 120.0


def test_scale_sweep_layers_spread_over_the_depth():
    from bench.workloads.scale import sweep_layers

    assert sweep_layers(24, 4) == [0, 8, 15, 23]
    assert sweep_layers(16, 4) == [0, 5, 10, 15]
    assert sweep_layers(2, 4) == [0, 1]
    assert sweep_layers(16, 2) == [0, 15]
