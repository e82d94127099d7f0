"""Gradient edits inside a compiled trace: ``.grad = ...`` and ``.grad[...] = v`` on a site's gradient.

The edited site passes through :func:`grad_edit`, an identity custom op whose backward
(:func:`grad_edit_backward`, opaque to Inductor) calls the running call's :class:`GradEdits`: it runs the post
nodes that are ready when the backward reaches that site (as the eager backend's gradient hook does) and returns
the edited gradient. The ``torch.library`` registrations (``intervene_compiler::grad_edit`` and
``intervene_compiler::grad_edit_backward``) live here and only here: a custom op may be defined once per process.
"""

from __future__ import annotations

import torch

from ...errors import check_set_shape
from ...ir import Op
from .backward import BackwardSplit


@torch.library.custom_op("intervene_compiler::grad_edit", mutates_args=())
def grad_edit(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Identity in the forward; in the backward, the gradient goes through the host's gradient edits for
    ``slot`` (:class:`GradEdits`), so ``.grad = ...`` inside a compiled trace changes what flows further back."""
    return x.clone()


@grad_edit.register_fake
def _grad_edit_fake(x: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("intervene_compiler::grad_edit_backward", mutates_args=())
def grad_edit_backward(grad: torch.Tensor, slot: int) -> torch.Tensor:
    edits = GradEdits.active[-1] if GradEdits.active else None
    if edits is None:  # a backward outside the trace: no edits apply (as the eager backend's removed hooks)
        return grad.clone()
    return edits(slot, grad)


@grad_edit_backward.register_fake
def _grad_edit_backward_fake(grad: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(grad)


def _grad_edit_setup(ctx, inputs, output) -> None:
    ctx.slot = inputs[1]


def _grad_edit_grad(ctx, grad):
    return grad_edit_backward(grad, ctx.slot), None


grad_edit.register_autograd(_grad_edit_grad, setup_context=_grad_edit_setup)


class GradEdits:
    """The host side of :func:`grad_edit` for one compiled call: when the backward reaches an edited site, run
    the post nodes that are ready (in program order: reads of that site's ``.grad``, what they compute, its
    ``.grad = ...``), as the eager backend's gradient hook does, and return the site's gradient as they left it.
    """

    active: list[GradEdits] = []  # the call whose backward runs now (innermost last)

    def __init__(self, split: BackwardSplit, env: dict, value_of, held=None):
        self.site_of = {slot: site for site, slot in split.edits.items()}
        self.nodes = [n for n in split.post if n.op is not Op.BACKWARD]
        self.post_ids = {n.id for n in split.post}
        self.env = env
        self.value_of = value_of  # (node) -> a value op's value, or the value a SET_GRAD sets
        self.held = held

    def __call__(self, slot: int, grad: torch.Tensor) -> torch.Tensor:
        site = self.site_of[slot]
        env = self.env
        current = grad
        for node in self.nodes:
            if node.id in env:
                continue
            if node.op is Op.GRAD or node.op is Op.SET_GRAD:
                if node.args[0].id != site:
                    continue  # another site's gradient: runs when the backward reaches that site
            if any(d not in env for d in node.refs if d != site) or any(
                a not in env for a in node.after if a in self.post_ids
            ):
                continue
            if self.held is not None and not self.held(node.id):
                env[node.id] = None
                continue
            if node.op is Op.GRAD:
                env[node.id] = current
            elif node.op is Op.SET_GRAD:
                value = self.value_of(node)
                check_set_shape(current, value, node.loc, "the gradient")
                current = value
                env[node.id] = None
            else:
                env[node.id] = self.value_of(node)
        return current.to(grad.dtype).clone()


__all__ = ["GradEdits", "grad_edit", "grad_edit_backward"]
