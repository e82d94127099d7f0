"""Shared machinery: run settings, optional peers, interleaved timing, agreement checks, result records.

Every workload follows the same order: build every system, run each once and compare what they computed (allclose)
*before* anything is timed, then time the systems interleaved (round robin, one sample of each in turn) after
warm-up, and keep medians. A workload fails only when a system of ours or plain PyTorch errors or when systems
disagree; slow numbers never fail it.
"""

from __future__ import annotations

import gc
import importlib
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# -- run settings ------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Shapes and repeat counts of one mode (``smoke`` < ``quick`` < ``full``)."""

    mode: str
    # workload 1: trace overhead
    overhead_repeats: int
    overhead_sample_s: float  # wall time of one timing sample (calls per sample are calibrated to it)
    # GPT-2-small shapes (width, heads, vocabulary, prompt length) with ``sweep_layers`` blocks
    width: int
    heads: int
    vocab: int
    tokens: int
    sweep_layers: int
    sweep_positions: tuple[int, ...]
    sweep_repeats: int
    gen_tokens: int
    gen_repeats: int
    train_steps: int
    train_batch: int
    memory_layers: int
    compile_steady_calls: int
    peers: bool = True  # run nnsight / TransformerLens rows when installed
    floors: bool = True  # run the compiled plain-PyTorch floors
    time_it: bool = True  # False: correctness checks only (the smoke test)
    device: str = "cpu"  # where every model, input and timed call lives (--device; see check_device)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def full_shapes(self) -> bool:
        return self.sweep_layers == 12 and len(self.sweep_positions) == self.tokens == 16


def settings_for(mode: str) -> Settings:
    if mode == "full":
        return Settings(
            mode="full",
            overhead_repeats=9,
            overhead_sample_s=0.25,
            width=768,
            heads=12,
            vocab=50257,
            tokens=16,
            sweep_layers=12,
            sweep_positions=tuple(range(16)),
            sweep_repeats=2,
            gen_tokens=32,
            gen_repeats=5,
            train_steps=50,
            train_batch=8,
            memory_layers=12,
            compile_steady_calls=8,
        )
    if mode == "quick":
        return Settings(
            mode="quick",
            overhead_repeats=5,
            overhead_sample_s=0.1,
            width=768,
            heads=12,
            vocab=50257,
            tokens=16,
            sweep_layers=2,
            sweep_positions=(0, 5, 10, 15),
            sweep_repeats=3,
            gen_tokens=8,
            gen_repeats=3,
            train_steps=8,
            train_batch=8,
            memory_layers=12,
            compile_steady_calls=6,
        )
    if mode == "smoke":  # the smallest shapes: correctness checks only, for tests/test_bench_smoke.py
        return Settings(
            mode="smoke",
            overhead_repeats=1,
            overhead_sample_s=0.01,
            width=32,
            heads=4,
            vocab=128,
            tokens=8,
            sweep_layers=2,
            sweep_positions=(0, 7),
            sweep_repeats=1,
            gen_tokens=3,
            gen_repeats=1,
            train_steps=3,
            train_batch=4,
            memory_layers=2,
            compile_steady_calls=1,
            time_it=False,
        )
    raise ValueError(f"unknown mode {mode!r}: use quick, full or smoke")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- optional peers ----------------------------------------------------------------------------------------------

PEER_INSTALL = (
    "pip install -c bench/constraints.txt -e '.[bench]'  (keeps torch at 2.13.0; see bench/README.md)"
)


def peer(name: str, settings: Settings | None = None) -> tuple[Any, str]:
    """``(module, version)`` of an optional peer, or ``(None, why)`` when it is missing or switched off."""
    if settings is not None and not settings.peers:
        return None, "peers switched off (--no-peers)"
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", reported as such
        return None, f"not installed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            version = "?"
    return mod, str(version)


