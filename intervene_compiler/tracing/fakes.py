"""Shapes inside a tracing block: the model and each recorded node run on fake tensors (no real compute).

Turned on by ``model.scan(x)``, ``trace(..., scan=True, validate=True)``, or the first ``.shape``/``.dtype``
read inside a block. The model runs once per invoke under ``FakeTensorMode``, recording every module's input and
output; from then on each recorded node also runs on fakes when it is recorded. With validation on, an error
(an out-of-range index, a set of the wrong shape) is raised at the user's line with its original type, before
the real model runs; otherwise a node whose fake run fails only has an unknown shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)

from ..errors import InterventionError, TracingError, check_set_value, execution_error, missed_site_error
from ..ir import Node, Op, Site, SiteKind, format_node, format_site
from ..runtime import VALUE_OPS, conform, narrow, resolve, to_fake
from ..runtime.source import HOOKED, owner_and_call

if TYPE_CHECKING:
    from .state import TracerState

_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


class _Unknown:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class FakeTracker:
    def __init__(self, tracer: TracerState):
        self.tracer = tracer
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.values: dict[int, Any] = {}
        self.runs: dict[int | None, dict] = {}
        self.params: dict[int, Any] = {}

    def value(self, node_id: int) -> Any:
        v = self.values.get(node_id)
        if isinstance(v, _Unknown) or v is None and node_id not in self.values:
            reason = v.reason if isinstance(v, _Unknown) else "it was not computed"
            raise TracingError(f"the shape of this value is not known inside the block: {reason}")
        return v

    def execute(self, node: Node, strict: bool) -> None:
        try:
            with self.mode:
                self.values[node.id] = self._run(node, strict)
        except _UnknownInput as e:
            self.values[node.id] = _Unknown(str(e))
        except _DATA_DEPENDENT as e:
            self.values[node.id] = _Unknown(f"it depends on data ({type(e).__name__})")
        except InterventionError:
            if strict:
                raise
            self.values[node.id] = _Unknown("fake execution failed")
        except Exception as e:
            if strict:
                raise execution_error(e, node.loc, format_node(node)) from e
            self.values[node.id] = _Unknown(f"{type(e).__name__}: {e}")

    def _run(self, node: Node, strict: bool) -> Any:
        op = node.op
        if op is Op.SITE:
            return self._site(node, strict)
        a = resolve(node.args, self._lookup, self._param)
        kw = {k: resolve(v, self._lookup, self._param) for k, v in node.kwargs}
        if op is Op.SET:
            old = self._site(node, strict)
            if (
                "resize",
                True,
            ) not in node.kwargs:  # a pass's deliberate shape change (passes/last_position.py)
                new = conform(old, a[0]) if isinstance(old, torch.Tensor) else a[0]
                check_set_value(old, new, node.loc, str(node.target))
            return None
        if op is Op.GRAD:
            return torch.empty_like(a[0]) if isinstance(a[0], torch.Tensor) else None
        if op is Op.METHOD and node.target in _AUTOGRAD_ONLY:  # fakes run without autograd: nothing to check
            return None
        if op is Op.MODULE:
            return self.tracer.model._module.get_submodule(node.target.removesuffix(HOOKED))(*a, **kw)
        if op in (Op.LOG, Op.STOP, Op.BACKWARD, Op.SET_GRAD, Op.COND):
            return None
        if op is Op.CACHE:
            return {}
        return VALUE_OPS[op](node, a, kw)

    def _lookup(self, node_id: int) -> Any:
        v = self.values.get(node_id)
        if isinstance(v, _Unknown):
            raise _UnknownInput(v.reason)
        if v is None and node_id not in self.values:  # a value of the session this trace is part of
            raise _UnknownInput("it is a session value, computed when the session runs")
        return v

    def _param(self, index: int) -> Any:
        if index not in self.params:
            p = self.tracer._params[index]
            self.params[index] = self.mode.from_tensor(p) if isinstance(p, torch.Tensor) else p
        return self.params[index]

    def _site(self, node: Node, strict: bool) -> Any:
        site: Site = node.target
        acts = self._activations(site.invoke)
        key = site.key
        if site.call < 0:  # a step-relative site inside an iteration block: shapes come from step 0
            key = (key[0], key[1], -1 - site.call)
        if key not in acts:
            if owner_and_call(site.path) is not None:  # fake runs make no op-level events: shapes unknown
                raise _UnknownInput(f"{site} is a call inside a forward, whose shapes are found when it runs")
            if strict:
                detail = "the module does not run (that often) for this input"
                raise missed_site_error(format_site(node), node.loc, detail)
            raise _UnknownInput(f"{site} is not produced by the model for this input")
        value = acts[key]
        if site.kind is SiteKind.INPUT:
            args, kwargs = value
            return args[0] if args else next(iter(kwargs.values()), None)
        return value

    def _activations(self, invoke: int | None) -> dict:
        acts = self.runs.get(invoke)
        if acts is None:
            tracer = self.tracer
            invokers = tracer._invokers if invoke is None else [tracer._invokers[invoke]]
            if not invokers:
                raise _UnknownInput("the block has no input yet")
            if any(inv.inputs is None or inv.inputs[0] is None for inv in invokers):
                raise _UnknownInput("its input is a session value, which exists only when the session runs")
            # every invoker in _invokers has been entered, and none has a session value (a trace in a session
            # never runs on fakes, see FakeShapes._meta): each one's inputs are its prepared (args, kwargs)
            args, kwargs = tracer.model._batch_inputs([inv.inputs for inv in invokers])  # type: ignore[misc]
            acts = record_activations(tracer.model, self.mode, args, kwargs)
            tracer.model._fake_extras(acts, kwargs, tracer, self.mode)
            self.runs[invoke] = acts
        return acts


_AUTOGRAD_ONLY = frozenset({"retain_grad", "register_hook"})


class _UnknownInput(Exception):
    pass


def record_activations(model, mode: FakeTensorMode, args: tuple, kwargs: dict) -> dict:
    """Run ``model`` on fakes of ``args``/``kwargs``; return {(path, kind, call): output or (args, kwargs)}."""
    module = model._module
    acts: dict = {}
    calls_in: dict[str, int] = {}
    calls_out: dict[str, int] = {}
    handles = []

    def pre(path):
        def hook(mod, a, kw):
            n = calls_in.get(path, 0)
            calls_in[path] = n + 1
            acts[(path, SiteKind.INPUTS, n)] = (a, kw)

        return hook

    def post(path):
        def hook(mod, a, kw, out):
            n = calls_out.get(path, 0)
            calls_out[path] = n + 1
            acts[(path, SiteKind.OUTPUT, n)] = out

        return hook

    try:
        for path, mod in module.named_modules():
            handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(mod.register_forward_hook(post(path), with_kwargs=True))
        with mode:
            fake_args = to_fake(args, mode)
            fake_kwargs = to_fake(kwargs, mode)
            with torch.no_grad():
                model._forward(*fake_args, **fake_kwargs)
    finally:
        for h in handles:
            h.remove()
    return acts


__all__ = ["FakeTracker", "narrow", "record_activations"]
