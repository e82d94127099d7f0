"""Workload 7 (issue 18), scale: the patching sweep, the trace overhead and load-time memory on real-sized models
loaded from a checkpoint folder, as users load them.

Models (random weights, saved once with ``save_pretrained`` to a cache folder, then loaded from it):

- GPT-2 medium shapes: 24 blocks, width 1024, 16 heads, vocabulary 50257 (355M parameters, 1.4 GB in float32);
- Llama 3.2 1B shapes: 16 layers, hidden 2048, intermediate 8192, 32 heads, 8 KV heads, vocabulary 128256, tied
  embeddings (1.24B parameters, 4.9 GB (4.7 GiB) in float32).

Each system loads its own model from the folder: plain PyTorch ``AutoModelForCausalLM.from_pretrained(folder)``,
ours ``ic.LanguageModel(folder, dispatch=True)``, nnsight ``nnsight.LanguageModel(folder, dispatch=True)``; each
then ``requires_grad_(False)`` as the other workloads' models. (Without ``dispatch=True`` the first trace loads the
same way: the load-memory rows measure both for ours.) ``transformers`` maps the safetensors file rather than
copying it, so the three models share the file's pages (each has its own modules and tensors). Everything runs with one torch thread, then again with all of the
machine's threads (``torch.set_num_threads``): the run's ``--threads`` does not apply here.

Per model and thread count, in one process:

- patching: a subset of the sweep (every layer x position of a 1B model is tens of minutes on a 2-core CPU): a few
  layers spread over the depth x a few positions, the clean block output patched into the corrupted run, the
  last-position logit difference read. Systems: plain hooks loop (baseline), ours loop, ours batched (one trace per layer, one
  invoke per position), nnsight loop and batched, all eager (the compiled rows are in ``patching``/``compile``).
  Agreement is checked on the first and last layer x the first and last position before anything is timed, and on
  the whole subset after; the timed sweeps are interleaved a part at a time (each system's clean run, then each
  layer's patches, system after system). The extrapolated time of every layer x position is the clean run plus
  layers x positions x the time per patch;
- trace overhead: one trace saving the last block's output, ms/call. Ours ends the forward after the block
  (early-stop truncation: the final norm and unembedding never run), so beside the raw forward (baseline) and the
  raw forward with a hook, the plain row that does the same work raises from the hook to stop the forward there.

Load memory, in a fresh child process per system (``bench/_load_child.py``): peak RSS of the load and a first
forward / trace (the forward reads every weight) through plain ``from_pretrained``, ours with ``dispatch=True``,
ours lazily (a meta model first, the weights at the first trace) and nnsight; the issue's target is ours within
1.3x of plain ``from_pretrained``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import models
from ..harness import (
    Row,
    Settings,
    Target,
    WorkloadResult,
    check_same,
    fmt_ratio,
    guarded,
    interleaved,
    loadavg,
    log,
    median,
    peer,
    peer_attempt,
    ratio,
    timed,
)
from .patching import A_TOKEN, B_TOKEN, plain_loop

KEY = "scale"
TITLE = "Scale: GPT-2 medium and a 1B Llama from a checkpoint"
SEED = 0
FORMAT = 1  # bump when what a cached checkpoint holds changes

# metrics (each group kind has its own first metric: WorkloadResult.group_primary)
SWEEP = "sweep s"
RATE = "patches/s"
FIRST = "first use s"
EVERY = "every layer x position s (extrapolated)"
MS = "ms/call"
PEAK = "peak RSS MB"
LOAD_PEAK = "load-only peak RSS MB"
ABOVE = "above imports MB"
ANON = "private peak MB"
LOAD_S = "load s"
FIRST_CALL_S = "first call s"

TARGET_RATIO = 1.3


# -- what each mode runs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    arch: str  # "gpt2" | "llama"
    blocks: str  # path of the block list
    shape: dict  # config keyword arguments
    describe: str

    def config(self):
        from transformers import GPT2Config, LlamaConfig

        if self.arch == "gpt2":
            return GPT2Config(bos_token_id=0, eos_token_id=0, pad_token_id=0, **self.shape)
        return LlamaConfig(bos_token_id=0, eos_token_id=0, **self.shape)

    @property
    def n_layers(self) -> int:
        return self.shape["n_layer"] if self.arch == "gpt2" else self.shape["num_hidden_layers"]

    @property
    def vocab(self) -> int:
        return self.shape["vocab_size"]


GPT2_MEDIUM = Family(
    "gpt2-medium",
    "GPT-2 medium",
    "gpt2",
    "transformer.h",
    dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "24 blocks, width 1024, 16 heads, vocab 50257; 355M parameters",
)
LLAMA_1B = Family(
    "llama-1b",
    "Llama 1B",
    "llama",
    "model.layers",
    dict(
        num_hidden_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    "Llama 3.2 1B shapes: 16 layers, hidden 2048, intermediate 8192, 32 heads, 8 KV heads, vocab 128256, tied "
    "embeddings; 1.24B parameters",
)
TINY_GPT2 = Family(
    "tiny-gpt2",
    "tiny GPT-2",
    "gpt2",
    "transformer.h",
    dict(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64),
    "2 blocks, width 32, vocab 128 (smoke shapes)",
)
TINY_LLAMA = Family(
    "tiny-llama",
    "tiny Llama",
    "llama",
    "model.layers",
    dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    ),
    "2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128 (smoke shapes)",
)


@dataclass
class Plan:
    families: tuple[Family, ...]
    memory: tuple[Family, ...]  # load-memory children on these
    memory_systems: tuple[str, ...]
    threads: tuple[int, ...]
    tokens: int
    n_layers: dict[str, int]  # sweep layers per family, spread over the depth
    positions: dict[str, tuple[int, ...]]  # sweep positions per family
    sweep_repeats: dict[str, int]
    overhead_repeats: dict[str, int]
    persistent: bool  # checkpoints in the cache folder (kept across runs); else a temporary folder


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_for(settings: Settings) -> Plan:
    threads = tuple(dict.fromkeys((1, all_threads())))
    everyone = ("plain", "ours", "ours_lazy", "nnsight")
    g, ll = GPT2_MEDIUM.key, LLAMA_1B.key
    if settings.mode == "full":  # about 5 min on an idle 2-core CPU, ~12 when other work doubles its load
        return Plan(
            (GPT2_MEDIUM, LLAMA_1B),
            (GPT2_MEDIUM, LLAMA_1B),
            everyone,
            threads,
            tokens=16,
            n_layers={g: 4, ll: 4},
            positions={g: (1, 3, 5, 7, 9, 11, 13, 15), ll: (3, 7, 11, 15)},
            sweep_repeats={g: 1, ll: 1},
            overhead_repeats={g: 5, ll: 3},
            persistent=True,
        )
    if settings.mode == "quick":
        return Plan(
            (GPT2_MEDIUM, LLAMA_1B),
            (GPT2_MEDIUM,),
            everyone,
            threads,
            tokens=16,
            n_layers={g: 2, ll: 2},
            positions={g: (15,), ll: (15,)},
            sweep_repeats={g: 1, ll: 1},
            overhead_repeats={g: 3, ll: 2},
            persistent=True,
        )
    tg, tl = TINY_GPT2.key, TINY_LLAMA.key
    return Plan(  # smoke: tiny shapes, checks only; the load children on the tiny GPT-2, ours and plain
        (TINY_GPT2, TINY_LLAMA),
        (TINY_GPT2,),
        ("plain", "ours"),
        threads,
        tokens=8,
        n_layers={tg: 2, tl: 2},
        positions={tg: (0, 7), tl: (0, 7)},
        sweep_repeats={},
        overhead_repeats={},
        persistent=False,
    )


def sweep_layers(n_total: int, n: int) -> list[int]:
    """``n`` layers spread evenly over ``n_total`` (the first and the last included)."""
    if n >= n_total:
        return list(range(n_total))
    if n == 1:
        return [n_total - 1]
    return sorted({round(i * (n_total - 1) / (n - 1)) for i in range(n)})


# -- checkpoints -------------------------------------------------------------------------------------------------


def cache_root() -> str:
    """Where checkpoints are saved once: ``$IC_BENCH_CACHE``, else ``$XDG_CACHE_HOME`` (``~/.cache``)
    ``/intervene_compiler/bench``."""
    explicit = os.environ.get("IC_BENCH_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "intervene_compiler", "bench")


def checkpoint(family: Family, root: str) -> tuple[str, float | None]:
    """The folder holding ``family``'s checkpoint (random weights, seeded; the small offline tokenizer), saved with
    ``save_pretrained`` under ``root`` the first time; returns ``(folder, seconds it took to save, or None when it
    was there already)``. Saved to a temporary name and renamed, so a half-written folder is never used."""
    key = json.dumps(
        {"arch": family.arch, "shape": family.shape, "seed": SEED, "format": FORMAT}, sort_keys=True
    )
    folder = os.path.join(root, f"{family.key}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    if os.path.exists(os.path.join(folder, "complete")):
        return folder, None
    from transformers import AutoModelForCausalLM

    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    log(f"{TITLE}: saving the {family.label} checkpoint to {folder} (once)")
    partial = tempfile.mkdtemp(prefix=f".{family.key}-", dir=root)
    try:
        torch.manual_seed(SEED)
        hf = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32)
        hf.save_pretrained(partial)
        del hf
        gc.collect()
        models.tokenizer().save_pretrained(partial)
        with open(os.path.join(partial, "complete"), "w") as f:
            f.write(key + "\n")
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder, time.perf_counter() - start


# -- loading the systems' models ---------------------------------------------------------------------------------


def _placement(settings: Settings) -> dict:
    return {"device_map": settings.device} if settings.cuda else {}


def load_plain(folder: str, settings: Settings):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, **_placement(settings))
    return hf.eval().requires_grad_(False)


def load_ours(folder: str, settings: Settings):
    import intervene_compiler as ic

    model = ic.LanguageModel(folder, dispatch=True, **_placement(settings))
    model.requires_grad_(False)
    return model


def load_nnsight(folder: str, settings: Settings):
    import warnings

    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dispatch=True: nnsight 0.8.1's meta path (no dispatch) cannot find the folder's tokenizer with
        # transformers 5 (it reads the pipeline class's _load_tokenizer flag from what is now a class path string)
        # unless tokenizer= is given; dispatch=True loads through the pipeline with the folder, which finds it
        model = nnsight.LanguageModel(folder, dispatch=True, **_placement(settings))
    model.requires_grad_(False)
    return model


def walk(obj: Any, path: str) -> Any:
    """``obj.a.b[3]`` for ``"a.b.3"`` (modules and envoys alike)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


