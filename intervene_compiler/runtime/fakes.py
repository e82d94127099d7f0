"""Fake-tensor copies of run inputs: shapes and dtypes without data, for validation and schedule recording."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def to_fake(value: Any, mode: FakeTensorMode) -> Any:
    """``value`` with every tensor in (nested) tuples, lists and dicts replaced by a fake of it."""
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    t = type(value)
    if t is tuple or t is list:
        return t(to_fake(v, mode) for v in value)
    if t is dict:
        return {k: to_fake(v, mode) for k, v in value.items()}
    return value


def fake_copy(value: Any, mode: FakeTensorMode) -> Any:
    """A deep copy of ``value`` (a KV cache object included) whose tensors are fakes: recording cannot touch it."""
    memo: dict[int, Any] = {}
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            memo[id(v)] = mode.from_tensor(v)
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif hasattr(v, "__dict__") and not isinstance(v, (type, torch.nn.Module)) and not callable(v):
            stack.extend(vars(v).values())
    return copy.deepcopy(value, memo)
