"""The demo (``intervene_compiler.demo``) and the plots (``intervene_compiler.plot``).

The demo's model is trained once per session (about 15 s on 2 cores); its finding is checked from the numbers:
the answer sits at the changed value's position before the block that moves it and at the last position after,
and positions with no role have no effect. Sweeps are checked against plain PyTorch hooks, and the compiled sweep
compiles once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler import demo
from intervene_compiler.testing import plain_patch_logits

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

from intervene_compiler import plot  # noqa: E402


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """The demo's trained checkpoint, trained once per session."""
    return demo.load_or_train(str(tmp_path_factory.mktemp("demo") / "model"))


@pytest.fixture(scope="module")
def lm(demo_folder):
    with demo._quiet_transformers():
        return ic.LanguageModel(demo_folder).dispatch()


@pytest.fixture(scope="module")
def sweep(lm):
    return demo.patching_sweep(lm, demo.CLEAN, demo.CORRUPTED)


def _ids(lm, text):
    return lm.tokenizer(text, return_tensors="pt")["input_ids"]


# -- the trained model ---------------------------------------------------------------------------------------------


def test_model_solves_the_task(lm, demo_folder):
    with open(os.path.join(demo_folder, demo.MANIFEST)) as f:
        assert json.load(f)["accuracy"] >= demo.MIN_ACCURACY
    for prompt, answer in ((demo.CLEAN, "7"), (demo.CORRUPTED, "9"), ("h 0 b 5 d 2 f 8 ; f", "8")):
        with torch.no_grad(), lm.trace(prompt):
            top = lm.lm_head.output[0, -1].argmax().save()
        assert lm.tokenizer.decode(int(top)) == answer, prompt


def test_tokenizer_is_word_level_and_prompts_align(lm):
    tokens = lm.tokenizer.tokenize(demo.CLEAN)
    assert tokens == demo.CLEAN.split()
    assert len(_ids(lm, demo.CORRUPTED)[0]) == len(tokens)


# -- the finding, from the numbers ---------------------------------------------------------------------------------


def test_finding_answer_moves_from_the_value_to_the_last_position(sweep):
    effect, last = sweep.effect, len(sweep.tokens) - 1
    assert sweep.changed == [3] and sweep.answers == ("7", "9")
    source, block = demo.mover(sweep)
    assert source == 3
    assert block is not None and block >= 1
    for layer in range(len(effect)):
        if layer < block:  # before the move: at the value's position only
            assert effect[layer, source] > 0.9 and abs(effect[layer, last]) < 0.1
        else:  # after it: at the last position only
            assert effect[layer, last] > 0.9 and abs(effect[layer, source]) < 0.1
    no_role = [p for p in range(len(sweep.tokens)) if p not in (source, last)]
    assert effect[:, no_role].abs().max() < 0.05
    assert effect[:, :source].abs().max() < 1e-4  # before the change both runs are the same


def test_finding_sentence_is_derived_from_the_numbers(sweep):
    source, block = demo.mover(sweep)
    text = demo.finding(sweep)
    assert text.startswith(f"Block {block} moves the answer")
    assert f"changed token '7' (position {source})" in text
    assert f"last position 'c' (position {len(sweep.tokens) - 1})" in text
    flat = replace(sweep, diffs=torch.full_like(sweep.diffs, sweep.corrupted))  # no effect anywhere
    assert demo.mover(flat)[1] is None
    assert demo.finding(flat).startswith("The numbers show no single move")


def test_normalized_effect_ends(sweep):
    assert replace(sweep, diffs=torch.full_like(sweep.diffs, sweep.clean)).effect.eq(1).all()
    assert replace(sweep, diffs=torch.full_like(sweep.diffs, sweep.corrupted)).effect.eq(0).all()
    assert sweep.clean > 0 > sweep.corrupted


# -- against plain hooks -------------------------------------------------------------------------------------------


def test_one_cell_against_a_plain_hook(lm, sweep):
    hf = lm._model
    layer, pos = 0, sweep.changed[0]
    stash = {}
    handle = hf.transformer.h[layer].register_forward_hook(lambda m, a, out: stash.setdefault("h", out))
    try:
        with torch.no_grad():
            hf(_ids(lm, demo.CLEAN))
    finally:
        handle.remove()
    logits = plain_patch_logits(hf, _ids(lm, demo.CORRUPTED), layer, pos, stash["h"][:, pos])
    expected = logits[0, sweep.answer] - logits[0, sweep.wrong]
    torch.testing.assert_close(sweep.diffs[layer, pos], expected, rtol=1e-4, atol=1e-4)


