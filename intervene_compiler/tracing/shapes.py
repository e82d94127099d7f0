"""Shapes while a block records: :class:`Shape`, and the tracer's reads of ``.shape``/``.dtype``/``.device``/``.ndim``.

A proxy's metadata is not known until the model runs, so the first such read turns on fake execution
(:class:`~intervene_compiler.tracing.fakes.FakeTracker`, imported only then): the model runs on fake tensors for
every invoke so far and every node recorded so far runs on fakes too; from then on ``Tracer._record`` runs each
new node on fakes as it is recorded. :class:`FakeShapes` is the part of the :class:`Tracer` that does this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import TracingError, user_location
from .iteration import nodes_for_fakes

if TYPE_CHECKING:
    from .fakes import FakeTracker
    from .proxy import Proxy
    from .state import TracerState
else:
    TracerState = object  # declarations for the type checker only (see state.py)


class Shape(tuple):
    """A shape read inside a block: a tuple that prints and compares like ``torch.Size``.

    ``.save()`` returns it, so era-two code (``x.shape.save()``) runs.
    """

    def save(self) -> Shape:
        return self

    def numel(self) -> int:
        return torch.Size(self).numel()

    def __getitem__(self, index):
        item = tuple.__getitem__(self, index)
        return Shape(item) if isinstance(index, slice) else item

    def __repr__(self) -> str:
        return repr(torch.Size(self))


class FakeShapes(TracerState):
    """The tracer's fake-tensor shapes (a part of :class:`~intervene_compiler.tracing.Tracer`): ``_fakes`` is
    None until :meth:`_enable_fakes` (by ``model.scan``, validation, or the first metadata read)."""

    def _enable_fakes(self) -> FakeTracker:
        from .fakes import FakeTracker

        self._fakes = FakeTracker(self)
        for node in nodes_for_fakes(self):
            self._fakes.execute(node, strict=self._validate)
        return self._fakes

    def _meta(self, proxy: Proxy, attr: str) -> Any:
        if self._finished:
            return getattr(proxy.value, attr)
        fakes = self._fakes
        if fakes is None:
            # (every invoker in _invokers has been entered: its inputs are set)
            if any(inv.inputs[0] is None for inv in self._invokers):  # type: ignore[index]
                raise TracingError(
                    f"`.{attr}` is not known while this trace records: its input is a session value, which exists "
                    "only when the session runs",
                    user_location(),
                    "read shapes with `model.scan(example_input)` before the session",
                )
            fakes = self._enable_fakes()
        nid = proxy._node_id()
        fake = fakes.value(nid)
        value = getattr(fake, attr)
        return Shape(value) if attr == "shape" else value


__all__ = ["FakeShapes", "Shape"]
