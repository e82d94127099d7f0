"""The interpreter's glue for shared-prefix runs (``run_graph(..., repeat=n)``): suffix packing's hooks and the
layered backend's layer swaps.

``packing.py`` decides the packed layout (which positions each invoke runs, the packed masks); this mixin is
what a run does with it: at the end of the shared prefix (or at a later touched layer's output) it packs the
hidden state and hooks every later decoder layer, whose pre-hook gives the layer its packed inputs, and unpacks
at the next touched event or after the last layer. It also swaps the decoder layers' ``forward`` for the
compiled backend's ``layer_forward`` (``backends/compiled/layered.py``). A mixin (methods on the run itself)
rather than a helper object: the run's hooks call these per event, and a mixin adds no indirection there.

Mixed into :class:`~.interpreter.Interpreter`; uses its ``target``, ``adhoc`` and ``reuse``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ...runtime import Target
from . import packing
from . import reuse as _reuse
from .hooks import add_hook


class SharedPrefix:
    """Shared-prefix state and packing hooks of a run (see the module docstring). Class-level defaults: a run
    sets its own when they change (``run_graph`` sets ``repeat``, ``pack_plan``, ``reuse``, ``layer_forward``)."""

    repeat = 0  # > 0: the forward runs on one row until the first touched event repeats it (see run_graph)
    # (decoder layers' path, the layers) when a shared-prefix run may pack (packing.py)
    pack_plan: tuple[str, tuple[torch.nn.Module, ...]] | None = None
    pack: packing.Pack | None = None  # the packed layout while later layers run on it
    pack_handles: list | tuple = ()
    reuse: _reuse.Plan | None = None  # layers replayed from and recorded into the model's memo (reuse.py)
    layer_forward: Callable[..., Any] | None = None  # see run_graph
    # the interpreter's
    target: Target
    adhoc: int

    def _swap_layers(self, handles: list) -> None:
        """Run ``layer_forward`` instead of each decoder layer's ``forward`` (those ``reuse`` does not replay)."""
        found, fn = self.target.decoder_layers(), self.layer_forward
        assert found is not None and fn is not None, "layer swaps need decoder layers and a layer forward"
        layers = found[1]
        start = 0 if self.reuse is None else self.reuse.skip + 1
        for layer in layers[start:]:
            handles.append(_reuse.Swap(layer, functools.partial(fn, layer)))

    def _start_pack(self, path: str, original, rows, args: tuple, kwargs: dict, signature=None):
        """At the end of the shared prefix, or at a later touched layer's output while packed (``signature``
        given): the packed hidden state when ``path`` is a decoder layer and packing pays, else ``rows``. The
        first pack hooks every later layer (its packed mask) and the last one (unpack after it)."""
        assert self.pack_plan is not None, "a pack starts only in a run that may pack"
        layers_path, layers = self.pack_plan
        prefix = layers_path + "."
        if (
            not path.startswith(prefix)
            or type(original) is not torch.Tensor
            or not isinstance(rows, torch.Tensor)
        ):
            return rows
        try:
            index = int(path[len(prefix) :])
        except ValueError:
            return rows
        if signature is None:
            signature = packing.check(layers, index, args, kwargs)
            if signature is None:
                return rows
        built = packing.build(layers, layers_path, index, original, rows, signature)
        if built is None:
            return rows
        pack, hidden = built
        self.pack = pack
        if not self.pack_handles:  # a pack again later reuses these hooks (they read self.pack)
            self.pack_handles = handles = []
            for layer in pack.layers:
                handles.append(add_hook(layer, self._pack_pre_hook, pre=True))
            handles.append(add_hook(layers[-1], self._pack_post_hook, pre=False))
        return hidden

    def _pack_pre_hook(self, mod, args, kwargs):
        """A later decoder layer's inputs while packed: its packed mask and positions, or the unpacked rows."""
        if self.pack is None or self.adhoc:
            return None
        packed = self.pack.layer_inputs(args, kwargs)
        return packed if packed is not None else self._unpack_inputs(args, kwargs)

    def _pack_post_hook(self, mod, args, kwargs, output):
        """After the last decoder layer: unpack to one row per invoke."""
        if self.pack is None or self.adhoc:
            return None
        return self._end_pack(output)

    def _end_pack(self, hidden):
        """``hidden`` unpacked to one row per invoke; the run is no longer packed."""
        pack, self.pack = self.pack, None
        return pack.unpack(hidden)

    def _unpack_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A decoder layer's ``(args, kwargs)`` with its hidden state unpacked."""
        if args:
            return (self._end_pack(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._end_pack(kwargs["hidden_states"])
        return args, kwargs


__all__ = ["SharedPrefix"]
