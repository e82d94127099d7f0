"""Tiny checkpoints of many ``transformers`` causal-LM families, for the family parity matrix
(``tests/test_families.py``).

Each family is built from a config (2 decoder layers, hidden size 32, the offline tokenizer's vocabulary of 384
tokens), given seeded weights and saved with ``save_pretrained`` together with the tokenizer, so that
``LanguageModel(folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)`` load it the way a user would. No
network is needed.

Weights: every parameter with two or more dims (embeddings, projections, router and expert weights) is drawn
from ``N(0, INIT_STD**2)`` after ``torch.manual_seed(seed)``; one-dim parameters (norm scales, biases) keep the
family's own initialization. ``INIT_STD`` is larger than the usual 0.02 so that greedy predictions are decisive
(a numeric difference of 1e-6 does not flip a generated token).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from .testing import EOS, tiny_tokenizer

N_LAYERS = 2
HIDDEN = 32
HEADS = 4
POSITIONS = 256
INIT_STD = 0.15

# the keywords most ``transformers`` configs take under these names (families with other names map them below)
_COMMON: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": POSITIONS,
}
_GQA: dict[str, Any] = {**_COMMON, "num_key_value_heads": 2}


def _config(name: str, **kwargs: Any) -> Any:
    return getattr(importlib.import_module("transformers"), name)(**kwargs)


def _gpt2_style(name: str, **extra: Any) -> Callable[..., Any]:
    """GPT-2-style keywords (``n_layer``, ``n_embd``, ``n_head``, ``n_positions``)."""
    return lambda **tokens: _config(
        name, n_layer=N_LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=POSITIONS, **extra, **tokens
    )


def _common(name: str, gqa: bool = True, **extra: Any) -> Callable[..., Any]:
    return lambda **tokens: _config(name, **{**(_GQA if gqa else _COMMON), **extra, **tokens})


# family (the config's ``model_type``) -> a function making its tiny config from the vocabulary and special
# tokens (``vocab_size=``, ``bos_token_id=``, ... keywords: see ``tiny_config``)
FAMILIES: dict[str, Callable[..., Any]] = {
    "gpt2": _gpt2_style("GPT2Config"),
    "gpt_neo": lambda **tokens: _config(
        "GPTNeoConfig",
        num_layers=N_LAYERS,
        hidden_size=HIDDEN,
        num_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=POSITIONS,
        attention_types=[[["global", "local"], 1]],
        window_size=4,  # shorter than the prompts: the local layer's window matters
        **tokens,
    ),
    "gptj": _gpt2_style("GPTJConfig", rotary_dim=4),
    "gpt_neox": _common("GPTNeoXConfig", gqa=False),
    "codegen": _gpt2_style("CodeGenConfig", n_ctx=POSITIONS, rotary_dim=4),
    "gpt_bigcode": _gpt2_style("GPTBigCodeConfig", multi_query=True),
    "opt": lambda **tokens: _config(
        "OPTConfig",
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=2 * HIDDEN,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=POSITIONS,
        **tokens,
    ),
    "bloom": lambda **tokens: _config(
        "BloomConfig", hidden_size=HIDDEN, n_layer=N_LAYERS, n_head=HEADS, **tokens
    ),
    "falcon": lambda **tokens: _config(
        "FalconConfig",
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        new_decoder_architecture=True,
        num_kv_heads=2,
        **tokens,
    ),
    "llama": _common("LlamaConfig"),
    "mistral": _common("MistralConfig", sliding_window=None),
    "mixtral": _common("MixtralConfig", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": _common("Qwen2Config"),
    "qwen2_moe": _common(
        "Qwen2MoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=HIDDEN,
        shared_expert_intermediate_size=HIDDEN,
    ),
    "qwen3": _common("Qwen3Config", head_dim=8),
    "qwen3_moe": _common(
        "Qwen3MoeConfig", head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN
    ),
    "gemma": _common("GemmaConfig", head_dim=8),
    "gemma2": _common("Gemma2Config", head_dim=8, sliding_window=4),
    "gemma3_text": _common("Gemma3TextConfig", head_dim=8, sliding_window=4),
    "phi": _common("PhiConfig", gqa=False),
    "phi3": _common("Phi3Config"),
    "stablelm": _common("StableLmConfig"),
    "olmo": _common("OlmoConfig"),
    "olmo2": _common("Olmo2Config"),
    "olmoe": _common("OlmoeConfig", num_experts=4, num_experts_per_tok=2),
    "cohere": _common("CohereConfig", logit_scale=1.0),  # the default 0.0625 makes greedy picks near-ties
    "granite": _common(
        "GraniteConfig", embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0
    ),
    "smollm3": _common("SmolLM3Config"),
    "starcoder2": _common("Starcoder2Config", sliding_window=None),
    "persimmon": _common("PersimmonConfig", gqa=False),
    "nemotron": _common("NemotronConfig", head_dim=8),
    "glm": _common("GlmConfig", head_dim=8),
    "helium": _common("HeliumConfig", head_dim=8),
    "xglm": lambda **tokens: _config(
        "XGLMConfig",
        d_model=HIDDEN,
        num_layers=N_LAYERS,
        attention_heads=HEADS,
        ffn_dim=2 * HIDDEN,
        max_position_embeddings=POSITIONS,
        **tokens,
    ),
    "biogpt": _common("BioGptConfig", gqa=False),
    "mpt": lambda **tokens: _config(
        "MptConfig", d_model=HIDDEN, n_heads=HEADS, n_layers=N_LAYERS, max_seq_len=POSITIONS, **tokens
    ),
}


# the families tests/test_families.py runs by default (every one eager and compiled): issue 18's list, the newer
# families it names, and four with something of their own (GPT-Neo and MPT: tuple outputs and no static KV cache;
# XGLM: sinusoidal positions; BioGPT: an unembedding named ``output_projection``). The others are Llama-like
# variants; ``IC_ALL_FAMILIES=1`` runs them too (the compiled matrix costs about 8 s per family with a warm Inductor
# cache on 2 CPU cores, 30 s cold).
CORE_FAMILIES = (
    "gpt2", "gptj", "gpt_neox", "opt", "bloom", "falcon", "llama", "mistral", "mixtral", "qwen2", "qwen3",
    "gemma", "gemma2", "phi", "phi3", "stablelm", "olmo",
    "gemma3_text", "qwen3_moe", "gpt_bigcode", "codegen", "cohere", "granite", "smollm3",
    "gpt_neo", "mpt", "xglm", "biogpt",
)  # fmt: skip


def tiny_config(family: str, vocab_size: int, eos: int) -> Any:
    """``family``'s tiny config with the vocabulary and special tokens of the offline tokenizer."""
    try:
        make = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}: one of {sorted(FAMILIES)}") from None
    return make(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def build_tiny_family(family: str, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``family``'s tiny causal LM (eval mode, seeded weights) and the offline tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, len(tokenizer), tokenizer.convert_tokens_to_ids(EOS))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, INIT_STD)
    return model.eval(), tokenizer


def save_tiny_family(folder: str, family: str, seed: int = 0) -> str:
    """Build ``family``'s tiny causal LM and ``save_pretrained`` it with its tokenizer into ``folder``.

    Load it back the way a user would: ``LanguageModel(folder)`` or ``AutoModelForCausalLM.from_pretrained(folder)``.
    Returns ``folder``.
    """
    model, tokenizer = build_tiny_family(family, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def decoder_layers(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """``(path, list)`` of a causal LM's decoder layers: its first ``ModuleList`` as long as
    ``config.num_hidden_layers``."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"no ModuleList of {n} layers in {type(model).__name__}")
