"""Torch hook internals of the eager backend: how a run puts its hooks on the model's modules, and takes them off.

Owns everything that touches torch's private hook machinery, so the interpreter and the reads-only path only ask
for ``hook_modules(module, paths, pre_hook, post_hook, handles, wrap)``:

- ``_Hook``: a forward (pre-)hook written straight into a module's hook dicts with torch's id counter (about half
  the cost of ``register_forward_hook``'s handle); ``add_hook`` falls back to the public API on a torch without
  those dicts.
- ``_Wrap``: the fast path for a module nothing else runs around (``wrappable``): a ``forward`` set on the
  instance for the run that calls the run's pre-hook, the class's forward and the post-hook, about 2 us less per
  call than torch's hook dispatch. Its forward is a hot path: it checks the calling frame against the code of
  ``_call_impl`` (and its nested ``inner``) and ``_slow_forward`` with module-level constants.
"""

from __future__ import annotations

from sys import _getframe
from types import FunctionType, MethodType
from typing import Any

import torch
import torch.nn.modules.module as _torch_module
from torch.utils.hooks import RemovableHandle

from ...runtime.devices import forward_slot


class _Hook:
    """A forward (pre-)hook with kwargs, put into the module's hook dicts exactly as
    ``register_forward_hook(hook, with_kwargs=True)`` does, without the RemovableHandle (its weak references cost
    more than the rest of installing and removing a hook). The run removes it in its ``finally``."""

    __slots__ = ("hooks", "flags", "id")

    def __init__(self, hooks: dict, flags: dict, fn) -> None:
        hid = RemovableHandle.next_id  # torch's id counter, shared with handles registered the usual way
        RemovableHandle.next_id = hid + 1
        hooks[hid] = fn
        flags[hid] = True
        self.hooks = hooks
        self.flags = flags
        self.id = hid

    def remove(self) -> None:
        self.hooks.pop(self.id, None)
        self.flags.pop(self.id, None)


class InstanceForward:
    """A ``forward`` set on a module instance for a run (``_install``); ``remove`` puts back what was there (if
    it is still the run's): nothing, or a forward set on the instance before. The base of the runner's wraps,
    skips and rewritten forwards. On a module accelerate hooked it replaces ``_old_forward``, which accelerate's
    own ``forward`` calls after moving the inputs and loading offloaded weights (``runtime.devices.forward_slot``)."""

    __slots__ = ("module", "forward", "slot", "before")

    def _install(self, module: torch.nn.Module, bound: Any) -> None:
        d = module.__dict__
        slot = forward_slot(module)
        self.module = module
        self.forward = bound
        self.slot = slot
        self.before = d.get(slot)
        d[slot] = bound

    def remove(self) -> None:
        d = self.module.__dict__
        slot = self.slot
        if d.get(slot) is self.forward:
            if self.before is None:
                del d[slot]
            else:
                d[slot] = self.before


class _Wrap(InstanceForward):
    """The runner's pre- and post-hook of one module run by a ``forward`` set on the instance for the run, around
    the class's own: what torch's hook dispatch (``Module._call_impl``'s slow path) would do with them, for about
    2 us less per hooked call. Only for a module nothing else runs around (``wrappable``), so everything that
    sees the module's inputs and output sees them in the order hooks would. ``remove`` deletes the attribute.

    The wrap runs the hooks when torch's call machinery calls it: ``_call_impl`` (no other hooks), its nested
    ``inner`` (hooks registered during the run: a model's lazy capture hooks, a profiler's global ones, a nested
    trace's) or ``_slow_forward`` (``torch.jit.trace``), and always while Dynamo traces it (a compiled parent:
    Dynamo inlines ``_call_impl``; ``sys._getframe`` cannot be traced). A parent calling ``child.forward(x)``
    directly runs no hooks, and so no wrap's. A forward pre-hook registered during the run runs before the wrap's
    instead of after; post-hooks keep their order."""

    __slots__ = ("pre", "post")

    def __init__(self, module: torch.nn.Module, pre, post) -> None:
        self.pre = pre
        self.post = post
        own = type(module).forward  # a plain function (``wrappable``)
        # what marks this wrap's forward (a copy's is found by it): the function does not refer to itself, so the
        # run's hooks and the values their closures hold are freed when the run returns, not by the cycle collector
        mark = object()

        # Bound to the module, so a copy made during the run (copy.deepcopy binds it to the copy) computes with
        # its own weights and runs no hooks of this run (``_unwrap_copy``).
        def forward(self, *args, **kwargs):
            if self is not module:
                return _unwrap_copy(self, mark, own, args, kwargs)
            if not _is_compiling():
                caller = _getframe(1).f_code
                # `module.forward(x)` called directly (not by `module(x)`): hooks would not run
                if caller is not _CALL_IMPL and caller is not _INNER and caller is not _SLOW_FORWARD:
                    return own(self, *args, **kwargs)
            if pre is not None:
                new = pre(module, args, kwargs)
                if new is not None:
                    args, kwargs = new
            output = own(self, *args, **kwargs)
            if post is not None:
                new = post(module, args, kwargs, output)
                if new is not None:
                    return new
            return output

        # inspect.signature(module.forward), which transformers reads, sees the class forward's signature (less
        # `self`, as for any bound method)
        forward.__wrapped__ = own  # type: ignore[attr-defined]  # functools' convention, read by inspect
        forward.ic_wrap = mark  # type: ignore[attr-defined]
        self._install(module, MethodType(forward, module))


