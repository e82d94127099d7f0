"""The benchmark harness (``python -m bench``): every workload's agreement checks on the smallest shapes.

This runs what the quick mode checks before it times anything (each system's result allclose to plain PyTorch's)
on tiny models, without timing: a workload fails only if a system errors or the systems disagree. The compile-cost
workload (fresh processes) is left to ``python -m bench run``. Peers (nnsight, TransformerLens) join when installed.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # `bench/` is a folder at the repository root, not an installed package
    sys.path.insert(0, ROOT)

pytestmark = pytest.mark.filterwarnings("ignore")  # peers' deprecation chatter is not ours to fail on

WORKLOADS = ["overhead", "patching", "generation", "training", "memory"]


def test_every_workload_checks_agree_on_tiny_shapes(tmp_path):
    from bench.__main__ import run

    threads = torch.get_num_threads()
    results = run(mode="smoke", out=str(tmp_path), only=WORKLOADS, floors=False, fresh_cache=False)
    assert torch.get_num_threads() == threads  # the harness leaves the process as it found it
    assert [r.key for r in results] == WORKLOADS
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
