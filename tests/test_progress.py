"""Progress on long work (issue 21): ``session.iter(..., progress=True)`` and ``generate(..., progress=True)`` draw a
tqdm bar that counts the items and the new tokens; the first slow compile of a process says so once through the
``intervene_compiler`` logger. Nothing is written unless asked (tests run with the logger at WARNING)."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.runtime import progress
from intervene_compiler.testing import tiny_mlp


@pytest.fixture
def bars(monkeypatch):
    """Every bar made, writing to a buffer instead of stderr: [(description, total, buffer, bar)]."""
    made = []
    real = progress.progress_bar

    def capture(total, desc, unit):
        from tqdm.auto import tqdm

        buffer = io.StringIO()
        bar = tqdm(total=total, desc=desc, unit=unit, file=buffer)
        made.append((desc, total, buffer, bar))
        return bar

    monkeypatch.setattr(progress, "progress_bar", capture)
    yield made
    monkeypatch.setattr(progress, "progress_bar", real)


def test_session_iter_counts_its_items(bars, capsys):
    model = ic.NNsight(tiny_mlp())
    xs = [torch.rand(1, 5, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    with model.session() as session:
        sums = ic.list().save()
        with session.iter(xs, progress=True) as x:
            with model.trace(x):
                sums.append(model.layer1.output.sum())
    assert len(sums) == 7
    ((desc, total, buffer, bar),) = bars
    assert total == 7 and bar.n == 7 and "session.iter" in desc and "7/7" in buffer.getvalue()
    with model.session() as session:  # not asked: no bar
        with session.iter(xs) as x:
            with model.trace(x):
                model.layer1.output.save()
    assert len(bars) == 1
    assert capsys.readouterr() == ("", "")


def test_session_iter_exit_closes_the_bar_early(bars):
    model = ic.NNsight(tiny_mlp())
    with model.session() as session:
        with session.iter(list(range(10)), progress=True, return_context=True) as (i, loop):
            with loop.cond(i == 3):
                loop.exit()
    ((_, total, _, bar),) = bars
    assert total == 10 and bar.n == 3 and bar.disable  # closed (tqdm disables a closed bar)


def test_generate_counts_its_new_tokens(bars, lm_dirs):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.generate("Hello world", max_new_tokens=4, min_new_tokens=4, progress=True):
        out = lm.generator.output.save()
    ((desc, total, buffer, bar),) = bars
    assert desc == "generate" and total == 4 and bar.n == 4
    with lm.generate("Hello world", max_new_tokens=4, min_new_tokens=4):  # the same tokens without a bar
        plain = lm.generator.output.save()
    assert torch.equal(out, plain) and len(bars) == 1


def test_progress_on_a_remote_block_raises(lm_dirs):
    """A bar is drawn where the work runs: a remote block cannot have one, and says so before anything is sent."""
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with pytest.raises(ic.TracingError, match="progress=True"):
        with lm.session(remote=True, blocking=False) as session:
            with session.iter([1, 2], progress=True):
                pass
    with pytest.raises(TypeError, match="progress=True"):
        lm.generate("Hello", max_new_tokens=2, progress=True, remote=True)
    with lm.trace("Hello"):  # the model is fine after both
        lm.transformer.h[0].output.save()


@contextlib.contextmanager
def _logging_at_info(logger, handler):
    """The package's logger at INFO with ``handler`` (``setLevel``: it clears the logger's cache of enabled levels,
    which the test suite's WARNING filled), back as it was after."""
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_slow_first_compile_says_so_once(monkeypatch):
    logger = logging.getLogger("intervene_compiler")
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    monkeypatch.setattr(progress, "_NOTED", [])
    with _logging_at_info(logger, handler):
        progress.note_compile("a quick thing", 0.01)  # under COMPILE_NOTE_S: nothing
        progress.note_compile("GPT2LMHeadModel and the trace's interventions as one program", 4.2)
        progress.note_compile("another thing", 9.0)  # once per process
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 and "compiled GPT2LMHeadModel" in lines[0] and "4.2 s" in lines[0]
    assert "IC_COMPILE_LOG=0" in lines[0]


@pytest.mark.compiled
def test_the_compile_note_names_the_model(monkeypatch):
    logger = logging.getLogger("intervene_compiler")
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    monkeypatch.setattr(progress, "_NOTED", [])
    monkeypatch.setattr(progress, "COMPILE_NOTE_S", 0.0)  # any compile is slow enough here
    with _logging_at_info(logger, handler):
        model = ic.NNsight(tiny_mlp())
        for value in (1.0, 2.0):
            with model.trace(torch.rand(1, 5), compile=True):
                model.layer1.output[:, 0] = value
                model.output.save()
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compiled Sequential and the trace's interventions")
