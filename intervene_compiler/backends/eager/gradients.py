"""The interpreter's gradient machinery: GRAD/SET_GRAD nodes run inside tensor hooks during the backward pass.

A GRAD node is *armed* once its value exists (``_arm_grad``): a tensor hook on that value makes the node's
``("grad", id)`` event active while autograd hands it the gradient, and the interpreter drains there. The
gradient of an invoke's rows is hooked on the batch tensor the model's backward actually reaches, found through
the row views a site read notes (``_note_row_views``). A mixin (methods on the run itself, as the other event
handlers): only graphs that read or set gradients use it, and the plain path never calls it.

Mixed into :class:`~.interpreter.Interpreter`; uses its ``state``, ``env``, ``graph``, ``current``, ``active``
and ``drain``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ...errors import GradientError
from ...ir import Graph, Node, Op
from .states import NodeState

_ARMED = NodeState.ARMED


class Gradients:
    """Gradient bookkeeping of a run (see the module docstring). The class-level defaults are empty and
    read-only: a run whose graph reads or sets gradients (or has steps) gets its own dicts."""

    # node id of a GRAD's value -> its tensor hook's handle
    # read-only defaults until a run that needs them makes its own dicts
    grad_hooks: dict[int, Any] = MappingProxyType({})  # type: ignore[assignment]
    # id(an invoke's rows of a site tensor) -> (those rows, the batch tensor, start, stop): a gradient of the
    # rows is hooked on the batch tensor, the one the model's backward actually reaches
    row_views: dict[int, tuple] = MappingProxyType({})  # type: ignore[assignment]
    # the interpreter's
    state: dict[int, NodeState]
    env: dict[int, Any]
    graph: Graph
    current: dict
    active: dict

    if TYPE_CHECKING:

        def drain(self) -> None: ...

    def _note_row_views(self, full: Any, rows: Any, start: int, stop: int) -> None:
        """Note every tensor of ``rows`` (a site read narrowed to an invoke's rows) as a view of ``full``'s."""
        if isinstance(full, torch.Tensor):
            if rows is not full:
                self.row_views[id(rows)] = (rows, full, start, stop)
        elif isinstance(full, (tuple, list)) and isinstance(rows, (tuple, list)):
            for f, r in zip(full, rows):
                self._note_row_views(f, r, start, stop)
        elif isinstance(full, dict) and isinstance(rows, dict):
            for k, r in rows.items():
                self._note_row_views(full.get(k), r, start, stop)

    def _arm_grad(self, node: Node) -> None:
        """GRAD or SET_GRAD ``node``'s value exists: hook its tensor (the batch tensor for an invoke's rows), so
        that the backward makes its ``("grad", id)`` event active and drains there."""
        target = node.args[0].id
        self.state[node.id] = _ARMED
        if target in self.grad_hooks:
            return
        tensor = self.env[target]
        if not any(n.op is Op.BACKWARD for n in self.graph.nodes):  # the first mistake to report
            raise no_backward_error(node)
        start = stop = None
        view = self.row_views.get(id(tensor))
        if view is not None and view[0] is tensor:  # an invoke's rows: hook the batch tensor, narrow its grad
            _, tensor, start, stop = view
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            raise no_grad_error(node)

        def hook(grad):
            key = ("grad", target)
            # a copy: autograd hands one gradient tensor to every input of an add (the residual stream and the
            # block), so `.grad[...] = v` in place on the original would change the other paths' gradient too
            part = (grad if start is None else grad[start:stop]).clone()
            self.current[key] = part
            self.active[key] = True
            try:
                self.drain()
            finally:
                self.active.pop(key, None)
            new = self.current.pop(key)
            if start is None:
                return new
            return torch.cat([grad[:start], new.to(grad.dtype), grad[stop:]])

        self.grad_hooks[target] = tensor.register_hook(hook)


def no_grad_error(node: Node) -> GradientError:
    """The error of a GRAD or SET_GRAD node whose value does not require grad."""
    what = "set" if node.op is Op.SET_GRAD else "read"
    return GradientError(
        f"`.grad` was {what} of a value that does not require grad, so no gradient will reach it",
        node.loc,
        "set `value.requires_grad = True` on it (or on an earlier value) before the loss is computed",
    )


def no_backward_error(node: Node) -> GradientError:
    """The error of a GRAD or SET_GRAD node no backward pass reached."""
    what = "set" if node.op is Op.SET_GRAD else "read"
    return GradientError(
        f"`.grad` was {what}, but no backward pass reached this value",
        node.loc,
        "call `loss.backward()` in the block after this line (or read the gradient inside "
        "`with loss.backward():`), with a loss that depends on this value",
    )


__all__ = ["Gradients", "no_backward_error", "no_grad_error"]
