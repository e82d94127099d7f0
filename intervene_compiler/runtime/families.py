"""What is known about model families: where a causal LM keeps its decoder layers and its unembedding.

The front-end reads these facts once per model when it builds the run's :class:`~.target.Target`; the passes and
the backends' fast paths (shared prefixes, packing, reuse, layered compiles) use them through the target.
"""

from __future__ import annotations

import sys

import torch

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
