"""An invoke's rows of a batched value: narrowing to them, replacing them, and repeating one row per invoke.

Tensors whose first dimension is the batch size are narrowed (as views, so in-place edits reach the batch);
tuples, lists and dicts (transformers' ModelOutput too) are walked; anything else is shared by all invokes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def narrow(value: Any, start: int, stop: int, batch: int) -> Any:
    if start == 0 and stop == batch:
        return value
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == batch else value
    t = type(value)
    if t is tuple or t is list:
        return t(narrow(v, start, stop, batch) for v in value)
    if isinstance(value, dict):
        items = {k: narrow(v, start, stop, batch) for k, v in value.items()}
        return items if t is dict else _rebuild(value, items)
    return value


def repeat_rows(value: Any, n: int) -> Any:
    """``value`` with every tensor of batch size 1 repeated to ``n`` rows (through tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == 1:
            return value.expand(n, *value.shape[1:]).clone()
        return value
    t = type(value)
    if t is tuple or t is list:
        return t(repeat_rows(v, n) for v in value)
    if isinstance(value, dict):
        items = {k: repeat_rows(v, n) for k, v in value.items()}
        return items if t is dict else _rebuild(value, items)
    return value


def replace(old: Any, new: Any, start: int, stop: int, batch: int, check: Callable[[Any, Any], None]) -> Any:
    """``old`` with rows [start, stop) replaced by ``new`` (all of it when the rows cover the batch)."""
    full = start == 0 and stop == batch
    if isinstance(old, torch.Tensor):
        part = old if full or old.dim() == 0 or old.shape[0] != batch else old[start:stop]
        new = conform(part, new)
        check(part, new)
        if full or part is old:
            return new
        return torch.cat([old[:start], new.to(old.dtype), old[stop:]])
    if full:
        return new
    t = type(old)
    if (t is tuple or t is list) and isinstance(new, (tuple, list)) and len(new) == len(old):
        return t(replace(o, n, start, stop, batch, check) for o, n in zip(old, new))
    if isinstance(old, dict) and isinstance(new, dict):
        items = {k: replace(v, new[k], start, stop, batch, check) if k in new else v for k, v in old.items()}
        return items if t is dict else _rebuild(old, items)
    return new


def conform(part: torch.Tensor, new: Any) -> Any:
    """``new`` as a value for ``part``'s place (the conversions ``part[...] = new`` would make): a number filled
    in, a 0-d tensor broadcast, a floating-point tensor of another precision cast, a tensor on another device
    moved. Anything else is left for the check (``errors.check_set_value``) to reject."""
    if isinstance(new, (int, float, bool)):
        return torch.full_like(part, new)
    if not isinstance(new, torch.Tensor):
        return new
    if new.dim() == 0 and part.dim() > 0:
        return new.to(part.dtype).expand_as(part).clone()
    if new.dtype != part.dtype and new.is_floating_point() and part.is_floating_point():
        new = new.to(part.dtype)
    if new.device != part.device and not new.is_meta:
        new = new.to(part.device)
    return new


def _rebuild(original: dict, items: dict) -> Any:
    try:
        return type(original)(**items)
    except TypeError:
        return items
