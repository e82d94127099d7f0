"""The persistent hooks that hand module events to the running compiled program (and the opt-in regions).

A :class:`Dispatcher` is installed once per model and stays: its hooks are inert outside a compiled call, so
Dynamo's guards on the hook dicts hold from call to call. A module of its own: it owns the model-side hooks, while
:class:`~.program.Program` owns what runs at an event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...ir import SiteKind
from ...runtime.inert import make_inert
from ...runtime.source import hooked_call, instrumented_forward, owner_and_call

if TYPE_CHECKING:
    from .program import Program


class Dispatcher:
    """Hooks that forward module events to the program of the running entry, on the modules programs need.

    A module gets its pre-/post-hook the first time a program has an event there (:meth:`ensure`), and keeps it
    (so Dynamo's guards on the hook dicts of the entries compiled since stay valid); modules no program touches
    get none, so Dynamo traces their plain ``forward`` instead of inlining an inert hook at each of them. Inert
    when no program runs: outside a compiled call the model computes exactly what it computed before.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.program: Program | None = None
        self.hooked: set[tuple[str, bool]] = set()  # (module path, pre-hook?)
        self._placed: list[list[Any]] = []  # [module, pre-hook?, hook, its handle] per hook, see keep_last
        self._regions: tuple | None = None  # see regions()
        self._region_fns: dict[type, Any] = {}

    def ensure(self, program: Program) -> None:
        """Hook the modules ``program`` has events on (a no-op once they are)."""
        points = program.hook_points
        if points <= self.hooked:
            return
        for path, pre in sorted(points - self.hooked):
            if owner_and_call(path) is not None:  # a call inside a forward: its events come from op_forward
                self.hooked.add((path, pre))
                continue
            mod = self.module.get_submodule(path)
            hook = self._pre(path) if pre else self._post(path)
            self._placed.append([mod, pre, hook, _register(mod, pre, hook)])
            self.hooked.add((path, pre))
        self._regions = None

    def keep_last(self) -> None:
        """Move each of our hooks that a hook the user registered since follows back to the end of its module's
        hooks, where the eager backend's hooks (registered at each trace) are: an event sees the module's input and
        output as the user's hooks left them, in both backends. Called before a call through ``torch.compile``'s
        wrapper (a direct call runs only when Dynamo's guards on the hook dicts pass: they are as compiled)."""
        for placed in self._placed:
            mod, pre, hook, handle = placed
            hooks = mod._forward_pre_hooks if pre else mod._forward_hooks
            if hooks and next(reversed(hooks)) != handle.id:
                handle.remove()
                placed[3] = _register(mod, pre, hook)

    def regions(self) -> tuple:
        """(member, its forward as a nested compile region, its parameters) for each repeated block no program
        looks inside.

        A member of a ModuleList of two or more modules of one class, with children, none of which (at any depth)
        is hooked: its hooks (events on the member itself) stay outside its ``forward``, so the region holds only
        model code. During a compiled call the member's ``forward`` is this region (``torch.compiler.
        nested_compile_region``): Inductor compiles the identical bodies once instead of once per member. Stable
        objects, so Dynamo's guards on them hold from call to call; recomputed when hooks are added.
        """
        if self._regions is not None:
            return self._regions
        hooked = {path for path, _ in self.hooked}
        found: list[tuple[Any, ...]] = []
        for path, mod in self.module.named_modules():
            if not isinstance(mod, torch.nn.ModuleList) or len(mod) < 2:
                continue
            members = list(mod)
            cls = type(members[0])
            if any(type(m) is not cls for m in members) or not any(True for _ in members[0].children()):
                continue
            if any(path == f or path.startswith(f + ".") for f, _ in found):
                continue  # inside a region already
            for i, member in enumerate(members):
                name = f"{path}.{i}" if path else str(i)
                inside = any(h.startswith(name + ".") for h in hooked)
                if inside or "forward" in member.__dict__:
                    continue
                found.append((name, member))
        self._regions = tuple(
            (member, self._region_fn(type(member), len(found)).__get__(member), tuple(member.parameters()))
            for _, member in found
        )
        return self._regions

    def usable_regions(self) -> tuple:
        """:meth:`regions`, less members with trainable parameters while grad mode is on: torch 2.13 computes
        wrong gradients through a nested compile region whose parameters require grad."""
        regions = self.regions()
        if regions and torch.is_grad_enabled():
            regions = tuple(r for r in regions if not any(p.requires_grad for p in r[2]))
        return regions

    def _region_fn(self, cls: type[torch.nn.Module], count: int):
        fn = self._region_fns.get(cls)
        if fn is None:
            fn = torch.compiler.nested_compile_region(cls.forward, max_reuse_entries=max(8, count + 1))
            self._region_fns[cls] = fn
        return fn

    def op_forward(self, module: torch.nn.Module, owner: str) -> Any:
        """``module``'s forward rewritten (``runtime/source.py``) so that its named calls make events for the
        running program, as the hooks do for modules; set on the instance during a compiled call whose graph has
        op-level sites there (stable per program: Dynamo guards on it)."""
        prefix = f"{owner}.source." if owner else "source."
        hooks: dict[str, tuple[_PreHook, _PostHook]] = {}

        def op(name, fn, *args, **kwargs):
            pair = hooks.get(name)
            if pair is None:
                pair = hooks[name] = (_PreHook(self, prefix + name), _PostHook(self, prefix + name))
            return hooked_call(module, pair[0], pair[1], fn, args, kwargs)

        return instrumented_forward(module, op)

    def remove(self) -> None:
        for *_, handle in self._placed:
            handle.remove()
        self._placed = []
        self.hooked = set()
        self._regions = None

    def _pre(self, path: str) -> _PreHook:
        return _PreHook(self, path)

    def _post(self, path: str) -> _PostHook:
        return _PostHook(self, path)


def _register(module: torch.nn.Module, pre: bool, hook: Any) -> Any:
    if pre:
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    return module.register_forward_hook(hook, with_kwargs=True)


class _Hook:
    """A dispatcher hook on one module (see :class:`Dispatcher`).

    It stays on the module between traces, so pickling the module (``torch.save(module)``, ``pickle.dumps`` of
    the wrapped model) or deep-copying it meets it: a copy gets an inert hook instead (``runtime.inert``), since
    the dispatcher and its programs belong to this process and this model.
    """

    __slots__ = ("dispatcher", "path")

    def __init__(self, dispatcher: Dispatcher, path: str):
        self.dispatcher = dispatcher
        self.path = path

    def __reduce__(self):
        return (make_inert, ())

    def fire(self, kind: SiteKind, value: Any) -> Any:
        """Hand the event to the running program; its new value if it writes there, else None.

        Inert outside a program's call: with no program set, and with a program set but no call of it running
        here (its ``call_state`` is None), which is what a plain forward of the model on another thread sees
        while this thread's compiled code runs (that code holds the hooks' work; only Dynamo's tracing of the
        program, or a run of it outside Dynamo, makes a call state these hooks then read)."""
        program = self.dispatcher.program
        if program is None or program.call_state is None or program.adhoc:
            return None
        path = self.path
        calls = program.calls_in if kind is SiteKind.INPUTS else program.calls_out
        call = calls.get(path, 0)
        calls[path] = call + 1
        key = (path, kind, call)
        if not program.handles(key):
            return None
        new = program.on_event(key, value)
        return new if program.writes(key) else None


class _PreHook(_Hook):
    __slots__ = ()

    def __call__(self, mod, args, kwargs):
        new = self.fire(SiteKind.INPUTS, (args, kwargs))
        return None if new is None else (tuple(new[0]), dict(new[1]))


class _PostHook(_Hook):
    __slots__ = ()

    def __call__(self, mod, args, kwargs, output):
        return self.fire(SiteKind.OUTPUT, output)


__all__ = ["Dispatcher"]
