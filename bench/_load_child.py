"""One load-memory measurement in a fresh process (run by ``bench.workloads.scale``; prints one JSON line).

``python -m bench._load_child --system plain|ours|ours_lazy|nnsight --folder DIR --tokens 16`` imports torch and
transformers, notes the peak RSS so far (the import baseline), then does only the load and one first call:

- ``plain``: ``AutoModelForCausalLM.from_pretrained(DIR)``, then one forward ``model(ids)``;
- ``ours``: ``ic.LanguageModel(DIR, dispatch=True)``, then a first trace saving ``lm_head.output`` (the whole forward
  runs: early-stop truncation cannot skip anything, so every weight is read, as in the plain forward);
- ``ours_lazy``: ``ic.LanguageModel(DIR)`` (a meta model first), the same first trace loading the weights;
- ``nnsight``: ``nnsight.LanguageModel(DIR, dispatch=True)``, the same first trace.

The import of the system's own library (intervene_compiler, nnsight) is part of its load. Peak RSS is the kernel's
high-water mark of this process's address space (VmHWM; see ``_peak_mb`` for why not ``ru_maxrss``) read after
the load and after the first call: it
counts the checkpoint's pages that the process touched, which ``transformers`` maps from the safetensors file
rather than copies (file-backed RSS), as well as private (anonymous) memory; the private peak is sampled from
/proc/self/status every millisecond by a thread. Prints the last-position logits' first values for the parent's
agreement check.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

A_FEW = 16  # logits compared across systems


def _status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in KiB (empty where /proc is missing)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _peak_mb() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space. Not ``getrusage``'s
    ``ru_maxrss``: Linux starts that at the RSS of the process that spawned this one (``exec`` keeps the old
    address space's high-water mark, and Python spawns with ``vfork``), so a child of a parent holding a loaded
    model would report the parent's peak."""
    hwm = _status().get("VmHWM")
    if hwm is not None:
        return hwm / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: bytes on macOS, KiB elsewhere
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class AnonSampler:
    """The largest RssAnon (private memory) seen while it runs, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.001):
        self.period = period
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status().get("RssAnon", 0))
            time.sleep(self.period)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status().get("RssAnon", 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=("plain", "ours", "ours_lazy", "nnsight"), required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import warnings

    warnings.simplefilter("ignore")
    import torch
    import transformers  # noqa: F401 - part of the baseline every system pays

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (1, args.tokens), generator=g)
    imported_mb = _peak_mb()
    imported_rss = _status().get("VmRSS", 0) / 1024

    with AnonSampler() as sampler:
        start = time.perf_counter()
        if args.system == "plain":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.folder)
        elif args.system in ("ours", "ours_lazy"):
            import intervene_compiler as ic

            model = ic.LanguageModel(args.folder, dispatch=args.system == "ours")
        else:
            import nnsight

            model = nnsight.LanguageModel(args.folder, dispatch=True)
        load_s = time.perf_counter() - start
        load_peak = _peak_mb()
        load_anon = sampler.peak_kb / 1024
        start = time.perf_counter()
        if args.system == "plain":
            logits = model(ids).logits
        else:
            with model.trace(ids):
                out = model.lm_head.output.save()
            logits = getattr(out, "value", out)
        first_s = time.perf_counter() - start
    status = _status()
    print(
        json.dumps(
            {
                "system": args.system,
                "imported_mb": imported_mb,
                "imported_rss_mb": imported_rss,
                "load_peak_mb": load_peak,
                "load_anon_peak_mb": load_anon,
                "peak_mb": _peak_mb(),
                "anon_peak_mb": sampler.peak_kb / 1024,
                "file_mb_end": status.get("RssFile", 0) / 1024,
                "load_s": load_s,
                "first_s": first_s,
                "process_s": time.perf_counter() - _START,
                "logits": logits[0, -1, :A_FEW].detach().float().tolist(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