# -- patching sweep ----------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A system's sweep in two parts, so that systems can be timed interleaved a layer at a time: ``clean(layers)``
    runs the clean prompt once and returns what the patches take from it; ``patch(cache, layer, positions)``
    patches each position of one layer into the corrupted run and returns the ``(P,)`` logit differences."""

    name: str
    role: str
    clean: Callable[[list[int]], Any] | None
    patch: Callable[[Any, int, list[int]], torch.Tensor] | None = None
    status: str = "ok"
    note: str = ""

    def sweep(self, layers: list[int], positions: list[int]) -> torch.Tensor:
        cache = self.clean(layers)
        return torch.stack([self.patch(cache, layer, positions) for layer in layers])


def _clean_run(model, blocks_path: str, clean) -> Callable:
    """Ours or nnsight: one trace saving the block outputs the patches take."""
    blocks = walk(model, blocks_path)

    def run_clean(layers):
        saved = []  # made outside the block: nnsight runs a block's body on its own (a name bound inside a
        # comprehension there does not reach this frame)
        with model.trace(clean):
            for i in layers:
                saved.append(blocks[i].output.save())
        return {i: getattr(s, "value", s) for i, s in zip(layers, saved)}

    return run_clean


def lm_loop(model, blocks_path: str, clean, corrupt) -> tuple[Callable, Callable]:
    """Ours or nnsight (the same code: nnsight's API), one trace per patch, as a user writes it."""
    blocks = walk(model, blocks_path)

    def run_patch(cache, layer, positions):
        out = torch.empty(len(positions), device=corrupt.device)
        for pi, pos in enumerate(positions):
            with model.trace(corrupt):
                blocks[layer].output[:, pos] = cache[layer][:, pos]
                logits = model.lm_head.output
                diff = (logits[0, -1, A_TOKEN] - logits[0, -1, B_TOKEN]).save()
            out[pi] = getattr(diff, "value", diff)
        return out

    return _clean_run(model, blocks_path, clean), run_patch


def lm_batched(model, blocks_path: str, clean, corrupt) -> tuple[Callable, Callable]:
    """One trace per layer, one invoke per position (ours and nnsight alike)."""
    blocks = walk(model, blocks_path)

    def run_patch(cache, layer, positions):
        diffs = []
        with model.trace() as tracer:
            for pos in positions:
                with tracer.invoke(corrupt):
                    blocks[layer].output[:, pos] = cache[layer][:, pos]
                    logits = model.lm_head.output
                    diffs.append((logits[:, -1, A_TOKEN] - logits[:, -1, B_TOKEN]).save())
        return torch.cat([getattr(d, "value", d) for d in diffs])

    return _clean_run(model, blocks_path, clean), run_patch


def patching_systems(family: Family, loaded: dict, clean, corrupt, nn_status: str) -> list[Sweep]:
    path = family.blocks
    systems = [Sweep("plain hooks loop", "baseline", *plain_loop(loaded["plain"], path, clean, corrupt))]
    systems.append(
        Sweep(
            "ours loop, eager",
            "ours",
            *lm_loop(loaded["ours"], path, clean, corrupt),
            note="as a user writes it",
        )
    )
    systems.append(
        Sweep(
            "ours batched, eager",
            "ours",
            *lm_batched(loaded["ours"], path, clean, corrupt),
            note="one trace per layer, one invoke per position",
        )
    )
    nn = loaded.get("nnsight")
    for name, build in (("nnsight loop", lm_loop), ("nnsight batched", lm_batched)):
        if nn is None:
            systems.append(Sweep(name, "peer", None, status=nn_status))
        else:
            systems.append(Sweep(name, "peer", *build(nn, path, clean, corrupt)))
    return systems


def run_patching(
    result: WorkloadResult,
    settings: Settings,
    plan: Plan,
    family: Family,
    threads: int,
    loaded: dict,
    nn_status: str,
) -> dict[str, dict]:
    clean = models.token_ids(_tok_settings(settings, plan, family), seed=1)
    corrupt = models.token_ids(_tok_settings(settings, plan, family), seed=2)
    layers = sweep_layers(family.n_layers, plan.n_layers[family.key])
    positions = list(plan.positions[family.key])
    patches = len(layers) * len(positions)
    every = family.n_layers * plan.tokens
    check_layers = sorted({layers[0], layers[-1]})
    check_positions = sorted({positions[0], positions[-1]})
    check_patches = len(check_layers) * len(check_positions)
    where = f"{family.label}, {_threads(threads)}"
    group = (
        f"patching: {where} ({len(layers)} of {family.n_layers} layers {layers} x {len(positions)} of "
        f"{plan.tokens} positions {positions} = {patches} patches)"
    )
    result.group_primary[group] = SWEEP
    systems = patching_systems(family, loaded, clean, corrupt, nn_status)
    live = [s for s in systems if s.clean is not None]
    first: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    for s in live:  # phase A: agreement on the first and last layer x first and last position (and first use)
        log(f"{TITLE}: {where}: patching check + first use, {s.name}")
        took, out = timed(lambda s=s: s.sweep(check_layers, check_positions))
        first[s.name] = took
        outs[s.name] = out
    what = f"{where}: logit differences, layers {check_layers} x positions {check_positions}"
    result.checks.append(check_same(what, outs, "plain hooks loop", rtol=1e-3, atol=1e-4))
    # phase B: whole sweeps, interleaved a part at a time (every system's clean run, then each layer's patches in
    # turn), so that a change of the machine's load between parts falls on every system alike
    sweeps: dict[str, list[float]] = {s.name: [] for s in live}
    cleans: dict[str, list[float]] = {s.name: [] for s in live}
    if settings.time_it:
        repeats = plan.sweep_repeats[family.key]
        for rep in range(repeats):
            log(f"{TITLE}: {where}: sweep {rep + 1}/{repeats}, every system a layer at a time")
            caches, took = {}, {}
            for s in live:
                took[s.name], caches[s.name] = timed(lambda s=s: s.clean(layers))
                cleans[s.name].append(took[s.name])
            rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in live}
            for layer in layers:
                for s in live:
                    t, row = timed(lambda s=s, layer=layer, c=caches[s.name]: s.patch(c, layer, positions))
                    took[s.name] += t
                    rows[s.name].append(row)
            for s in live:
                sweeps[s.name].append(took[s.name])
                outs[s.name] = torch.stack(rows[s.name])
        what = f"{where}: logit differences, whole sweep ({patches} patches)"
        result.checks.append(check_same(what, outs, "plain hooks loop", rtol=1e-3, atol=1e-4))
    found: dict[str, dict] = {}
    for s in systems:
        metrics: dict[str, float | None] = {}
        if s.clean is not None and sweeps[s.name]:
            steady = median(sweeps[s.name])
            clean_s = median(cleans[s.name])
            per_patch = (steady - clean_s) / patches
            metrics = {
                SWEEP: steady,
                RATE: patches / steady,
                FIRST: max(0.0, first[s.name] - clean_s - per_patch * check_patches),
                EVERY: clean_s + per_patch * every,
            }
            found[s.name] = metrics
        result.rows.append(Row(s.name, group, metrics, status=s.status, note=s.note, role=s.role))
    return found


