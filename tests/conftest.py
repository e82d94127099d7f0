"""Shared fixtures: the walkthrough's tiny network and tiny GPT-2 / Llama models built from configs."""

from __future__ import annotations

import logging

import pytest
import torch

from intervene_compiler import NNsight
from intervene_compiler.testing import assert_clean, tiny_gpt2, tiny_llama, tiny_mlp

# no output by default in tests: the one-line note of a slow first compile (runtime/progress.py) is off
logging.getLogger("intervene_compiler").setLevel(logging.WARNING)

# test tiers (tests/README.md): a test with none of these markers belongs to the fast `eager` tier
SLOW_TIERS = ("compiled", "differential", "bench", "device", "remote")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.eager)


@pytest.fixture
def net():
    return tiny_mlp()


@pytest.fixture
def tiny(net):
    """NNsight wrapping the walkthrough's two-layer network; checked clean of hooks after the test."""
    model = NNsight(net)
    yield model
    assert_clean(net)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand((1, 5))


@pytest.fixture(scope="module")
def gpt2_module():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama_module():
    return tiny_llama()


@pytest.fixture
def gpt2(gpt2_module):
    model = NNsight(gpt2_module)
    yield model
    assert_clean(gpt2_module)


@pytest.fixture
def llama(llama_module):
    model = NNsight(llama_module)
    yield model
    assert_clean(llama_module)


@pytest.fixture
def ids():
    torch.manual_seed(2)
    return torch.randint(0, 128, (2, 7))


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory):
    """Tiny GPT-2 and Llama checkpoints (seeded weights, offline BPE tokenizer) saved once per session."""
    from intervene_compiler.testing import save_tiny_lm

    root = tmp_path_factory.mktemp("tiny_lms")
    return {arch: save_tiny_lm(str(root / arch), arch=arch) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def hf_models(lm_dirs):
    """The tiny checkpoints loaded with plain ``transformers``: arch -> (model, tokenizer), the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {
        arch: (AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
        for arch, path in lm_dirs.items()
    }


@pytest.fixture(scope="module")
def steer():
    """A steering vector for the tiny checkpoints' width (64)."""
    torch.manual_seed(3)
    return torch.randn(64) * 4
