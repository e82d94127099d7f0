"""Tiny real models for tests, docs and the demo: transformers architectures from configs, seeded weights.

No network: every model is built from a config with ``torch.manual_seed`` weights. ``tiny_mlp`` is the
walkthrough's two-layer network.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def tiny_mlp(seed: int = 0, input_size: int = 5, hidden: int = 10, output: int = 2) -> torch.nn.Sequential:
    """The walkthrough's network: ``layer1`` (Linear) then ``layer2`` (Linear), grads off."""
    torch.manual_seed(seed)
    layers = OrderedDict(
        [("layer1", torch.nn.Linear(input_size, hidden)), ("layer2", torch.nn.Linear(hidden, output))]
    )
    return torch.nn.Sequential(layers).requires_grad_(False)


def tiny_gpt2(
    seed: int = 0, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 128, init_range: float = 0.02
):
    """A GPT2LMHeadModel with random seeded weights, eval mode, eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=init_range,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, n_layer: int = 2, hidden: int = 32, vocab_size: int = 128):
    """A LlamaForCausalLM with random seeded weights, eval mode, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def assert_clean(module: torch.nn.Module) -> None:
    """Fail if any hook is left on ``module`` or its submodules (after a trace, successful or not)."""
    for name, m in module.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, attr)
            assert not hooks, f"{attr} left on module {name or '<root>'}: {hooks}"