def _unwrap_copy(copy: torch.nn.Module, mark: object, own, args: tuple, kwargs: dict) -> Any:
    """A copy of a wrapped module made during the run got the wrap (marked ``mark``) bound to itself: it drops it
    (a plain module from its first call) and runs the class forward."""
    bound = copy.__dict__.get("forward")
    if getattr(getattr(bound, "__func__", None), "ic_wrap", None) is mark:
        del copy.__dict__["forward"]
    return own(copy, *args, **kwargs)


# the code of the frames that call a module's forward on `module(...)`: only those calls run hooks (and a wrap's)
_CALL_IMPL = torch.nn.Module._call_impl.__code__
# `_call_impl`'s nested function that runs hooks and the forward when any hook is registered
_INNER = next((c for c in _CALL_IMPL.co_consts if getattr(c, "co_name", None) == "inner"), None)
_SLOW_FORWARD = torch.nn.Module._slow_forward.__code__
_call_impl = torch.nn.Module._call_impl
_is_compiling = torch.compiler.is_compiling


def wrappable(mod: torch.nn.Module) -> bool:
    """May ``_Wrap`` stand in for hooks on ``mod``? Not when anything else runs around its forward: its own or
    global forward hooks (ours would run before them, not after), its own or global backward hooks (torch wraps
    the inputs between the pre-hooks and the forward), a forward already set on the instance (accelerate's, a
    reuse swap), a module compiled in place (``module.compile()``), or a class that is not plain (``_plain_class``)."""
    return _may_wrap() and _wrappable_here(mod)


def _may_wrap() -> bool:
    """No global hooks (checked once per install), and a torch whose ``_call_impl`` has an ``inner`` (``_Wrap``)."""
    return not (
        _INNER is None
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def _wrappable_here(mod: torch.nn.Module) -> bool:
    """``wrappable`` less the global checks (``_may_wrap``)."""
    d = mod.__dict__
    plain = _plain.get(type(mod))
    if plain is None:
        plain = _plain_class(type(mod))
    return plain and not (
        d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
        or "forward" in d
        or d.get("_compiled_call_impl") is not None  # module.compile(): Dynamo runs its calls
    )


_plain: dict[type, bool] = {}


def _plain_class(cls: type[torch.nn.Module]) -> bool:
    """A class torch's ``_call_impl`` calls and whose ``forward`` is a plain function: not scripted, no
    ``_call_impl`` of its own, no static or other descriptor for ``forward``. Memoized per class."""
    forward = next((k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__), None)
    plain = (
        not issubclass(cls, torch.jit.ScriptModule)
        and cls._call_impl is _call_impl
        and type(forward) is FunctionType
    )
    _plain[cls] = plain
    return plain


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """``module.get_submodule(path)``, walking the registered children directly when they are there."""
    mod: Any = module
    if path:
        try:
            for name in path.split("."):
                mod = mod._modules[name]
        except (KeyError, AttributeError, TypeError):
            return module.get_submodule(path)  # raises its own error for a path that names no module
        if not isinstance(mod, torch.nn.Module):
            return module.get_submodule(path)
    return mod


def add_hook(mod: torch.nn.Module, fn, pre: bool):
    """Add ``fn`` as a forward pre-hook (``pre``) or forward hook of ``mod``, with kwargs; the handle's
    ``remove()`` takes it off (a ``_Hook``, or torch's handle where the hook dicts are not there)."""
    try:
        if pre:
            return _Hook(mod._forward_pre_hooks, mod._forward_pre_hooks_with_kwargs, fn)
        return _Hook(mod._forward_hooks, mod._forward_hooks_with_kwargs, fn)
    except AttributeError:  # a torch without these dicts: the public API
        if pre:
            return mod.register_forward_pre_hook(fn, with_kwargs=True)
        return mod.register_forward_hook(fn, with_kwargs=True)


def hook_modules(
    module: torch.nn.Module, hooks: tuple, pre_hook, post_hook, handles: list, wrap: bool
) -> None:
    """Hook the modules of ``hooks`` (``GraphPlan.hooks``) with ``pre_hook(path)``/``post_hook(path)``, adding
    their handles to ``handles``; with ``wrap``, by a ``_Wrap`` where nothing else runs around the module
    (``wrappable``). A module registered under two names has an envoy at each, and is hooked at each: it is
    hooked, never wrapped, so its hooks run in the order they were added."""
    wraps: dict[int, _Wrap] | None = {} if wrap and _may_wrap() else None  # id(module) -> its _Wrap
    for path, hook_in, hook_out in hooks:
        mod = _submodule(module, path)
        if wraps is not None:
            key = id(mod)
            if key in wraps:  # a second name of a wrapped module: hook it at both, in order
                w = wraps.pop(key)
                w.remove()
                if w.pre is not None:
                    handles.append(add_hook(mod, w.pre, pre=True))
                if w.post is not None:
                    handles.append(add_hook(mod, w.post, pre=False))
            elif _wrappable_here(mod):
                w = _Wrap(mod, pre_hook(path) if hook_in else None, post_hook(path) if hook_out else None)
                wraps[key] = w
                handles.append(w)
                continue
        if hook_in:
            handles.append(add_hook(mod, pre_hook(path), pre=True))
        if hook_out:
            handles.append(add_hook(mod, post_hook(path), pre=False))


__all__ = ["InstanceForward", "add_hook", "hook_modules", "wrappable"]
