"""Demo: train a small transformer on key-value recall, then find where it moves the answer (activation patching).

Run ``python -m intervene_compiler.demo --out demo_out``. A prompt lists key-value pairs and ends with a query key,
``a 3 c 7 e 1 g 4 ; c``, and the answer is the value that followed that key (``7``): the model must read it from
an earlier position. A 4-layer GPT-2 (``GPT2LMHeadModel`` from a config, width 64) learns this from synthetic
prompts in about 15 s on a CPU; it is saved with its word-level tokenizer as a Hugging Face checkpoint in
``<out>/model`` (reused by later runs, rebuilt when missing, partial or corrupted) and loaded back with
``LanguageModel(folder)``, the real ``from_pretrained`` path.

Then, for every (layer, position), the clean prompt's block output is patched into the corrupted prompt's run
(the queried value changed, ``c 7`` -> ``c 9``) and the last position's logit difference between the two answers is
read. The normalized effect (0: as corrupted, 1: as clean) is drawn as a heatmap with the prompt's tokens on the x
axis (``<out>/patching.png``), and the finding is stated from the numbers. The same sweep runs eagerly, compiled
(``compile=True``: one compile, then cache hits) and with plain PyTorch hooks; the three must agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from . import LanguageModel, compile_stats, reset_compile_stats
from .testing import plain_block_outputs, plain_patch_logits

KEYS = tuple("abcdefgh")
VALUES = tuple("0123456789")
SEP = ";"
EOS = "<eos>"
CLEAN = "a 3 c 7 e 1 g 4 ; c"
CORRUPTED = "a 3 c 9 e 1 g 4 ; c"
MANIFEST = "demo_model.json"  # written last into the checkpoint folder: without it the folder is partial
MIN_ACCURACY = 0.98  # on held-out prompts; a model below it is not saved


@dataclass(frozen=True)
class Recipe:
    """How the demo's model is built and trained. It is stored in the checkpoint's manifest: a change retrains.

    Training minimizes the answer's cross-entropy at the last position plus, weighted by ``hint``, a hint: at
    each value's position, predict the key it belongs to. The hint makes the model keep each key beside its
    value from the start, so it learns the task in a few hundred steps (without it, no progress in 3,000 steps:
    the two steps of the mechanism wait for each other).
    """

    pairs: int = 4
    layers: int = 4
    width: int = 64
    heads: int = 4
    steps: int = 300
    batch: int = 128
    lr: float = 2e-3
    hint: float = 1.0
    seed: int = 0
    version: int = 1  # bump when the data or the training loop changes


# -- the task ------------------------------------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """A word-level tokenizer over the task's tokens, trained offline with ``tokenizers`` (deterministic ids),
    as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator([" ".join((*KEYS, *VALUES, SEP))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def sample_prompts(
    recipe: Recipe, tokenizer: Any, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random prompts ``k v k v ... ; q`` (distinct keys) as token ids, and each one's answer id."""
    key_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(KEYS)))
    value_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(VALUES)))
    keys = torch.rand(n, len(KEYS), generator=generator).argsort(dim=1)[:, : recipe.pairs]  # (n, pairs)
    values = torch.randint(len(VALUES), (n, recipe.pairs), generator=generator)  # (n, pairs)
    query = torch.randint(recipe.pairs, (n,), generator=generator)  # (n,)
    rows = torch.arange(n)
    pairs = torch.stack([key_ids[keys], value_ids[values]], dim=2).view(n, 2 * recipe.pairs)
    sep = torch.full((n, 1), tokenizer.convert_tokens_to_ids(SEP))
    ids = torch.cat([pairs, sep, key_ids[keys[rows, query]][:, None]], dim=1)  # (n, 2 * pairs + 2)
    return ids, value_ids[values[rows, query]]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (saving and loading shards) inside the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def train(recipe: Recipe, tokenizer: Any) -> tuple[Any, float]:
    """Train a GPT-2 on the task from seeded weights. Returns the model (eval mode) and its held-out accuracy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(recipe.seed)
    config = GPT2Config(
        n_layer=recipe.layers,
        n_embd=recipe.width,
        n_head=recipe.heads,
        vocab_size=len(tokenizer),
        n_positions=2 * recipe.pairs + 2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    data = torch.Generator().manual_seed(recipe.seed + 1)
    value_at = torch.arange(1, 2 * recipe.pairs, 2)  # the value positions; their keys sit one before
    # one thread: on matrices this small more threads only synchronize (2 threads beside other work: 5x slower)
    with _threads(1), torch.enable_grad():
        model.train()
        for _ in range(recipe.steps):
            ids, answers = sample_prompts(recipe, tokenizer, recipe.batch, data)
            logits = model(ids).logits  # (batch, positions, vocab)
            loss = torch.nn.functional.cross_entropy(logits[:, -1], answers)
            hint = logits[:, value_at].flatten(0, 1)
            loss = loss + recipe.hint * torch.nn.functional.cross_entropy(
                hint, ids[:, value_at - 1].flatten()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            warmup.step()
    model.eval()
    ids, answers = sample_prompts(recipe, tokenizer, 1000, torch.Generator().manual_seed(recipe.seed + 2))
    with torch.no_grad():
        accuracy = float((model(ids).logits[:, -1].argmax(-1) == answers).float().mean())
    return model, accuracy


# -- the cached checkpoint -----------------------------------------------------------------------------------------


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cached_checkpoint(folder: str, recipe: Recipe) -> bool:
    """Whether ``folder`` holds a complete checkpoint of ``recipe``: its manifest (written last) names this
    recipe, and every file it lists is there with the same SHA-256 and no other file is."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest["recipe"] != asdict(recipe) or set(files) != set(os.listdir(folder)) - {MANIFEST}:
            return False
        return all(_digest(os.path.join(folder, name)) == sha for name, sha in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_or_train(
    folder: str, recipe: Recipe = Recipe(), log: Callable[[str], None] = lambda line: None
) -> str:
    """The demo's checkpoint folder: reused when :func:`cached_checkpoint` says it is complete, otherwise
    (missing, partial, corrupted or of another recipe) trained again and saved. Returns ``folder``.

    Raises:
        RuntimeError: the trained model answers fewer than ``MIN_ACCURACY`` of held-out prompts.
    """
    if cached_checkpoint(folder, recipe):
        log(f"model: reusing the trained checkpoint in {folder}")
        return folder
    if os.path.exists(folder):
        log(f"model: {folder} is incomplete, corrupted or from another recipe: training again")
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    model, accuracy = train(recipe, tokenizer)
    took = time.perf_counter() - start
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(
            f"the demo model answers {accuracy:.1%} of held-out prompts after {recipe.steps} steps (expected "
            f"at least {MIN_ACCURACY:.0%}): training did not converge, nothing was saved"
        )
    partial = folder.rstrip("/\\") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    with _quiet_transformers():
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    files = {name: _digest(os.path.join(partial, name)) for name in sorted(os.listdir(partial))}
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump({"recipe": asdict(recipe), "files": files, "accuracy": accuracy}, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    log(
        f"model: trained a {recipe.layers}-layer GPT-2 (width {recipe.width}) for {recipe.steps} steps in "
        f"{took:.1f} s, {accuracy:.1%} right on 1000 held-out prompts; saved to {folder}"
    )
    return folder


# -- activation patching -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patching:
    """An activation-patching sweep: the last position's logit difference ``logit[answer] - logit[wrong]`` (the
    clean and the corrupted prompt's answers) after patching each (layer, position) of the clean run's block
    outputs into the corrupted run."""

    tokens: list[str]  # the clean prompt's tokens
    changed: list[int]  # the positions where the corrupted prompt differs
    answer: int  # token ids: the clean prompt's answer and the corrupted prompt's
    wrong: int
    answers: tuple[str, str]  # the same two as text
    clean: float  # the logit difference of the clean run and of the corrupted run
    corrupted: float
    diffs: torch.Tensor  # (layers, positions)

    @property
    def effect(self) -> torch.Tensor:
        """The normalized effect: 0 where patching left the corrupted run's difference, 1 where it restored the
        clean run's."""
        return (self.diffs - self.corrupted) / (self.clean - self.corrupted)


def _ids(model: LanguageModel, prompt: str) -> torch.Tensor:
    return model.tokenizer(prompt, return_tensors="pt")["input_ids"]


def reference_runs(model: LanguageModel, clean: str, corrupted: str) -> tuple[Patching, list[torch.Tensor]]:
    """One eager trace of each prompt: the answers, both logit differences, and the clean block outputs that
    the sweep patches in. Returns an empty-sweep :class:`Patching` and those outputs (one per layer)."""
    a, b = _ids(model, clean)[0], _ids(model, corrupted)[0]
    if a.shape != b.shape:
        raise ValueError(
            f"{clean!r} has {len(a)} tokens and {corrupted!r} {len(b)}: patching needs equal lengths"
        )
    blocks = model.transformer.h
    with torch.no_grad():
        with model.trace(clean):
            hidden = [blocks[i].output.save() for i in range(len(blocks))]
            clean_logits = model.lm_head.output[0, -1].save()
        with model.trace(corrupted):
            corrupted_logits = model.lm_head.output[0, -1].save()
    answer, wrong = int(clean_logits.value.argmax()), int(corrupted_logits.value.argmax())
    if answer == wrong:
        raise ValueError(f"both prompts are answered {model.tokenizer.decode(answer)!r}: nothing to patch")
    diff = lambda logits: float(logits.value[answer] - logits.value[wrong])  # noqa: E731
    empty = Patching(
        tokens=model.tokenizer.convert_ids_to_tokens(a.tolist()),
        changed=(a != b).nonzero().flatten().tolist(),
        answer=answer,
        wrong=wrong,
        answers=(model.tokenizer.decode(answer), model.tokenizer.decode(wrong)),
        clean=diff(clean_logits),
        corrupted=diff(corrupted_logits),
        diffs=torch.empty(len(blocks), 0),
    )
    return empty, [h.value for h in hidden]


def _cells(layers: int, positions: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    cells = [(layer, pos) for layer in range(layers) for pos in range(positions)]
    if not progress:
        yield from cells
        return
    from tqdm.auto import tqdm

    yield from tqdm(cells, desc=desc, unit="patch")


def patching_sweep(
    model: LanguageModel, clean: str, corrupted: str, compile: bool = False, progress: bool = False
) -> Patching:
    """Patch the clean run's block output at every (layer, position) into the corrupted run, one trace each.

    With ``compile=True`` the patch traces compile once: the position and the layer are Python ints the
    compiled backend lifts to inputs, so every later cell is a cache hit (the clean and corrupted reference
    runs are eager). ``progress=True`` draws a tqdm bar.
    """
    result, hidden = reference_runs(model, clean, corrupted)
    blocks, answer, wrong = model.transformer.h, result.answer, result.wrong
    diffs = torch.empty(len(blocks), len(result.tokens))
    desc = "patching, " + ("compiled" if compile else "eager")
    with torch.no_grad():
        for layer, pos in _cells(len(blocks), len(result.tokens), progress, desc):
            with model.trace(corrupted, compile=compile):
                blocks[layer].output[:, pos] = hidden[layer][:, pos]
                logits = model.lm_head.output
                diff = (logits[0, -1, answer] - logits[0, -1, wrong]).save()
            diffs[layer, pos] = diff.value
    return replace(result, diffs=diffs)


def hooks_sweep(model: LanguageModel, clean: str, corrupted: str, answer: int, wrong: int) -> torch.Tensor:
    """The same sweep with plain PyTorch forward hooks on the Hugging Face model itself (the reference)."""
    hf: Any = model.dispatch()._model
    blocks = hf.transformer.h
    clean_ids, corrupted_ids = _ids(model, clean), _ids(model, corrupted)
    cache = plain_block_outputs(hf, clean_ids)
    diffs = torch.empty(len(blocks), clean_ids.shape[1])
    for layer, pos in _cells(len(blocks), clean_ids.shape[1], False, ""):
        logits = plain_patch_logits(hf, corrupted_ids, layer, pos, cache[layer][:, pos])[0]
        diffs[layer, pos] = logits[answer] - logits[wrong]
    return diffs


def check_agree(
    name: str, got: torch.Tensor, reference: torch.Tensor, what: str = "plain PyTorch hooks"
) -> None:
    """Fail loudly when a sweep disagrees with the reference (atol 1e-3 on logit differences)."""
    if not torch.allclose(got, reference, rtol=1e-4, atol=1e-3):
        layer, pos = divmod(int((got - reference).abs().argmax()), got.shape[1])
        raise AssertionError(
            f"the {name} sweep disagrees with {what} at layer {layer}, position {pos}: "
            f"{float(got[layer, pos]):.5f} != {float(reference[layer, pos]):.5f}"
        )


# -- the finding ---------------------------------------------------------------------------------------------------


def mover(result: Patching) -> tuple[int, int | None]:
    """Where the sweep says the answer starts and which block moves it: ``(source, block)``, ``source`` the
    changed position with the largest effect at block 0's output, ``block`` the first block whose output carries
    the answer at the last position (effect >= 0.5) while the previous block's still carried it at ``source``;
    ``block`` is None when the numbers show no such move."""
    effect, last = result.effect, len(result.tokens) - 1
    source = max(result.changed, key=lambda pos: float(effect[0, pos]))
    for block in range(1, len(effect)):
        if float(effect[block, last]) >= 0.5:
            return source, block if float(effect[block - 1, source]) >= 0.5 else None
    return source, None


def finding(result: Patching) -> str:
    """The sweep's finding in plain sentences, derived from the numbers: where the answer is at each layer."""
    effect, last = result.effect, len(result.tokens) - 1
    source, block = mover(result)
    name = lambda pos: f"{result.tokens[pos]!r} (position {pos})"  # noqa: E731
    values = lambda pos, layers: ", ".join(_num(effect[i, pos]) for i in layers)  # noqa: E731
    if block is None:
        best = [int(row.argmax()) for row in effect]
        per_layer = "; ".join(f"h[{i}]: {name(p)} {_num(effect[i, p])}" for i, p in enumerate(best))
        per_layer = f"the largest effect per layer, {per_layer}"
        return f"The numbers show no single move from the changed token to the last position ({per_layer})."
    others = [p for p in range(len(result.tokens)) if p not in (source, last)]
    spread = _num(effect[:, others].abs().max()) if others else "0.00"
    blocks = "block 0" if block == 1 else f"blocks 0-{block - 1}"
    return (
        f"Block {block} moves the answer. At the output of {blocks} it sits at the changed token "
        f"{name(source)}: patching there restores {values(source, range(block))} of the clean logit difference, "
        f"patching the last position {values(last, range(block))}. From block {block} on it sits at the last "
        f"position {name(last)}, where it is read out ({values(last, range(block, len(effect)))}). Patching any "
        f"other position changes at most {spread} of it."
    )


def _num(value: Any) -> str:
    """A fraction with two decimals, never ``-0.00``."""
    return f"{round(float(value), 2) + 0.0:.2f}"


def logit_lens(model: LanguageModel, prompt: str, token: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Each block's output unembedded (final norm, then ``lm_head``) at every position of ``prompt``: the
    probability of ``token`` (layers, positions) and the top token of each cell."""
    blocks = model.transformer.h
    with torch.no_grad(), model.trace(prompt):
        probs = [model.lm_head(model.transformer.ln_f(b.output))[0].softmax(-1).save() for b in blocks]
    grid = torch.stack([p.value for p in probs])  # (layers, positions, vocab)
    tops = [model.tokenizer.convert_ids_to_tokens(row.argmax(-1).tolist()) for row in grid]
    return grid[:, :, token], tops


def draw(
    result: Patching, out: str, lens: tuple[torch.Tensor, list[list[str]]] | None = None
) -> dict[str, Any]:
    """Write the heatmap ``patching.png`` (and ``logit_lens.png`` when ``lens`` is given, as :func:`logit_lens`
    returns it for the clean answer) into ``out``. Returns each path written and the matplotlib Axes drawn."""
    from . import plot

    os.makedirs(out, exist_ok=True)
    layers = [f"h[{i}]" for i in range(len(result.diffs))]
    path = os.path.join(out, "patching.png")
    title = "Patching clean -> corrupted: normalized effect (0 = corrupted, 1 = clean)"
    drawn = {path: plot.patching_heatmap(result.effect, result.tokens, layers, title, path)[1]}
    if lens is not None:
        path = os.path.join(out, "logit_lens.png")
        title = f"Logit lens of the clean prompt: P({result.answers[0]!r}), top token per cell"
        drawn[path] = plot.logit_lens(lens[0], result.tokens, lens[1], layers, title, path)[1]
    return drawn


# -- the demo ------------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _table(result: Patching) -> list[str]:
    width = max(6, *(len(t) + 2 for t in result.tokens))
    lines = ["       " + "".join(f"{t:>{width}}" for t in result.tokens)]
    for layer, row in enumerate(result.effect.tolist()):
        lines.append(f"  h[{layer}]" + "".join(f"{_num(v):>{width}}" for v in row))
    return lines


def _lens_line(result: Patching, lens: tuple[torch.Tensor, list[list[str]]]) -> str:
    probs, tops = lens[0][:, -1].tolist(), [row[-1] for row in lens[1]]
    first = next((i for i, top in enumerate(tops) if top == result.answers[0]), None)
    where = f"from block {first} on" if first is not None else "at no block"
    return (
        f"logit lens: at the last position the answer {result.answers[0]!r} is the top token {where} "
        f"(its probability per block: {', '.join(_num(p) for p in probs)})"
    )


def run(out: str, clean: str = CLEAN, corrupted: str = CORRUPTED, progress: bool = True) -> Patching:
    """The whole demo, printed: train or reuse the model, sweep eagerly, compiled and with plain hooks, check
    that they agree, state the finding, draw the heatmaps. Returns the compiled sweep."""
    folder = load_or_train(os.path.join(out, "model"), log=print)
    with _quiet_transformers():
        model = LanguageModel(folder).dispatch()  # from_pretrained on the saved checkpoint
    seconds: dict[str, float] = {}
    seconds["eager backend"], eager = _timed(
        lambda: patching_sweep(model, clean, corrupted, progress=progress)
    )
    reset_compile_stats()
    sweep = lambda: patching_sweep(model, clean, corrupted, compile=True, progress=progress)  # noqa: E731
    seconds["compile=True, first sweep"], _ = _timed(sweep)
    seconds["compile=True, second sweep"], compiled = _timed(sweep)
    stats = compile_stats()
    answers = compiled.answer, compiled.wrong
    seconds["plain PyTorch hooks"], hooks = _timed(lambda: hooks_sweep(model, clean, corrupted, *answers))
    check_agree("eager", eager.diffs, hooks)
    check_agree("compiled", compiled.diffs, hooks)
    _report(compiled, clean, corrupted, seconds, stats)
    lens = logit_lens(model, clean, compiled.answer)
    print(_lens_line(compiled, lens))
    try:
        paths = list(draw(compiled, out, lens))
    except ImportError as e:
        print(f"no heatmap: {e}")
    else:
        print("wrote", " and ".join(paths))
    return compiled


def _report(
    result: Patching, clean: str, corrupted: str, seconds: dict[str, float], stats: dict[str, Any]
) -> None:
    layers, positions = result.diffs.shape
    print(f"\nclean prompt:     {clean}  -> {result.answers[0]}")
    print(f"corrupted prompt: {corrupted}  -> {result.answers[1]}")
    print(
        f"metric: logit[{result.answers[0]!r}] - logit[{result.answers[1]!r}] at the last position: "
        f"{result.clean:+.2f} clean, {result.corrupted:+.2f} corrupted"
    )
    print("\nnormalized patching effect (0 = corrupted, 1 = clean); rows: block output, columns: token")
    print("\n".join(_table(result)))
    print("\nfinding:", finding(result))
    print(
        f"\nthe same sweep, {layers * positions} patched runs ({layers} layers x {positions} positions) plus "
        "the clean run (and the corrupted run, for ours):"
    )
    for name, took in seconds.items():
        print(f"  {name:<30} {took:6.2f} s" + (" (compiles once)" if name.endswith("first sweep") else ""))
    print(
        f"compile stats (both compiled sweeps): {stats['compiles']} compile, {stats['cache_hits']} cache hits, "
        f"{stats['recompiles']} recompiles, {stats['fallbacks']} fallbacks"
    )
    print("checked: the eager and the compiled sweep equal the plain-hooks sweep in every cell")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="folder for the model and the heatmaps")
    parser.add_argument("--clean", default=CLEAN, help="a prompt of the task: pairs, then '; key'")
    parser.add_argument("--corrupted", default=CORRUPTED, help="the same number of tokens as --clean")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    with _threads(1):  # a tiny model: one thread is fastest, and leaves the other cores alone
        run(args.out, args.clean, args.corrupted, progress=not args.no_progress)


if __name__ == "__main__":
    main()
