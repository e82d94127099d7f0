"""``tracer.cond`` on a tensor, compiled: predicated rather than branched.

The recorded schedule takes both branches of a condition on a tensor (``schedule.BOTH``); the program computes
every guarded value either way and selects: a guarded SET writes ``where(cond, new, old)`` (:func:`select`), a
guarded in-place write is undone where the condition is false, and the host drops saved values (and skips host
effects) whose effective guards (:func:`effective_guards`: own, their conditions', and every value read) fail.
What cannot be predicated (:data:`UNPREDICATED`: a stop, an attribute set, gradients, a cache) makes the key fall
back to eager mode (:func:`unpredicated_reason`). The program's side (``Program._evaluate_when``) uses these.
"""

from __future__ import annotations

from typing import Any

import torch

from ...ir import Op

UNPREDICATED = {
    Op.STOP: "`tracer.stop()`",
    Op.SETATTR: "setting an attribute",
    Op.BACKWARD: "a backward pass",
    Op.GRAD: "reading `.grad`",
    Op.SET_GRAD: "setting `.grad`",
    Op.CACHE: "`tracer.cache()`",
}


def unpredicated_reason(nodes, guards: dict, dynamic_conds: tuple[int, ...]) -> str | None:
    """Why a node cannot run under a condition on a tensor (see UNPREDICATED), or None. ``guards``: the
    effective guards (:func:`effective_guards`)."""
    for n in nodes:
        if n.op in UNPREDICATED and any(g in dynamic_conds for g, _ in guards.get(n.id, ())):
            return f"{UNPREDICATED[n.op]} under a `tracer.cond` on a tensor is not compiled"
    return None


def effective_guards(nodes) -> dict[int, tuple[tuple[int, bool], ...]]:
    """Node id -> every (COND id, branch) that must hold for it to run in eager mode: its own guards, its
    conditions' guards, and those of every value it reads (a node reading a skipped value is skipped)."""
    found: dict[int, frozenset] = {}
    for n in nodes:
        guards = set(n.guards)
        for d in n.refs:
            guards |= found.get(d, frozenset())
        for g, _ in n.guards:
            guards |= found.get(g, frozenset())
        if guards:
            found[n.id] = frozenset(guards)
    return {nid: tuple(sorted(g)) for nid, g in found.items()}


def select(when: torch.Tensor, new: Any, old: Any) -> Any:
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        if new.shape != old.shape:
            raise NotImplementedError(
                "a set under a `tracer.cond` on a tensor that changes the value's shape is not compiled"
            )
        return torch.where(when, new, old)
    if new is old:
        return new
    raise NotImplementedError(
        f"setting a {type(old).__name__} value under a `tracer.cond` on a tensor is not compiled"
    )


def tree_zip_strict(fn, a: Any, b: Any) -> Any:
    if type(a) in (tuple, list) and type(b) in (tuple, list) and len(a) == len(b):
        return type(a)(tree_zip_strict(fn, x, y) for x, y in zip(a, b))
    if type(a) is dict and type(b) is dict and a.keys() == b.keys():
        return {k: tree_zip_strict(fn, a[k], b[k]) for k in a}
    return fn(a, b)


__all__ = ["UNPREDICATED", "effective_guards", "select", "tree_zip_strict", "unpredicated_reason"]
