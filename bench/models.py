"""Models built from configs with seeded random weights, and the peers' wrappers around copies of them.

Weights and inputs are generated on the CPU (the same values whatever the device) and then moved to
``settings.device``; a wrapper of a peer wraps a module that is already there.

Every system gets its own copy of the weights (``copy.deepcopy``): the compiled backend keeps inert dispatcher
hooks installed between calls and peers may wrap modules, and neither may leak into another system's timing.
"""

from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import tempfile
import warnings

import torch

from .harness import Settings


def gpt2(settings: Settings, n_layer: int, seed: int = 0, init_range: float = 0.02):
    """A ``GPT2LMHeadModel`` with GPT-2-small shapes (``settings``' width/heads/vocab), eager attention, eval, on
    ``settings.device``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=settings.width,
        n_head=settings.heads,
        vocab_size=settings.vocab,
        n_positions=max(128, settings.tokens + 64),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=init_range,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval().requires_grad_(False).to(settings.device)


def copies(model: torch.nn.Module, n: int) -> list[torch.nn.Module]:
    return [copy.deepcopy(model) for _ in range(n)]  # on the model's device


def token_ids(settings: Settings, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Random prompt ids ``(batch, tokens)``, drawn on the CPU (same ids on every device), on ``settings.device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, settings.vocab, (batch, settings.tokens), generator=g).to(settings.device)


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> str:
    """A small offline BPE tokenizer saved to a folder (peers want one with a ``name_or_path``)."""
    from intervene_compiler.testing import tiny_tokenizer

    folder = tempfile.mkdtemp(prefix="bench_tok_")
    atexit.register(shutil.rmtree, folder, True)  # a temporary folder: gone when the run ends
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tokenizer():
    """The tokenizer every language-model wrapper gets (prompts are token ids: only pad/eos ids matter)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_id() -> int:
    return int(tokenizer().pad_token_id)


# -- peers -------------------------------------------------------------------------------------------------------


def nnsight_model(module: torch.nn.Module, language: bool = False):
    """nnsight's wrapper: ``NNsight(module)``, or ``LanguageModel(module, tokenizer=...)`` (needed for invokes)."""
    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if language:
            return nnsight.LanguageModel(module, tokenizer=tokenizer())
        return nnsight.NNsight(module)


def tl_bridge(module: torch.nn.Module, device: str):
    """TransformerLens 4's ``TransformerBridge`` around a (copied) HF GPT-2 (``HookedTransformer`` is gone in 4.x)
    already on ``device`` (the bridge records it as ``cfg.device``)."""
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lens.model_bridge import TransformerBridge

    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            "gpt2", hf_model=module, tokenizer=tokenizer(), device=device
        )


def tl_mlp(net: torch.nn.Module):
    """The tiny MLP as a TransformerLens ``HookedRootModule`` with a ``HookPoint`` after ``layer1``."""
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class HookedMLP(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.layer1 = net.layer1
            self.hook_layer1 = HookPoint()
            self.layer2 = net.layer2
            self.setup()

        def forward(self, x):
            return self.layer2(self.hook_layer1(self.layer1(x)))

    return HookedMLP()
