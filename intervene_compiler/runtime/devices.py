"""Models ``accelerate`` dispatched (``from_pretrained(..., device_map=...)``): where their modules compute.

accelerate puts a hook on each placed module (``module._hf_hook``: an ``AlignDevicesHook``, or a
``SequentialHook`` of several) that moves the module's inputs to its *execution device*; an *offloaded* module
(``"disk"``, or ``"cpu"`` beside accelerators) keeps its weights on the meta device between calls and its hook
loads them for each call. So a dispatched model's first parameter may be on meta while it runs on the CPU or a
GPU: ask the hooks first (``execution_device``, ``module_device``). accelerate is never imported here.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_META = torch.device("meta")


def accelerate_hooks(module: torch.nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` itself (a ``SequentialHook`` flattened), or []."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    inner = getattr(hook, "hooks", None)
    return list(inner) if isinstance(inner, (list, tuple)) else [hook]


def _device(device: Any) -> torch.device:
    if isinstance(device, int):  # accelerate's GPU index
        try:
            return torch.device(device)  # the current accelerator's (cuda, xpu, ...)
        except RuntimeError:
            return torch.device("cuda", device)
    return torch.device(device)


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The device accelerate's hook on ``module`` moves its inputs to (None without such a hook)."""
    for hook in accelerate_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None and str(device) != "meta":
            return _device(device)
    return None


def module_device(module: torch.nn.Module) -> torch.device | None:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first parameter
    or buffer that holds data, else meta (a model built on the meta device), else None (no tensors)."""
    device = execution_device(module)
    if device is not None:
        return device
    meta = False
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            if not t.is_meta:
                return t.device
            meta = True
    return _META if meta else None


def forward_slot(module: torch.nn.Module) -> str:
    """Where a forward set on ``module`` for a run goes: ``"forward"``, or, on a module accelerate hooked (its
    instance ``forward`` is accelerate's, which moves the inputs, loads offloaded weights and calls
    ``module._old_forward``), ``"_old_forward"``, so the run's forward runs inside accelerate's."""
    d = module.__dict__
    return "_old_forward" if "_hf_hook" in d and "_old_forward" in d and "forward" in d else "forward"


_OFFLOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # root module -> bool


def offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate offloads some of ``module``'s weights (their hooks load them at each call; they are on
    meta between calls). Found once per module (the hooks are set when the model loads)."""
    hit = _OFFLOADED.get(module)
    if hit is None:
        hit = _OFFLOADED[module] = any(
            getattr(h, "offload", False) for m in module.modules() for h in accelerate_hooks(m)
        )
    return hit


OFFLOAD_FALLBACK = (
    "accelerate offloads some of the model's weights (device_map with 'disk' or CPU offload): its hooks load them "
    "at each module's call, which cannot be compiled; runs eagerly"
)


def offload_reason(module: torch.nn.Module) -> str | None:
    """Why a compiled run of ``module`` runs eagerly instead (its weights are offloaded), or None."""
    return OFFLOAD_FALLBACK if offloaded(module) else None


__all__ = [
    "OFFLOAD_FALLBACK",
    "accelerate_hooks",
    "execution_device",
    "forward_slot",
    "module_device",
    "offload_reason",
    "offloaded",
]