# -- device ------------------------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """Raise ``SystemExit`` with the reason when a run cannot use ``device`` (before any workload runs)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise SystemExit(f"bench: --device {device!r} is not a torch device ({error_line(e)})") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise SystemExit(f"bench: --device {device!r}: only cpu and cuda (cuda, cuda:N) are supported")
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench: --device {device}: CUDA is not available here (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}); run on a machine with an NVIDIA GPU and a CUDA build of "
            "torch, or use --device cpu"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(
            f"bench: --device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def device_label(device: str) -> str:
    """What the report says the numbers were measured on: ``cpu``, or ``cuda:0 (<GPU name>, CUDA <version>)``."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}, CUDA {torch.version.cuda})"


# -- timing ------------------------------------------------------------------------------------------------------

# Set by ``bench.__main__.run`` (use_device) for a run on a CUDA device: every clock read of the timing helpers
# waits for the kernels queued so far. None on CPU: no synchronization at all there.
_sync: Callable[[], None] | None = None


def use_device(device: str) -> Callable[[], None] | None:
    """Make the timing helpers synchronize ``device`` (CUDA) around clock reads; returns the previous setting
    (hand it to :func:`restore_sync`)."""
    global _sync
    previous = _sync
    dev = torch.device(device)
    _sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    return previous


def restore_sync(previous: Callable[[], None] | None) -> None:
    global _sync
    _sync = previous


def sync() -> None:
    """Wait for the kernels queued on the run's CUDA device; nothing on CPU. Call before every clock read."""
    if _sync is not None:
        _sync()


def _sample(fn: Callable[[], Any], n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def calibrate(fn: Callable[[], Any], target_s: float, cap: int = 100_000) -> int:
    """Calls per sample so that one sample takes about ``target_s`` (after one warm-up call)."""
    fn()
    n = 1
    while n < cap:
        took = _sample(fn, n) * n
        if took >= target_s / 4:
            return max(1, min(cap, int(n * target_s / max(took, 1e-9))))
        n *= 4
    return cap


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, calls: dict[str, int]
) -> dict[str, list[float]]:
    """Round-robin timing: ``repeats`` rounds, each taking one sample (``calls[name]`` calls) of every system."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            samples[name].append(_sample(fn, calls[name]))
    return samples


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    gc.collect()
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- agreement checks --------------------------------------------------------------------------------------------


class Disagreement(AssertionError):
    """Two systems computed different things: the workload fails (and is not timed)."""


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float().cpu()]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flat(value[k])]
    return [torch.as_tensor(value).float()]


def check_same(
    what: str,
    results: dict[str, Any],
    reference: str,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    exact: bool = False,
) -> str:
    """Assert every system's result is allclose to ``reference``'s; returns a line describing the check."""
    ref = _flat(results[reference])
    worst = 0.0
    for name, value in results.items():
        if name == reference:
            continue
        got = _flat(value)
        if len(got) != len(ref):
            raise Disagreement(f"{what}: {name} returned {len(got)} tensors, {reference} {len(ref)}")
        for g, r in zip(got, ref):
            if g.shape != r.shape:
                raise Disagreement(f"{what}: {name} shape {tuple(g.shape)} vs {reference} {tuple(r.shape)}")
            if exact:
                if not torch.equal(g, r):
                    raise Disagreement(f"{what}: {name} differs from {reference} (exact comparison)")
                continue
            if not torch.allclose(g, r, rtol=rtol, atol=atol):
                diff = (g - r).abs().max().item()
                raise Disagreement(
                    f"{what}: {name} differs from {reference} (max abs diff {diff:.3g}, rtol={rtol}, atol={atol})"
                )
            if g.numel():
                worst = max(worst, (g - r).abs().max().item())
    others = ", ".join(n for n in results if n != reference) or "nothing else"
    how = "equal" if exact else f"allclose (rtol={rtol:g}, atol={atol:g}; max abs diff {worst:.2g})"
    return f"{what}: {others} {how} to {reference}"


# -- results -----------------------------------------------------------------------------------------------------

OK = "ok"
NOT_INSTALLED = "not installed"
NOT_AVAILABLE = "not available yet"


@dataclass
class Row:
    system: str
    group: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    status: str = OK
    note: str = ""
    role: str = ""  # "baseline" (plain PyTorch eager), "floor" (compiled plain PyTorch), "ours", "peer"


@dataclass
class Target:
    goal: str
    value: str
    met: bool | None  # None: could not be evaluated (a peer is missing, a row is unavailable)


@dataclass
class WorkloadResult:
    key: str
    title: str
    measures: str
    primary: str  # metric the ratio columns use (lower is better: a time)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    failed: str | None = None
    summary: str = ""
    seconds: float = 0.0
    mode: str = ""
    when: str = ""
    plots: list[dict] = field(default_factory=list)  # {"metric", "title", "log"}: one panel each
    device: str = "cpu"  # device_label() of the run (results saved before --device existed are CPU ones)
    # a group whose rows have another first metric than ``primary`` (the scale workload's overhead and memory
    # tables): group -> that metric, used by its ratio columns
    group_primary: dict[str, str] = field(default_factory=dict)

    def row(self, system: str, group: str = "") -> Row | None:
        for r in self.rows:
            if r.system == system and r.group == group:
                return r
        return None

    def primary_of(self, group: str) -> str:
        return self.group_primary.get(group, self.primary)

    def value(self, system: str, metric: str | None = None, group: str = "") -> float | None:
        r = self.row(system, group)
        if r is None or r.status != OK:
            return None
        return r.metrics.get(metric or self.primary_of(group))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> WorkloadResult:
        data = dict(data)
        data["rows"] = [Row(**r) for r in data.get("rows", [])]
        data["targets"] = [Target(**t) for t in data.get("targets", [])]
        return cls(**data)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def add_compile_stats(system, before: dict, after: dict) -> None:
    """Add the compile_stats() difference between two snapshots to ``system.stats``."""
    for k in ("compiles", "recompiles", "fallbacks", "cache_hits"):
        system.stats[k] = system.stats.get(k, 0) + after[k] - before[k]
    reasons = after["fallback_reasons"][len(before["fallback_reasons"]) :]
    if reasons:
        system.stats.setdefault("reasons", []).extend(reasons)


def compile_note(stats: dict) -> str:
    """Compile counters of one compiled system of ours; a fallback to eager is said first, with its reason."""
    text = (
        f"compiles {stats.get('compiles', 0)}, recompiles {stats.get('recompiles', 0)}, "
        f"fallbacks {stats.get('fallbacks', 0)}"
    )
    if stats.get("fallbacks", 0):
        why = (stats.get("reasons") or ["?"])[0]
        text = f"{FELL_BACK} ({why}); " + text
    return text


FELL_BACK = "FELL BACK TO EAGER"


PEER_FAILED = "failed on this device"


def peer_attempt(settings: Settings, role: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``; on a CUDA run a peer that errors gives ``(None, row status with the reason)`` instead of
    failing the workload (a peer without CUDA support is reported in its row). On CPU, and for every system that
    is not a peer, the error is raised as before."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a peer's on CUDA
        if role != "peer" or not settings.cuda:
            raise
        traceback.print_exc()
        return None, f"{PEER_FAILED} ({settings.device}): {error_line(e)}"


def error_line(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:300]


def guarded(result: WorkloadResult, fn: Callable[[], None]) -> WorkloadResult:
    """Run a workload body, turning an exception into a failed result (with the traceback on stderr)."""
    start = time.perf_counter()
    result.when = time.strftime("%Y-%m-%d %H:%M")
    try:
        fn()
    except Disagreement as e:
        result.failed = f"systems disagree: {e}"
    except Exception as e:  # noqa: BLE001 - report, do not hide: the workload fails
        traceback.print_exc()
        result.failed = f"error: {error_line(e)}"
    result.seconds = time.perf_counter() - start
    if result.failed:
        result.summary = f"{result.title}: FAILED ({result.failed})"
    return result


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import platform

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in ("transformers", "nnsight", "transformer_lens"):
        mod, version = peer(name)
        info[name] = version if mod is not None else "not installed"
    return info


def loadavg() -> str:
    """The machine's 1-minute load average, for a row's notes ("?" where the system has none)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "?"
