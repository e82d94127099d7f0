"""The inert hook a pickled or copied model holds in place of the compiled backend's dispatcher hooks.

The compiled backend's hooks stay on a model between traces (``backends/compiled/dispatcher.py``). Pickling or
deep-copying the model copies its hook dicts, but a dispatcher belongs to one process and one model, so its hooks
copy as :func:`inert_hook`, which changes nothing; wrapping the copy (``NNsight(copy)``, or unpickling a wrapped
model) removes them (:func:`strip_inert_hooks`).
"""

from __future__ import annotations

from typing import Any

import torch


def inert_hook(*args: Any) -> None:
    """A hook that changes nothing (what a copied dispatcher hook becomes)."""
    return None


def make_inert():
    """The object a dispatcher hook unpickles (or deep-copies) as."""
    return inert_hook


def strip_inert_hooks(module: torch.nn.Module) -> None:
    """Remove every :func:`inert_hook` from ``module`` and its submodules."""
    for m in module.modules():
        for hooks_name, extra_names in _HOOK_DICTS:
            hooks = getattr(m, hooks_name)
            for key in [k for k, hook in hooks.items() if hook is inert_hook]:
                del hooks[key]
                for name in extra_names:  # the flags torch keeps by the hook's handle id
                    getattr(m, name).pop(key, None)


# nn.Module's hook dicts (names, as torch spells them) and the flag dicts keyed like each
_HOOK_DICTS = (
    ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
)


__all__ = ["inert_hook", "make_inert", "strip_inert_hooks"]