# -- trace overhead ----------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the plain hook that ends the forward after the block (what early-stop truncation does)."""


@dataclass
class Call:
    name: str
    role: str
    fn: Callable[[], Any] | None
    saved: bool = True  # returns the block's output (compared); False: the model's logits (not compared)
    status: str = "ok"
    note: str = ""


def overhead_calls(family: Family, loaded: dict, ids, nn_status: str) -> list[Call]:
    last = family.n_layers - 1
    site = f"{family.blocks}.{last}"
    plain = loaded["plain"]
    block = plain.get_submodule(site)

    def raw():
        return plain(ids).logits

    def hooked(stop: bool):
        def call():
            box = []

            def hook(m, a, o):
                box.append(o)
                if stop:
                    raise _Stop

            handle = block.register_forward_hook(hook)
            try:
                plain(ids)
            except _Stop:
                pass
            finally:
                handle.remove()
            return box[0]

        return call

    calls = [
        Call("raw forward", "baseline", raw, saved=False),
        Call("raw forward + hook", "baseline-save", hooked(False)),
        Call(
            "raw forward + hook, stopped after the block",
            "baseline-save",
            hooked(True),
            note="the hook raises after saving: no final norm / unembedding, as ours",
        ),
    ]

    def lm_call(model):
        envoy = walk(model, site)  # looked up once

        def call():
            with model.trace(ids):
                out = envoy.output.save()
            return getattr(out, "value", out)

        return call

    calls.append(
        Call(
            "ours eager",
            "ours",
            lm_call(loaded["ours"]),
            note="ends the forward after the block (early-stop truncation)",
        )
    )
    nn = loaded.get("nnsight")
    calls.append(
        Call("nnsight", "peer", lm_call(nn))
        if nn is not None
        else Call("nnsight", "peer", None, status=nn_status)
    )
    return calls


