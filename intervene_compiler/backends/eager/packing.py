"""Suffix packing: after a shared prefix, run only the positions each invoke changed.

In an activation-patching sweep every invoke runs the same prompt and writes one position ``p`` of one layer's
output. The shared prefix (``run_graph``'s ``repeat``) already computes the layers before that once; after it,
each invoke's rows would run the remaining layers on all ``T`` positions. In a causal model the positions before
``p`` never see the write: they stay equal to the unedited run at every later layer. So from the edited layer
on, the runner packs into one sequence the unedited row (all ``T`` positions) followed by each invoke's positions
from its first changed one, and gives every later layer a 4-D attention mask under which

- an unedited token attends to the unedited tokens at or before it (the model's own mask, gathered), and
- an invoke's token attends to the unedited tokens before that invoke's first changed position, and to its own
  packed tokens at or before it,

built from the mask the model passes that layer (gathered to packed positions, so padding and per-layer masks
such as sliding windows are kept), with rotary position embeddings and position ids gathered to each packed
token's position. A later layer whose mask is not ``(..., T, T)`` gets the unpacked rows instead. At the next
event a node touches among the layers, or at the last layer's output, the pack is unpacked into one row per
invoke (positions before ``p`` taken from the unedited row), so nodes and later modules never see the packed
layout. After a touched layer's visit the rows are packed again (against the pack's unedited row there), so a
trace editing several layers keeps packing.

The first changed position is found by comparing each invoke's rows with the unedited value, so any edit (a
setitem, a whole-value set, an in-place op) is handled; an invoke that changed nothing packs no tokens. Packing
is used only when it is cheaper (per layer, about ``6 * width`` multiply-adds per token for the projections and
MLP against one per query-key pair for attention) and the packed mask stays small.

Requirements (``pack_layers``): a ``transformers`` family whose decoder layers are a ``ModuleList`` at a known
path (``runtime.families.DECODER_LAYERS``: GPT-2, Llama, Mistral, Qwen2/3, Gemma), eager or SDPA attention, eval mode, and no
touched site inside a decoder layer (a layer's own input or output is fine: that is where the pack is unpacked). At run time: the shared prefix ends at a
decoder layer's output (call 0) before the last layer, that output is one ``(1, T, D)`` tensor, the model's mask
is absent or ``(..., T, T)``, and the KV cache (if any) held nothing before this forward.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ...runtime import Target

_ATTENTION = frozenset({"eager", "sdpa"})
_MAX_TOKENS = 4096  # the packed mask is (P, P): 64 MiB in float32 at this length
# a layer's per-position side inputs, gathered to the packed tokens' positions
_SIDE_INPUTS = ("position_embeddings", "position_ids", "cache_position")
_GAIN = 0.85  # pack only when it costs at most this fraction of running every invoke's rows


def inside_a_layer(layers_path: str, site_paths) -> bool:
    """Is one of ``site_paths`` a module inside a decoder layer (not a layer itself)?"""
    prefix = layers_path + "."
    return any(p.startswith(prefix) and "." in p[len(prefix) :] for p in site_paths)


def pack_layers(target: Target, site_paths) -> tuple[str, tuple[torch.nn.Module, ...]] | None:
    """(the decoder layers' path, the layers) when a shared-prefix run on ``target`` may pack, else None."""
    module = target.module
    config = getattr(module, "config", None)
    if module.training or getattr(config, "_attn_implementation", None) not in _ATTENTION:
        return None
    if getattr(config, "add_cross_attention", False):
        return None
    found = target.decoder_layers()
    if found is None:
        return None
    path, layers = found
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) < 2:
        return None
    if inside_a_layer(path, site_paths):  # a site inside a decoder layer would see the packed layout
        return None
    return path, tuple(layers)


class Pack:
    """The packed hidden state's layout and what later layers need to run on it."""

    def __init__(
        self, layers, paths, positions, allowed, unpack_index, n: int, length: int, dtype, signature
    ):
        self.layers = layers  # the decoder layers after the packed one
        self.paths = paths  # their site paths
        self.positions = positions  # (P,) each packed token's position
        self.allowed = allowed  # (P, P) which packed keys each packed query may see (before the model's mask)
        self.unpack_index = unpack_index  # (n * T,) packed token of each invoke's position
        self.n = n
        self.length = length
        self.dtype = dtype
        self.signature = signature
        self.var_keyword = _var_keyword(signature)
        self._packed: dict[int, Any] = {}  # id(a side input or mask of the model) -> (it, its packed version)

    def unedited(self, hidden: torch.Tensor) -> torch.Tensor:
        """The unedited row of packed ``hidden``: (1, T, D)."""
        return hidden[:, : self.length]

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, P, D) packed -> (n, T, D), one row per invoke."""
        return hidden[0].index_select(0, self.unpack_index).view(self.n, self.length, hidden.shape[-1])

    def layer_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A later layer's (args, kwargs) with its own mask packed and its side inputs gathered to packed
        positions; None when its mask cannot be packed (the caller unpacks instead)."""
        bound = self.signature.bind(*args, **kwargs)
        arguments = bound.arguments
        extra = arguments.get(self.var_keyword) if self.var_keyword else None
        mask = self._mask(arguments.get("attention_mask"))  # a named parameter (build checks)
        if mask is None:
            return None
        for name in _SIDE_INPUTS:
            if name in arguments:
                arguments[name] = self._gather(arguments[name])
            elif extra is not None and name in extra:
                extra[name] = self._gather(extra[name])
        arguments["attention_mask"] = mask
        return bound.args, bound.kwargs

    def _mask(self, mask: Any) -> torch.Tensor | None:
        """The packed additive mask from the model's ``(..., T, T)`` mask for this layer (layers may differ:
        sliding-window ones), or None when that mask is not one."""
        if mask is not None and not _square_mask(mask, self.length):
            return None
        return self._once(mask, self._pack_mask)

    def _pack_mask(self, mask: torch.Tensor | None) -> torch.Tensor:
        device, dtype = self.allowed.device, self.dtype
        low = torch.finfo(dtype).min
        if mask is None:
            base = torch.zeros((), dtype=dtype, device=device)
        else:
            m = mask[:1, :1].to(device).index_select(2, self.positions).index_select(3, self.positions)
            base = torch.where(m, 0.0, low).to(dtype) if m.dtype == torch.bool else m.to(dtype)
        low_t = torch.tensor(low, dtype=dtype, device=device)
        return torch.where(self.allowed, base, low_t).expand(1, 1, -1, -1)

    def _gather(self, value: Any) -> Any:
        return self._once(value, self._gather_positions)

    def _gather_positions(self, value: Any) -> Any:
        dim = -1 if getattr(value, "ndim", 0) <= 2 else -2
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[dim] == self.length:
            return value.index_select(dim, self.positions.to(value.device))
        if isinstance(value, tuple):
            return tuple(self._gather(v) for v in value)
        return value

    def _once(self, value: Any, make) -> Any:
        """``make(value)``, once per object the model passes (every layer gets the same mask and embeddings)."""
        got = self._packed.get(id(value))
        if got is not None and got[0] is value:
            return got[1]
        out = make(value)
        self._packed[id(value)] = (value, out)
        return out