def test_eager_sweep_equals_the_hooks_sweep(lm, sweep):
    hooks = demo.hooks_sweep(lm, demo.CLEAN, demo.CORRUPTED, sweep.answer, sweep.wrong)
    demo.check_agree("eager", sweep.diffs, hooks)
    with pytest.raises(AssertionError, match="disagrees with plain PyTorch hooks at layer 2, position 5"):
        bad = hooks.clone()
        bad[2, 5] += 1
        demo.check_agree("eager", sweep.diffs, bad)


@pytest.mark.compiled
def test_compiled_sweep_compiles_once_and_matches(lm, sweep):
    ic.reset_compile_stats()
    compiled = demo.patching_sweep(lm, demo.CLEAN, demo.CORRUPTED, compile=True)
    stats = ic.compile_stats()
    cells = sweep.diffs.numel()
    assert stats["compiles"] == 1 and stats["recompiles"] == 0 and stats["fallbacks"] == 0, stats
    assert stats["compiled_calls"] == cells and stats["cache_hits"] == cells - 1, stats
    torch.testing.assert_close(compiled.diffs, sweep.diffs, rtol=1e-4, atol=1e-4)


def test_sweep_without_progress_prints_nothing(lm, capfd):
    demo.patching_sweep(lm, demo.CLEAN, demo.CORRUPTED, progress=False)
    assert capfd.readouterr() == ("", "")


def test_prompts_of_different_lengths_are_refused(lm):
    with pytest.raises(ValueError, match="patching needs equal lengths"):
        demo.patching_sweep(lm, demo.CLEAN, "a 3 c 9 e 1 ; c")


# -- the heatmaps --------------------------------------------------------------------------------------------------


def test_heatmaps_written_with_the_prompt_tokens(lm, sweep, tmp_path):
    lens = demo.logit_lens(lm, demo.CLEAN, sweep.answer)
    drawn = demo.draw(sweep, str(tmp_path), lens)
    assert sorted(os.path.basename(p) for p in drawn) == ["logit_lens.png", "patching.png"]
    for path, ax in drawn.items():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert [t.get_text() for t in ax.get_xticklabels()] == demo.CLEAN.split()
        assert [t.get_text() for t in ax.get_yticklabels()] == ["h[0]", "h[1]", "h[2]", "h[3]"]
    probs, tops = lens
    assert probs.shape == sweep.diffs.shape and probs[-1, -1] > 0.9 and tops[-1][-1] == "7"


# -- the cached checkpoint -----------------------------------------------------------------------------------------