def run_overhead(
    result: WorkloadResult,
    settings: Settings,
    plan: Plan,
    family: Family,
    threads: int,
    loaded: dict,
    nn_status: str,
) -> dict[str, float]:
    ids = models.token_ids(_tok_settings(settings, plan, family), seed=3)
    group = (
        f"overhead: {family.label}, {_threads(threads)} (one trace saving the last block's output, "
        f"{plan.tokens}-token prompt)"
    )
    result.group_primary[group] = MS
    calls = overhead_calls(family, loaded, ids, nn_status)
    live = [c for c in calls if c.fn is not None]
    log(f"{TITLE}: {family.label}, {_threads(threads)}: trace overhead check")
    outs = {c.name: c.fn() for c in live}  # the check, and a warm-up call of each
    saved = {c.name: outs[c.name] for c in live if c.saved}
    what = f"{family.label}, {_threads(threads)}: the last block's saved output"
    result.checks.append(check_same(what, saved, "raw forward + hook", rtol=1e-4, atol=1e-4))
    medians: dict[str, float] = {}
    if settings.time_it:
        log(f"{TITLE}: {family.label}, {_threads(threads)}: trace overhead timing")
        samples = interleaved(
            {c.name: c.fn for c in live}, plan.overhead_repeats[family.key], {c.name: 1 for c in live}
        )
        medians = {k: median(v) * 1e3 for k, v in samples.items()}
    for c in calls:
        metrics = {MS: medians[c.name]} if c.name in medians else {}
        result.rows.append(Row(c.name, group, metrics, status=c.status, note=c.note, role=c.role))
    return medians


