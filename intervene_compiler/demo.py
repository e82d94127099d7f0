"""Demo: activation patching and a logit lens on a tiny local GPT-2 (random seeded weights, no download).

Run ``python -m intervene_compiler.demo --out demo_out``. The tiny GPT-2 and its byte-level BPE tokenizer are
built from a config (``intervene_compiler.testing.save_tiny_lm``), saved to ``demo_out/tiny-gpt2`` and loaded
back with ``LanguageModel(folder)``, the same ``from_pretrained`` path a Hugging Face checkpoint takes. For every
(layer, position) the clean prompt's block output is patched into the corrupted prompt's run; the effect on the
last position's logit difference is drawn as a heatmap (``patching.png``) and printed. One patch is checked
against the same edit done with a plain PyTorch hook, so the demo fails loudly if the two ever disagree.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from . import LanguageModel
from .testing import save_tiny_lm

CLEAN = "When Alice and Bob met at the park, Bob handed the book to"
CORRUPTED = "When Alice and Bob met at the park, Alice handed the book to"


def activation_patching(model: LanguageModel, clean: str, corrupted: str) -> torch.Tensor:
    """(layers, positions) logit differences after patching each clean block output into the corrupted run."""
    layers = len(model.transformer.h)
    positions = len(model.tokenizer(clean)["input_ids"])
    with model.trace(clean):
        clean_hidden = [model.transformer.h[i].output.save() for i in range(layers)]
        clean_logits = model.lm_head.output[:, -1].save()
    answer = int(clean_logits.value.argmax())
    with model.trace(corrupted):
        corrupted_logits = model.lm_head.output[:, -1].save()
    wrong = (
        int(corrupted_logits.value.argmax())
        if int(corrupted_logits.value.argmax()) != answer
        else (answer + 1) % model.config.vocab_size
    )
    results = torch.zeros(layers, positions)
    for layer in range(layers):
        for pos in range(positions):
            with model.trace(corrupted):
                model.transformer.h[layer].output[:, pos] = clean_hidden[layer][:, pos]
                logits = model.lm_head.output[:, -1].save()
            results[layer, pos] = logits.value[0, answer] - logits.value[0, wrong]
    return results


def _check_against_hooks(model: LanguageModel, clean: str, corrupted: str, layer: int, pos: int) -> None:
    module: Any = model._model  # the plain transformers model, loaded by the first trace
    stash: dict[str, torch.Tensor] = {}
    handle = module.transformer.h[layer].register_forward_hook(lambda m, a, out: stash.setdefault("h", out))
    with torch.no_grad():
        module(**model.tokenizer(clean, return_tensors="pt"))
    handle.remove()

    def patch(m, a, out):
        out = out.clone()
        out[:, pos] = stash["h"][:, pos]
        return out

    handle = module.transformer.h[layer].register_forward_hook(patch)
    with torch.no_grad():
        expected = module(**model.tokenizer(corrupted, return_tensors="pt")).logits[:, -1]
    handle.remove()
    with model.trace(corrupted):
        model.transformer.h[layer].output[:, pos] = (
            model.transformer.h[layer].output[:, pos] * 0 + stash["h"][:, pos]
        )
        got = model.lm_head.output[:, -1].save()
    torch.testing.assert_close(got.value, expected)


def logit_lens(model: LanguageModel, prompt: str) -> list[str]:
    """The top token at the last position read off each block through the final norm and unembedding."""
    with model.trace(prompt):
        tops = [
            model.lm_head(model.transformer.ln_f(block.output))[:, -1].argmax(dim=-1).save()
            for block in model.transformer.h
        ]
    return [model.tokenizer.decode(t.value) for t in tops]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="folder for patching.png")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--clean", default=CLEAN, help="the prompt whose activations are patched in")
    parser.add_argument("--corrupted", default=CORRUPTED, help="same number of tokens as --clean")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    folder = save_tiny_lm(os.path.join(args.out, "tiny-gpt2"), arch="gpt2", n_layer=args.layers, hidden=64)
    model = LanguageModel(folder)  # meta device until the first trace loads the saved weights
    clean, corrupted = args.clean, args.corrupted
    n_clean, n_corrupted = (len(model.tokenizer(p)["input_ids"]) for p in (clean, corrupted))
    if n_clean != n_corrupted:
        parser.error(
            f"--clean has {n_clean} tokens and --corrupted {n_corrupted}: patching needs equal lengths"
        )
    print(model)

    start = time.perf_counter()
    results = activation_patching(model, clean, corrupted)
    elapsed = time.perf_counter() - start
    _check_against_hooks(model, clean, corrupted, layer=1, pos=n_clean - 4)
    print(f"\nactivation patching: {results.numel()} patched traces in {elapsed:.2f}s (eager backend)")
    print("logit difference after patching (rows: layer, columns: position)")
    for layer, row in enumerate(results):
        print(f"  h[{layer}] " + " ".join(f"{v:7.3f}" for v in row.tolist()))
    print("\nlogit lens, top token at the last position per layer:", logit_lens(model, clean))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "patching.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped the heatmap (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n_clean, 1 + 0.5 * args.layers))
    im = ax.imshow(results, cmap="RdBu", aspect="auto")
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_title("patching clean -> corrupted: logit difference")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path)
    print(f"heatmap written to {path}")


if __name__ == "__main__":
    main()
