"""Workload 6 of the issue, compile cost: cold compile, warm on-disk cache in a new process, payback in sweep steps.

One structure: the patching sweep's patch trace (``h[L].output[:, p] = clean[L][:, p]``, read a logit difference),
``compile=True``, with the default settings (on these shapes the trace is layered: one compiled decoder-layer
forward) and as one program of the whole model and the interventions (the layered cost model's threshold out of
reach); against them, plain ``torch.compile`` of the same model with a patch hook (layer and position as
tensors). Each measurement runs in a fresh process (``python -m bench._compile_child``): cold with an empty Inductor
cache folder, then warm in a new process on the folder the cold run filled. Compile time = first compiled call
minus a steady compiled step. Payback = compile time / (eager step - compiled step), in patch steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

from ..harness import (
    Row,
    Settings,
    Target,
    WorkloadResult,
    check_same,
    fmt_ratio,
    guarded,
    log,
    ratio,
)

KEY = "compile"
TITLE = "Compile cost"
COMPILE = "compile s"
NOTE_PAYBACK = "payback steps"
SYSTEMS = ("ours", "ours_program", "plain")
NAMES = {
    "ours": "ours compile=True",
    "ours_program": "ours compile=True, one program",
    "plain": "plain torch.compile + hook",
}


def _child(system: str, settings: Settings, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench._compile_child", "--system", system, "--mode", settings.mode]
    cmd += ["--threads", str(torch.get_num_threads()), "--device", settings.device]
    proc = subprocess.run(
        cmd, cwd=os.path.dirname(root), env=env, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile child ({system}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(settings: Settings) -> WorkloadResult:
    result = WorkloadResult(
        KEY,
        TITLE,
        measures="seconds to compile one patch-trace structure: cold (empty Inductor cache), warm on-disk cache in "
        "a new process, warm in the same process; and how many patch steps the compile takes to pay back",
        primary=COMPILE,
        mode=settings.mode,
    )
    result.plots = [{"metric": COMPILE, "title": "compile time of one structure (s)", "log": False}]

    def body():
        if not settings.time_it:
            result.summary = f"{TITLE}: not run in {settings.mode} mode (it times fresh processes)"
            return
        result.notes.append(
            f"model: {settings.sweep_layers} blocks, width {settings.width}, vocab {settings.vocab}, "
            f"{settings.tokens}-token prompt"
            + (f"; on {settings.device} in every process (steps synchronized)" if settings.cuda else "")
            + (
                ""
                if settings.full_shapes
                else f" ({settings.mode} mode: the issue's figures are for 12 blocks)"
            )
        )
        runs = {}
        for system in SYSTEMS:
            folder = tempfile.mkdtemp(prefix=f"bench_inductor_{system}_")
            try:
                # quick mode skips the warm runs no target reads
                phases = ("cold", "warm") if system == "ours" or settings.mode == "full" else ("cold",)
                for phase in phases:
                    log(f"{TITLE}: {system}, {phase} cache, new process")
                    runs[(system, phase)] = _child(system, settings, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        # checks: compiled == eager in every process, and every process computed the same values
        values = {}
        for (system, phase), r in runs.items():
            values[f"{system} {phase} eager"] = torch.tensor(r["eager_values"])
            values[f"{system} {phase} compiled"] = torch.tensor(r["compiled_values"])
        result.checks.append(
            check_same("patch-step logit differences", values, "plain cold eager", 1e-3, 1e-4)
        )

        for system in SYSTEMS:
            mine = [r for (sys_, _), r in runs.items() if sys_ == system]
            # per-step gain of compiling, pooled over this system's processes (single steps are noisy)
            eager_step = statistics.median([t for r in mine for t in r["eager_step_times"]])
            compiled_step = statistics.median([t for r in mine for t in r["compiled_step_times"]])
            gain = eager_step - compiled_step
            labels = (("cold", "cold cache, new process"), ("warm", "warm on-disk cache, new process"))
            for phase, label in labels:
                r = runs.get((system, phase))
                if r is None:
                    continue
                compile_s = max(0.0, r["first_call_s"] - compiled_step)
                payback = math.ceil(compile_s / gain) if gain > 0 else None
                metrics = {
                    COMPILE: compile_s,
                    "first call s": r["first_call_s"],
                    "eager step ms": eager_step * 1e3,
                    "compiled step ms": compiled_step * 1e3,
                    NOTE_PAYBACK: payback,
                }
                note = "payback: " + (
                    f"{payback} patch steps"
                    if payback is not None
                    else "never (compiled step not faster than eager)"
                )
                if system != "plain" and phase == "cold":
                    note += f"; compiles {r['compiles']}, recompiles {r['recompiles']}, fallbacks {r['fallbacks']}"
                result.rows.append(
                    Row(
                        NAMES[system],
                        label,
                        metrics,
                        note=note,
                        role="floor" if system == "plain" else "ours",
                    )
                )
            r = runs[(system, "cold")]
            result.rows.append(
                Row(
                    NAMES[system],
                    "warm, same process",
                    {
                        COMPILE: max(0.0, r["warm_same_process_s"] - compiled_step),
                        "first call s": r["warm_same_process_s"],
                    },
                    note="compiled program dropped (clear_compiled / dynamo.reset), compiled again",
                    role="floor" if system == "plain" else "ours",
                )
            )
        result.notes.append(
            "eager/compiled step = median over the layer x position steps of every process of that system; "
            "compile = first compiled call minus the compiled step"
        )
        _targets(result, runs)

    return guarded(result, body)


def _targets(result: WorkloadResult, runs: dict) -> None:
    ours_cold = result.value(NAMES["ours"], group="cold cache, new process")
    plain_cold = result.value(NAMES["plain"], group="cold cache, new process")
    ours_warm = result.value(NAMES["ours"], group="warm on-disk cache, new process")
    program_cold = result.value(NAMES["ours_program"], group="cold cache, new process")
    program_warm = result.value(NAMES["ours_program"], group="warm on-disk cache, new process")
    cold = runs[("ours", "cold")]
    r = ratio(ours_cold, plain_cold)
    r_program = ratio(program_cold, plain_cold)
    result.targets.append(
        Target(
            "cold compile no slower than plain torch.compile of the model",
            f"{fmt_ratio(r)} (one program: {fmt_ratio(r_program)})",
            r <= 1.0,
        )
    )
    warm_program = f"{program_warm:.1f} s" if program_warm is not None else "not run"
    result.targets.append(
        Target(
            "warm on-disk cache in a new process under 5 s",
            f"{ours_warm:.1f} s (one program: {warm_program})",
            ours_warm < 5,
        )
    )
    result.targets.append(
        Target(
            "zero recompiles over a layer x position sweep",
            f"compiles {cold['compiles']}, recompiles {cold['recompiles']}, fallbacks {cold['fallbacks']}",
            cold["recompiles"] == 0 and cold["fallbacks"] == 0,
        )
    )
    payback = result.row(NAMES["ours"], "cold cache, new process").metrics.get(NOTE_PAYBACK)
    warm_payback = result.row(NAMES["ours"], "warm on-disk cache, new process").metrics.get(NOTE_PAYBACK)
    result.summary = (
        f"{TITLE}: ours cold {ours_cold:.1f} s (one program {program_cold:.1f} s) vs plain torch.compile "
        f"{plain_cold:.1f} s ({fmt_ratio(r)}), warm cache new process {ours_warm:.1f} s; pays back after "
        + (
            f"{payback} patch steps cold, {warm_payback} warm"
            if payback is not None
            else "never (the compiled step is not faster than eager here)"
        )
    )