# -- load memory (fresh processes) -------------------------------------------------------------------------------

MEMORY_NAMES = {
    "plain": "plain from_pretrained(folder) + forward",
    "ours": "ours LanguageModel(folder, dispatch=True) + first trace",
    "ours_lazy": "ours LanguageModel(folder) + first trace (loads then)",
    "nnsight": "nnsight LanguageModel(folder, dispatch=True) + first trace",
}
MEMORY_ROLES = {"plain": "baseline", "ours": "ours", "ours_lazy": "ours", "nnsight": "peer"}


def spawn_load_child(system: str, folder: str, tokens: int) -> subprocess.Popen:
    """Start ``bench/_load_child.py`` for ``system`` (a fresh process: nothing of this one's memory in it)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench._load_child", "--system", system, "--folder", folder]
    cmd += ["--tokens", str(tokens), "--threads", "1"]
    return subprocess.Popen(
        cmd, cwd=os.path.dirname(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def load_child_result(system: str, proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"load child ({system}) ran past 900 s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load child ({system}) failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_memory(
    result: WorkloadResult,
    settings: Settings,
    plan: Plan,
    family: Family,
    folder: str,
    nn_ok: bool,
    nn_status: str,
) -> dict[str, dict]:
    group = f"load memory: {family.label} ({family.describe}; a fresh process per row)"
    result.group_primary[group] = PEAK
    found: dict[str, dict] = {}
    systems = [k for k in plan.memory_systems if k != "nnsight" or nn_ok]
    if not settings.time_it:  # smoke: checks only, the children side by side (their load times are not shown)
        log(f"{TITLE}: {family.label}: load memory, {', '.join(systems)} (fresh processes, side by side)")
        procs = {k: spawn_load_child(k, folder, plan.tokens) for k in systems}
        found = {k: load_child_result(k, proc) for k, proc in procs.items()}
    else:  # one at a time: nothing else of this run competes with a load for the CPU or the disk
        for system in systems:
            log(f"{TITLE}: {family.label}: load memory, {system} (fresh process)")
            found[system] = load_child_result(system, spawn_load_child(system, folder, plan.tokens))
    if "plain" in found:
        logits = {MEMORY_NAMES[k]: torch.tensor(v["logits"]) for k, v in found.items()}
        what = f"{family.label}: last-position logits of each fresh process's first call"
        result.checks.append(check_same(what, logits, MEMORY_NAMES["plain"], rtol=1e-4, atol=1e-4))
    for system in plan.memory_systems:
        if system not in found:
            result.rows.append(
                Row(MEMORY_NAMES[system], group, {}, status=nn_status, role=MEMORY_ROLES[system])
            )
            continue
        data = found[system]
        metrics = {
            PEAK: data["peak_mb"],
            LOAD_PEAK: data["load_peak_mb"],
            ABOVE: data["peak_mb"] - data["imported_mb"],
            ANON: data["anon_peak_mb"],
        }
        if settings.time_it:
            metrics.update({LOAD_S: data["load_s"], FIRST_CALL_S: data["first_s"]})
        note = f"after importing torch + transformers: {data['imported_mb']:.0f} MB"
        note += f"; file-backed (mapped checkpoint) at the end: {data['file_mb_end']:.0f} MB"
        result.rows.append(Row(MEMORY_NAMES[system], group, metrics, note=note, role=MEMORY_ROLES[system]))
    plain = found.get("plain")
    ours = found.get("ours")
    if plain is not None and ours is not None:
        for metric, what in (
            ("peak_mb", "load + first trace vs from_pretrained + one forward"),
            ("load_peak_mb", "load alone vs from_pretrained alone"),
        ):
            r = ratio(ours[metric], plain[metric])
            result.targets.append(
                Target(
                    f"{family.label}: peak RSS of ic.LanguageModel(folder, dispatch=True), {what}, within "
                    f"{TARGET_RATIO}x of plain (issue 18)",
                    f"{fmt_ratio(r)} ({ours[metric]:,.0f} MB vs {plain[metric]:,.0f} MB)",
                    r is not None and r <= TARGET_RATIO,
                )
            )
    return found


# -- the workload ------------------------------------------------------------------------------------------------


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _tok_settings(settings: Settings, plan: Plan, family: Family) -> Settings:
    """Settings whose vocab / tokens / device give this family's prompts (models.token_ids draws from them)."""
    import dataclasses

    return dataclasses.replace(settings, vocab=family.vocab, tokens=plan.tokens)