def _square_mask(mask: Any, length: int) -> bool:
    """Is ``mask`` a 4-D ``(..., T, T)`` attention mask (the form a pack gathers from)?"""
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and tuple(mask.shape[-2:]) == (length, length)


def _var_keyword(signature: inspect.Signature) -> str | None:
    return next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)


def _bound(layer: torch.nn.Module, args: tuple, kwargs: dict):
    signature = inspect.signature(layer.forward)
    try:
        return signature, signature.bind(*args, **kwargs).arguments
    except TypeError:
        return signature, None


def check(layers: tuple[torch.nn.Module, ...], index: int, args: tuple, kwargs: dict):
    """The signature of layer ``index`` when a pack can start at its output (its ``(args, kwargs)`` as the
    model called it: a mask that is absent or ``(..., T, T)``, and a KV cache, if any, that held nothing before
    this forward), else None."""
    if index >= len(layers) - 1 or not args:
        return None
    signature, arguments = _bound(layers[index], args, kwargs)
    if arguments is None or "attention_mask" not in signature.parameters:
        return None
    hidden = args[0]
    length = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None
    mask = arguments.get("attention_mask")
    if length is None or (mask is not None and not _square_mask(mask, length)):
        return None
    var_keyword = _var_keyword(signature)
    extra = (arguments.get(var_keyword) or {}) if var_keyword else {}
    cache = arguments.get("past_key_values", extra.get("past_key_values"))
    if cache is not None:
        try:
            if cache.get_seq_length(index + 1) != 0:
                return None  # the cache held tokens before this forward: keys beyond the prompt
        except (AttributeError, TypeError, IndexError):
            return None
    return signature


def build(
    layers: tuple[torch.nn.Module, ...],
    layers_path: str,
    index: int,
    original: torch.Tensor,
    rows: torch.Tensor,
    signature,
) -> tuple[Pack, torch.Tensor] | None:
    """The pack after layer ``index`` of ``layers`` (at ``layers_path``; the unedited row ``original`` there and
    the invokes' edited ``rows``, ``check``'s signature), and the packed hidden state; None when packing does
    not apply or would not pay."""
    if index >= len(layers) - 1 or original.dim() != 3 or original.shape[0] != 1 or rows.dim() != 3:
        return None
    n, length, width = rows.shape
    if tuple(original.shape[1:]) != (length, width) or length < 2:
        return None
    with torch.no_grad():
        changed = (rows != original).any(-1)  # (n, T)
        first = torch.where(changed.any(1), changed.int().argmax(1), length).tolist()
    packed_tokens = length + sum(length - p for p in first)
    cost_pack = 6 * width * packed_tokens + packed_tokens * packed_tokens
    cost_rows = n * (6 * width * length + length * length)
    if packed_tokens > _MAX_TOKENS or cost_pack > _GAIN * cost_rows:
        return None

    device = rows.device
    positions = [*range(length)]
    segment = [-1] * length
    unpack: list[int] = []
    for i, p in enumerate(first):
        start = len(positions)
        unpack.extend(range(p))
        unpack.extend(range(start, start + length - p))
        positions.extend(range(p, length))
        segment.extend([i] * (length - p))
    pos = torch.tensor(positions, device=device)
    seg = torch.tensor(segment, device=device)
    limit = torch.tensor([p + 1 for p in range(length)] + [first[s] for s in segment[length:]], device=device)
    plain_key = (seg == -1)[None, :] & (pos[None, :] < limit[:, None])
    own_key = (seg[:, None] == seg[None, :]) & (seg[:, None] != -1) & (pos[None, :] <= pos[:, None])
    allowed = plain_key | own_key
    dtype = original.dtype if original.is_floating_point() else torch.float32
    hidden = torch.cat([original[0]] + [rows[i, p:] for i, p in enumerate(first)]).unsqueeze(0)
    unpack_index = torch.tensor(unpack, device=device)
    paths = frozenset(f"{layers_path}.{i}" for i in range(index + 1, len(layers)))
    pack = Pack(layers[index + 1 :], paths, pos, allowed, unpack_index, n, length, dtype, signature)
    return pack, hidden


__all__ = ["Pack", "build", "check", "pack_layers"]
