"""Loading a language model as users do, and running it where ``accelerate`` put it.

``from_pretrained(..., device_map=...)`` hands the model to ``accelerate``, which sets hooks that move each
module's inputs to its execution device and, for offloaded modules (``"disk"``, or ``"cpu"`` beside
accelerators), load the weights for each call (meta between calls: ``runtime.devices``). Here:

- ``input_device``: where the token inputs go (the input embeddings' execution device), not the first weight's;
- ``offload_as_fakes``: a fake-tensor run (``scan``, ``.shape`` inside a block) of an offloaded model, whose
  hooks would copy real weights from disk into meta parameters under ``FakeTensorMode``;
- ``meta_dtype``: the dtype the meta model (built before the weights load) gets from a ``dtype=`` argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..runtime.devices import accelerate_hooks, execution_device, module_device, offloaded


def input_device(model: torch.nn.Module) -> torch.device | None:
    """Where a language model's token inputs go: the device its input embeddings run on (accelerate's
    execution device when they are dispatched or offloaded; on several GPUs the first one's), else where the root
    runs (None for a model without tensors; meta for a model built on the meta device)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if callable(get):
        try:
            embeddings = get()
        except (AttributeError, NotImplementedError):
            embeddings = None
    if isinstance(embeddings, torch.nn.Module):
        device = module_device(embeddings)
        if device is not None and device.type != "meta":
            return device
    device = execution_device(model)
    return device if device is not None else module_device(model)


def running_on_fakes(kwargs: dict) -> bool:
    """Whether this forward runs on fake tensors (a shape run; call it only outside Dynamo)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(v, FakeTensor) for v in kwargs.values())


@contextmanager
def offload_as_fakes(model: torch.nn.Module, kwargs: dict) -> Iterator[None]:
    """For a fake-tensor run of ``model``: its offloaded modules hold meta weights that accelerate's hooks fill
    from disk at each call, which fails on fakes. For the run, each such hook stops loading (``offload=False``)
    and the meta weights are replaced by empty fake tensors on the hook's execution device; all is put back
    after. Does nothing for a model without offloaded weights."""
    from torch._subclasses.fake_tensor import FakeTensor

    fake = next((v for v in kwargs.values() if isinstance(v, FakeTensor)), None)
    if fake is None or not offloaded(model):
        yield
        return
    mode = fake.fake_mode
    hooks: list[Any] = []
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        with mode:
            for m in model.modules():
                for hook in accelerate_hooks(m):
                    if not getattr(hook, "offload", False):
                        continue
                    hook.offload = False
                    hooks.append(hook)
                    device = execution_device(m) or fake.device
                    for sub in m.modules() if getattr(hook, "place_submodules", False) else (m,):
                        params: dict[str, Any] = sub._parameters
                        for name, t in list(params.items()):
                            if t is not None and t.is_meta:
                                swapped.append((params, name, t))
                                empty = torch.empty(t.shape, dtype=t.dtype, device=device)
                                params[name] = torch.nn.Parameter(empty, requires_grad=t.requires_grad)
                        buffers: dict[str, Any] = sub._buffers
                        for name, t in list(buffers.items()):
                            if t is not None and t.is_meta:
                                swapped.append((buffers, name, t))
                                buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=device)
        yield
    finally:
        for tensors, name, t in reversed(swapped):
            tensors[name] = t
        for hook in hooks:
            hook.offload = True


def meta_dtype(dtype: Any, config: Any) -> torch.dtype | None:
    """The dtype of the meta model built before the weights load, from ``from_pretrained``'s ``dtype``: a
    ``torch.dtype``, its name (``"bfloat16"``), or ``"auto"`` (the checkpoint's, from its config); None (the
    default) for anything else (a per-module dict)."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


__all__ = ["input_device", "meta_dtype", "offload_as_fakes", "running_on_fakes"]
