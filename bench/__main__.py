"""``python -m bench run --quick|--full [--out DIR] [--only overhead,...] [--device cuda]``: see bench/README.md.

Exit status 1 when a workload errored or its systems disagreed; timings never fail a run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the workloads, write the report")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_const", const="quick", dest="mode", help="small shapes (default)"
    )
    mode.add_argument("--full", action="store_const", const="full", dest="mode", help="the issue's shapes")
    mode.add_argument(
        "--smoke", action="store_const", const="smoke", dest="mode", help="tiny shapes, checks only"
    )
    run.add_argument("--out", default="bench_out", help="output folder (default bench_out; never committed)")
    run.add_argument(
        "--only",
        default="",
        help="comma-separated workloads: overhead,patching,generation,training,memory,compile,scale,remote,serving",
    )
    run.add_argument("--threads", type=int, default=1, help="torch threads for the timed runs (default 1)")
    run.add_argument(
        "--device",
        default="cpu",
        help="where models, inputs and timed calls live: cpu (default), cuda, cuda:N (timings synchronized)",
    )
    run.add_argument(
        "--no-peers", action="store_true", help="skip nnsight / TransformerLens even when installed"
    )
    run.add_argument("--no-floors", action="store_true", help="skip the compiled plain-PyTorch floors")
    run.add_argument(
        "--warm-inductor-cache",
        action="store_true",
        help="use the user's Inductor cache instead of a fresh one (compile times are then not cold)",
    )
    report = sub.add_parser("report", help="rewrite report.md and the plots from the saved results")
    report.add_argument("--out", default="bench_out")
    report.add_argument("--mode", default="quick", choices=("quick", "full", "smoke"))
    return ap


def run(
    mode: str = "quick",
    out: str | None = "bench_out",
    only: list[str] | None = None,
    threads: int = 1,
    peers: bool = True,
    floors: bool = True,
    fresh_cache: bool = True,
    device: str = "cpu",
):
    """Run workloads; returns their results (and writes ``out`` unless it is None).

    ``device``: cpu, cuda or cuda:N; a device this machine lacks raises ``SystemExit`` with the reason before
    anything runs. The process is left as found: torch's thread count, the environment variables set here and
    the timing helpers' synchronization are restored.
    """
    import warnings

    import torch

    from .harness import check_device

    check_device(device)

    saved_env = {
        k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    }
    saved_threads = torch.get_num_threads()
    cache = None
    if fresh_cache:  # cold compiles really are cold; set before anything compiles
        cache = tempfile.mkdtemp(prefix="bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from a config: never reach the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    from . import report
    from .harness import device_label, log, restore_sync, settings_for, use_device
    from .workloads import ALL

    settings = settings_for(mode)
    settings.peers = peers
    settings.floors = floors and settings.floors
    settings.device = device
    label = device_label(device)
    # `scale` (GPT-2 medium and a 1B Llama: a 6 GB checkpoint cache, ~10 min on a 2-core CPU) and `serving` (four
    # service processes, two of them on Ray, ~3 min) run by default in --full only; --quick and --smoke run them with
    # --only
    keys = only or [k for k in ALL if k not in ("scale", "serving") or mode == "full"]
    unknown = [k for k in keys if k not in ALL]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}: choose from {list(ALL)}")
    if out is not None:
        report.protect(out)
    results = []
    start = time.perf_counter()
    saved_sync = use_device(device)
    try:
        if label != "cpu":
            log(f"device {label}: timings synchronize it before every clock read")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for key in keys:
                log(f"workload {key} ({mode})")
                result = ALL[key].run(settings)
                result.device = label
                results.append(result)
                print(result.summary, flush=True)
                if out is not None:
                    report.save(out, result)
            if out is not None:
                path = report.write(out, mode)
                print(f"report: {path} ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        restore_sync(saved_sync)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        from . import report

        print(report.write(args.out, args.mode))
        return 0
    only = [k.strip() for k in args.only.split(",") if k.strip()] or None
    results = run(
        mode=args.mode or "quick",
        out=args.out,
        only=only,
        threads=args.threads,
        peers=not args.no_peers,
        floors=not args.no_floors,
        fresh_cache=not args.warm_inductor_cache,
        device=args.device,
    )
    failed = [r for r in results if r.failed]
    for r in failed:
        print(f"FAILED {r.key}: {r.failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