def test_cached_checkpoint_detects_partial_and_corrupted_folders(demo_folder, tmp_path):
    recipe = demo.Recipe()
    assert demo.cached_checkpoint(demo_folder, recipe)
    assert not demo.cached_checkpoint(demo_folder, demo.Recipe(steps=recipe.steps + 1))  # another recipe
    assert not demo.cached_checkpoint(str(tmp_path / "missing"), recipe)

    def copy(name):
        folder = str(tmp_path / name)
        shutil.copytree(demo_folder, folder)
        return folder

    partial = copy("partial")
    os.remove(os.path.join(partial, demo.MANIFEST))
    corrupted = copy("corrupted")
    with open(os.path.join(corrupted, "model.safetensors"), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    truncated = copy("truncated")
    os.truncate(os.path.join(truncated, "model.safetensors"), 100)
    missing_file = copy("missing_file")
    os.remove(os.path.join(missing_file, "config.json"))
    junk_manifest = copy("junk_manifest")
    with open(os.path.join(junk_manifest, demo.MANIFEST), "w") as f:
        f.write("{not json")
    for folder in (partial, corrupted, truncated, missing_file, junk_manifest):
        assert not demo.cached_checkpoint(folder, recipe), folder


def test_load_or_train_reuses_and_rebuilds(tmp_path, monkeypatch):
    from intervene_compiler.testing import tiny_gpt2

    trained = []

    def fake_train(recipe, tokenizer):  # a model to save, without the 15 s of training
        trained.append(recipe)
        return tiny_gpt2(n_layer=1, vocab_size=len(tokenizer)), 1.0

    monkeypatch.setattr(demo, "train", fake_train)
    folder = str(tmp_path / "model")
    lines = []
    assert demo.load_or_train(folder, log=lines.append) == folder
    assert len(trained) == 1 and demo.cached_checkpoint(folder, demo.Recipe())
    demo.load_or_train(folder, log=lines.append)
    assert len(trained) == 1 and "reusing" in lines[-1]
    os.truncate(os.path.join(folder, "model.safetensors"), 10)  # corrupted: trained again
    demo.load_or_train(folder, log=lines.append)
    assert len(trained) == 2 and demo.cached_checkpoint(folder, demo.Recipe())
    os.remove(os.path.join(folder, demo.MANIFEST))  # partial (stopped before the manifest): trained again
    demo.load_or_train(folder, log=lines.append)
    assert len(trained) == 3 and demo.cached_checkpoint(folder, demo.Recipe())
    assert not os.path.exists(folder + ".partial")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_load_or_train_refuses_an_untrained_model(tmp_path, monkeypatch):
    from intervene_compiler.testing import tiny_gpt2

    monkeypatch.setattr(demo, "train", lambda recipe, tok: (tiny_gpt2(n_layer=1, vocab_size=len(tok)), 0.3))
    with pytest.raises(RuntimeError, match="training did not converge"):
        demo.load_or_train(str(tmp_path / "model"))
    assert not os.path.exists(tmp_path / "model")


@pytest.mark.compiled
def test_main_end_to_end(demo_folder, tmp_path, capsys):
    shutil.copytree(demo_folder, tmp_path / "model")  # the cached model: main must not train
    demo.main(["--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "reusing the trained checkpoint" in out and "trained a" not in out
    assert "moves the answer" in out
    stats = re.search(r"(\d+) compile, (\d+) cache hits, 0 recompiles, 0 fallbacks", out)
    assert stats is not None, out
    compiles, hits = int(stats[1]), int(stats[2])  # 0 compiles if this process compiled the structure already
    assert compiles <= 1 and compiles + hits == 2 * 40
    assert "equal the plain-hooks sweep in every cell" in out
    assert (tmp_path / "patching.png").is_file() and (tmp_path / "logit_lens.png").is_file()


# -- the plot functions on made-up numbers -------------------------------------------------------------------------


def test_patching_heatmap_made_up():
    effect = torch.tensor([[0.0, 1.0, -0.5], [0.25, 0.0, 2.0]])
    fig, ax = plot.patching_heatmap(effect, ["x", "y", "z"], layers=["L0", "L1"], title="t")
    assert isinstance(fig, Figure) and ax.figure is fig
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1"]
    assert ax.get_title() == "t" and ax.get_ylabel() == "layer"
    assert [t.get_text() for t in ax.texts] == ["0.00", "1.00", "-0.50", "0.25", "0.00", "2.00"]
    image = ax.images[0]
    assert image.get_clim() == (-2.0, 2.0)  # symmetric around 0, covering the largest value
    torch.testing.assert_close(torch.tensor(image.get_array().data), effect.double())


def test_patching_heatmap_path_ax_and_lists(tmp_path):
    path = str(tmp_path / "h.png")
    fig, ax = plot.patching_heatmap([[0.1, -0.001]], ["a", "b"], path=path, annotate=True)
    assert os.path.getsize(path) > 0 and [t.get_text() for t in ax.texts] == ["0.10", "0.00"]  # never -0.00
    own = Figure()
    mine = own.add_subplot(1, 2, 2)
    fig, ax = plot.patching_heatmap(torch.zeros(2, 2), ["a", "b"], ax=mine, annotate=False)
    assert fig is own and ax is mine and not ax.texts
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]


@pytest.mark.parametrize(
    ("effect", "tokens", "layers", "match"),
    [
        (torch.zeros(3), ["a", "b", "c"], None, "must be 2-D"),
        (torch.zeros(2, 3), ["a", "b"], None, "3 positions but 2 tokens"),
        (torch.zeros(2, 3), ["a", "b", "c"], ["L0"], "2 layers but 1 layer labels"),
    ],
)
def test_plot_shape_errors(effect, tokens, layers, match):
    with pytest.raises(ValueError, match=match):
        plot.patching_heatmap(effect, tokens, layers=layers)
    with pytest.raises(ValueError, match=match):
        plot.logit_lens(effect, tokens, layers=layers)


def test_logit_lens_made_up(tmp_path):
    probs = torch.tensor([[0.1, 0.2], [0.7, 0.95]])
    tops = [["a", "b"], ["c", "the"]]
    path = str(tmp_path / "lens.png")
    fig, ax = plot.logit_lens(probs, ["tok0", "tok1"], top_tokens=tops, path=path)
    assert os.path.getsize(path) > 0
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c", "the"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tok0", "tok1"]
    assert ax.images[0].get_clim() == (0.0, 1.0)  # probabilities: the full unit range
    _, ax = plot.logit_lens(probs * 10, ["x", "y"])  # any score: its own range, the numbers in the cells
    assert [t.get_text() for t in ax.texts] == ["1.00", "2.00", "7.00", "9.50"]
    with pytest.raises(ValueError, match="one string per cell"):
        plot.logit_lens(probs, ["x", "y"], top_tokens=[["a", "b"]])


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    import importlib

    monkeypatch.delitem(sys.modules, "intervene_compiler.plot")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    with pytest.raises(ImportError, match=r"pip install 'intervene_compiler\[plot\]'"):
        importlib.import_module("intervene_compiler.plot")


def test_importing_the_package_imports_no_matplotlib():
    code = (
        "import sys, intervene_compiler, intervene_compiler.demo\n"
        "assert not [m for m in sys.modules if m.startswith('matplotlib')], 'matplotlib imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
