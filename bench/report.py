"""The output folder: ``results/<mode>/<workload>.json``, ``report.md`` (tables, targets, summary lines) and PNG plots."""

from __future__ import annotations

import json
import os
import time

from .harness import FELL_BACK, OK, WorkloadResult, fmt_ratio, machine, ratio

ORDER = ("overhead", "patching", "generation", "training", "memory", "compile", "scale", "remote", "serving")


def save(out: str, result: WorkloadResult) -> None:
    folder = os.path.join(out, "results", result.mode)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{result.key}.json"), "w") as f:
        json.dump(result.to_json(), f, indent=1)


def load_all(out: str, mode: str) -> list[WorkloadResult]:
    """Every workload result in ``out`` measured in ``mode`` (so ``--only`` runs add to one report)."""
    folder = os.path.join(out, "results", mode)
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    r = WorkloadResult.from_json(json.load(f))
                found[r.key] = r
    return [found[k] for k in ORDER if k in found]


def protect(out: str) -> None:
    """The folder is never committed: it ignores itself."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".gitignore")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# benchmark output: never committed\n*\n")


def _num(x) -> str:
    if x is None:
        return ""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def table(result: WorkloadResult) -> list[str]:
    """One table per group of rows: the metrics its rows have, and ratios of the group's first metric
    (``result.primary_of(group)``) to its baseline's and floor's."""
    lines = []
    groups = list(dict.fromkeys(r.group for r in result.rows))
    for group in groups:
        rows = [r for r in result.rows if r.group == group]
        metrics: list[str] = []
        for r in rows:
            for k in r.metrics:
                if k not in metrics:
                    metrics.append(k)
        primary = result.primary_of(group)
        base = next((r for r in rows if r.role == "baseline" and r.status == OK), None)
        floor = next((r for r in rows if r.role == "floor" and r.status == OK), None)
        if group:
            lines.append(f"**{group}**\n")
        head = ["system", *metrics]
        if base is not None:
            head.append("vs plain eager")
        if floor is not None:
            head.append("vs floor")
        head.append("notes")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            cells = [
                r.system
                + (" *(baseline)*" if r.role == "baseline" else " *(floor)*" if r.role == "floor" else "")
            ]
            if r.status != OK:
                cells += ["—"] * len(metrics)
            else:
                cells += [_num(r.metrics.get(m)) for m in metrics]
            value = r.metrics.get(primary) if r.status == OK else None
            if base is not None:
                cells.append(fmt_ratio(ratio(value, base.metrics.get(primary))) if value is not None else "")
            if floor is not None:
                cells.append(fmt_ratio(ratio(value, floor.metrics.get(primary))) if value is not None else "")
            note = r.note if r.status == OK else f"{r.status}" + (f"; {r.note}" if r.note else "")
            cells.append(note.replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(results: list[WorkloadResult], mode: str, plots: dict[str, str]) -> str:
    devices = list(dict.fromkeys(r.device for r in results)) or ["cpu"]
    gpu = any(d != "cpu" for d in devices)
    info = {"device": " + ".join(devices), **machine()}
    out = [f"# Benchmarks ({mode} mode" + (f", {' + '.join(devices)})" if gpu else ")"), ""]
    out.append(
        f"Written {time.strftime('%Y-%m-%d %H:%M')}. Machine: "
        + ", ".join(f"{k} {v}" for k, v in info.items())
    )
    out.append("")
    if len(devices) > 1:
        out.append(
            f"**These results come from more than one device ({', '.join(devices)}): each workload says which; "
            "do not compare across them. Write each device's runs to its own --out folder.**"
        )
        out.append("")
    if gpu:
        out.append(
            "On a CUDA device, models, inputs and every timed call live on the GPU; every timing synchronizes the "
            "device (torch.cuda.synchronize) before it reads the clock, and the memory workload reads the CUDA "
            "caching allocator's peak (torch.cuda.max_memory_allocated). Torch threads only affect CPU work."
        )
        out.append("")
    out.append(
        "Ratios divide a row's first metric (a time; peak memory in the memory workload and the scale workload's "
        "load tables) by the plain-PyTorch-"
        'eager baseline\'s of its table ("vs plain eager") and by the compiled plain floor\'s ("vs floor"): '
        "below 1.00x is faster or smaller. Every system of a workload ran in one process, interleaved, after its "
        "results were checked against the baseline's."
    )
    out.append("")
    out.append("## Summary")
    out.append("")
    for r in results:
        out.append(f"- {r.summary}")
    out.append("")
    out.append("## Targets (issue 6; issue 18: scale)")
    out.append("")
    out.append("| workload | target | measured | met |")
    out.append("|---|---|---|---|")
    for r in results:
        for t in r.targets:
            met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
            out.append(f"| {r.title} | {t.goal} | {t.value} | {met} |")
    out.append("")
    for r in results:
        out.append(f"## {r.title}")
        out.append("")
        where = f" on {r.device}" if gpu else ""
        out.append(f"Measures: {r.measures}. Measured {r.when}{where}, {r.seconds:.0f} s.")
        out.append("")
        if r.failed:
            out.append(f"**FAILED: {r.failed}**")
            out.append("")
        for n in r.notes:
            out.append(f"- {n}")
        for c in r.checks:
            out.append(f"- check: {c}")
        out.append("")
        out.extend(table(r))
        if r.key in plots:
            out.append(f"![{r.title}]({plots[r.key]})")
            out.append("")
    return "\n".join(out)


def plot(out: str, result: WorkloadResult) -> str | None:
    """One PNG per workload (a horizontal bar panel per plotted metric); None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    panels = []
    for spec in result.plots:
        bars = [
            (
                r.system
                + (f" [{r.group.split(' (')[0]}]" if r.group else "")
                + (" [fell back to eager]" if FELL_BACK in r.note else ""),
                r.metrics.get(spec["metric"]),
                r.role,
            )
            for r in result.rows
            if r.status == OK and r.metrics.get(spec["metric"]) is not None
        ]
        if bars:
            panels.append((spec, bars))
    if not panels:
        return None
    height = max(2.5, 0.38 * max(len(b) for _, b in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), height), squeeze=False)
    colors = {"baseline": "#7f7f7f", "floor": "#bcbd22", "ours": "#1f77b4", "peer": "#ff7f0e"}
    for ax, (spec, bars) in zip(axes[0], panels):
        labels = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        cols = [colors.get(b[2].split("-")[0], "#7f7f7f") for b in bars][::-1]
        ax.barh(labels, values, color=cols)
        if spec.get("log"):
            ax.set_xscale("log")
            # under one decade matplotlib labels the minor ticks too, and they overlap: major labels only
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for y, v in enumerate(values):
            ax.text(v, y, f" {_num(v)}", va="center", fontsize=8)
        ax.set_title(spec["title"], fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(
        f"{result.title} ({result.mode}"
        + (f", {result.device}" if result.device != "cpu" else "")
        + "): grey plain eager, olive compiled plain, blue ours, orange peers",
        fontsize=9,
    )
    fig.tight_layout()
    name = f"{result.key}.png"
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def write(out: str, mode: str) -> str:
    """Regenerate ``report.md`` and the plots from every saved result of ``mode``; returns the report's path."""
    results = load_all(out, mode)
    plots = {}
    for r in results:
        name = plot(out, r)
        if name:
            plots[r.key] = name
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(markdown(results, mode, plots))
    return path