def run(settings: Settings) -> WorkloadResult:
    result = WorkloadResult(
        KEY,
        TITLE,
        measures="a real-sized model loaded from a save_pretrained folder, as users load it, with 1 and with all "
        "threads: a patching sweep subset (sweep s: lower is better; ratios: time / the plain hooks loop's), "
        "one trace saving the last block's output (ms/call; ratios / the raw forward's), and the peak RSS of "
        "loading it in a fresh process (ratios / plain from_pretrained's)",
        primary=SWEEP,
        mode=settings.mode,
    )
    result.plots = [
        {"metric": SWEEP, "title": "patching sweep subset (s, log scale)", "log": True},
        {"metric": MS, "title": "one trace saving one block (ms/call, log scale)", "log": True},
        {"metric": PEAK, "title": "peak RSS, load + first call (MB)", "log": False},
    ]
    plan = plan_for(settings)

    def body():
        saved_threads = torch.get_num_threads()
        temp = None
        if plan.persistent:
            root = cache_root()
        else:
            root = temp = tempfile.mkdtemp(prefix="bench_scale_")
        nnsight, why = peer("nnsight", settings)
        nn_status = "ok" if nnsight is not None else why  # "not installed (...)" or "peers switched off"
        result.notes.append(
            "checkpoints: random weights (seeded), saved once with save_pretrained (safetensors, float32) to "
            + (
                f"{root} (kept across runs; $IC_BENCH_CACHE moves it)"
                if plan.persistent
                else "a temporary folder"
            )
            + "; every system loads its own model from it (plain AutoModelForCausalLM.from_pretrained, "
            "ic.LanguageModel(folder, dispatch=True), nnsight.LanguageModel(folder, dispatch=True); then "
            "requires_grad_(False)). transformers maps the safetensors file instead of copying it: the models "
            "share the file's pages"
        )
        subsets = "; ".join(
            f"{f.label} {len(sweep_layers(f.n_layers, plan.n_layers[f.key]))} of {f.n_layers} layers x "
            f"{len(plan.positions[f.key])} of {plan.tokens} positions"
            for f in plan.families
        )
        result.notes.append(
            f"sweep subset, not the whole sweep ({subsets}; {plan.tokens}-token prompt): every layer x position of "
            "a 1B model takes tens of minutes on a 2-core CPU. Layers spread over the depth, the first and last "
            "included. A patch costs the same at every layer and position, so 'every layer x position s' "
            "extrapolates: clean run + layers x positions x (time per patch). Eager rows only (the compiled ones "
            "are in the patching and compile workloads). Agreement: first and last layer x first and last "
            "position before timing, the whole subset after. Timed sweeps are interleaved a part at a time "
            "(each system's clean run, then each layer's patches, system after system). First use s: the check "
            "phase's time minus its steady-state cost (first touch of the mapped weights, first-use caches)"
        )
        result.notes.append(
            "ours reads the logit difference from 2 columns of the unembedding at the last position "
            "(passes/last_position.py): the plain loop and nnsight compute every position's logits, which on the "
            "1B Llama's 128256-word vocabulary is about a fifth of the forward"
        )
        result.notes.append(
            "threads: 1, then "
            + _threads(all_threads())
            + " (all this machine's: os.sched_getaffinity); on a "
            "shared machine the all-threads rows are the noisier ones"
        )
        result.notes.append(
            "load memory: peak RSS (the kernel's high-water mark of the child's own address space, VmHWM; not "
            "getrusage's ru_maxrss, which Linux starts at the spawning process's RSS) of a fresh child process "
            "that imports torch + transformers, then only loads (the system's own import included) and runs one "
            "first call that reads every weight (plain: model(ids); the others: a trace saving lm_head.output). "
            "It counts the checkpoint pages the process touched, mapped from the file, not copied: after the "
            "load alone they are mostly untouched, so 'load-only peak' is close to the import baseline for every "
            "system. Private peak: RssAnon (anonymous memory), sampled every ms"
            + ("; on CUDA runs the children still load on the CPU (host memory)" if settings.cuda else "")
        )
        summary: list[str] = []
        load_before = loadavg()
        try:
            for family in plan.families:
                folder, saved_s = checkpoint(family, root)
                if saved_s is not None:
                    result.notes.append(
                        f"{family.label}: checkpoint saved in this run ({saved_s:.0f} s, once)"
                    )
                if family in plan.memory:
                    mem = run_memory(result, settings, plan, family, folder, nnsight is not None, nn_status)
                    if "plain" in mem and "ours" in mem:
                        summary.append(
                            f"{family.label} load peak RSS ours/plain "
                            f"{fmt_ratio(ratio(mem['ours']['peak_mb'], mem['plain']['peak_mb']))}"
                        )
                log(f"{TITLE}: {family.label}: loading every system's model from {folder}")
                loaded = {"plain": load_plain(folder, settings), "ours": load_ours(folder, settings)}
                nn_rows = nn_status
                if nnsight is not None:  # on CUDA a peer that fails to load is a row status (peer_attempt)
                    nn_model, failed = peer_attempt(
                        settings, "peer", lambda f=folder: load_nnsight(f, settings)
                    )
                    if failed:
                        nn_rows = failed
                    else:
                        loaded["nnsight"] = nn_model
                try:
                    for threads in plan.threads:
                        torch.set_num_threads(threads)
                        sweep = run_patching(result, settings, plan, family, threads, loaded, nn_rows)
                        calls = run_overhead(result, settings, plan, family, threads, loaded, nn_rows)
                        if settings.time_it:
                            summary.append(_summary(family, threads, sweep, calls))
                finally:
                    torch.set_num_threads(saved_threads)
                    loaded.clear()
                    gc.collect()
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
        if load_before and settings.time_it:
            result.notes.append(
                f"machine load average (1 min) at the start {load_before}, at the end {loadavg()} on "
                f"{all_threads()} cores: above the core count, other work shared the CPU and slowed the "
                "all-threads rows most (a thread waiting for a busy core holds up the whole op)"
            )
        if settings.time_it:
            result.summary = f"{TITLE}: " + "; ".join(summary)
        else:
            result.summary = f"{TITLE}: checks passed (not timed)" + (
                f"; {'; '.join(summary)}" if summary else ""
            )

    return guarded(result, body)


def _summary(family: Family, threads: int, sweep: dict, calls: dict) -> str:
    plain = sweep.get("plain hooks loop", {}).get(SWEEP)
    loop = sweep.get("ours loop, eager", {}).get(SWEEP)
    batched = sweep.get("ours batched, eager", {}).get(SWEEP)
    nn = sweep.get("nnsight loop", {}).get(SWEEP)
    text = f"{family.label}, {_threads(threads)}: sweep plain {plain:.1f} s, ours loop {loop:.1f} s"
    text += f" ({fmt_ratio(ratio(loop, plain))}), ours batched {batched:.1f} s"
    text += f", nnsight loop {nn:.1f} s" if nn is not None else ", nnsight n/a"
    stop = calls.get("raw forward + hook, stopped after the block")
    ours = calls.get("ours eager")
    if ours is not None and stop is not None:
        text += (
            f"; trace {ours:.0f} ms vs plain hook (stopped) {stop:.0f} ms ({fmt_ratio(ratio(ours, stop))})"
        )
    return text
