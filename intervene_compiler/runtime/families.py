"""What is known about model families: where a causal LM keeps its decoder layers and its unembedding.

The front-end reads these facts once per model when it builds the run's :class:`~.target.Target`; the passes and
the backends' fast paths (shared prefixes, packing, reuse, layered compiles) use them through the target.
"""

from __future__ import annotations

import sys

import torch

from ..errors import InputError, SourceLoc

# model_type -> path of its decoder layers (a ModuleList of layers taking (hidden_states, attention_mask=...,
# position_embeddings/position_ids) and returning the hidden states). In these families the later layers also
# broadcast one-row side inputs (masks, position embeddings) against more rows, so identical invokes can share
# the layers before the first edit (checked: tests/test_tracing.py::test_identical_invokes_share_their_prefix).
DECODER_LAYERS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
}


def decoder_layers_path(module: torch.nn.Module) -> str | None:
    """The path of ``module``'s decoder layers when it is a ``DECODER_LAYERS`` family model that has them."""
    config = getattr(module, "config", None)
    path = DECODER_LAYERS.get(str(getattr(config, "model_type", None)))
    if path is None:
        return None
    try:
        module.get_submodule(path)
    except AttributeError:
        return None
    return path


def unembedding_path(module: torch.nn.Module) -> str | None:
    """The path of a ``transformers`` causal LM's output embeddings when they are a Linear, else None.

    A model that can ``generate`` applies them last, to each position on its own; the order of any other module's
    submodules is unknown.
    """
    transformers = sys.modules.get("transformers")
    mixin = getattr(transformers, "GenerationMixin", None) if transformers is not None else None
    if mixin is None or not isinstance(module, mixin):
        return None
    get = getattr(module, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, torch.nn.Linear):
        return None
    return next((name for name, m in module.named_modules() if m is head), None)


def token_limits(module: torch.nn.Module) -> tuple[int, int | None] | None:
    """``(vocabulary size, positions)`` of a ``transformers`` model that embeds token ids, else None.

    ``positions`` is the length of its learned position table (GPT-2's ``n_positions``, OPT's
    ``max_position_embeddings``; None for rotary or ALiBi families, which have no table to run past). Token ids
    outside these limits make eager PyTorch raise an IndexError deep in the model and make a compiled kernel
    abort the process, so they are checked before any run.
    """
    get = getattr(module, "get_input_embeddings", None)
    config = getattr(module, "config", None)
    if get is None or config is None:
        return None
    try:
        embedding = get()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(embedding, torch.nn.Embedding):
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    positions = None
    if isinstance(limit, int):
        for m in module.modules():
            # a learned position table: an embedding of `limit` rows (OPT keeps 2 more, for its offset)
            if (
                isinstance(m, torch.nn.Embedding)
                and m is not embedding
                and m.num_embeddings in (limit, limit + 2)
            ):
                positions = limit
                break
    return embedding.num_embeddings, positions


def check_token_ids(ids: torch.Tensor, limits: tuple[int, int | None], loc: SourceLoc | None) -> None:
    """Raise InputError at ``loc`` when token ``ids`` (batch, length) cannot run on a model with ``limits``
    (see :func:`token_limits`): no tokens, ids outside the vocabulary, or more positions than the model has."""
    vocab = limits[0]
    if ids.dim() == 0 or ids.shape[-1] == 0:
        raise InputError(
            "the input has no tokens",
            loc,
            "give at least one token (a tokenizer that adds no start token makes none of an empty string)",
        )
    if ids.is_floating_point() or ids.is_complex():
        raise InputError(
            f"token ids must be integers, got a {ids.dtype} tensor", loc, "pass ids as a long tensor"
        )
    low, high = (int(v) for v in torch.aminmax(ids.detach()))
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise InputError(
            f"token id {bad} is outside the model's vocabulary (ids 0 to {vocab - 1})",
            loc,
            "pass ids the model's tokenizer made (a tokenizer of another model has another vocabulary)",
        )
    check_positions(ids.shape[-1], limits, loc)


def check_positions(
    prompt: int, limits: tuple[int, int | None], loc: SourceLoc | None, more: int = 0
) -> None:
    """Raise InputError at ``loc`` when a ``prompt`` of that many tokens plus ``more`` to generate needs more
    positions than the model's learned position table has (``limits``: see :func:`token_limits`)."""
    positions = limits[1]
    length = prompt + more
    if positions is not None and length > positions:
        extra = f" ({prompt} in the prompt, {more} to generate)" if more else ""
        raise InputError(
            f"the input needs {length} positions{extra}, but the model has {positions}",
            loc,
            "shorten the prompt (keep its last tokens)" + (", or generate fewer tokens" if more else ""),
        )
