"""How module events reach the interpreter: the run's forward hooks (or wraps) on the modules its graph touches.

Each hook counts the module's calls (a site's ``call`` index), skips calls the graph does not touch, and hands the
event's value to :meth:`Interpreter.visit` (or, for a plain run's output events, to its fast visit). Around the
visit it does what a shared-prefix run needs at its first touched event (repeat the one row to one per invoke,
start packing) and while packed (unpack, pack again), and inside a generation step it serves the event's
step-relative key too. ``tracer.cache()``'s hooks live here as well. A mixin (methods on the run itself): these
hooks are the per-event hot path, so they reach the run's state and visit without an extra object.

Mixed into :class:`~.interpreter.Interpreter`; uses its scheduler state and the ``SharedPrefix`` methods.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ...errors import InterventionError, SourceLoc
from ...ir import Graph, Node, Op, Site, SiteKind
from ...ir.nodes import walk_nodes
from ...runtime import CacheEntry, ModuleCache, narrow, repeat_rows, resolve
from ...runtime.source import SOURCE, instrumented_forward, op_router, owner_and_call
from .hooks import InstanceForward, hook_modules
from .plan import _INPUTS, _OUTPUT, _SITE_OPS, GraphPlan, hook_paths
from .prefix import SharedPrefix
from .states import NodeState

_DONE_STATE, _SKIPPED_STATE = NodeState.DONE, NodeState.SKIPPED

if TYPE_CHECKING:
    from .steps import Steps


RUN = object()  # skip_value: no skip at this call


def _skip_error(node: Node, why: str) -> InterventionError:
    return InterventionError(
        f"the module cannot be skipped here: {why}",
        node.loc,
        "skip it with a value from earlier modules, for the whole batch (`with tracer.invoke():` or no invokes)",
    )


def skip_forward(module: torch.nn.Module, skip_value: Callable[[], Any]) -> Any:
    """``module``'s forward, bound, returning ``skip_value()`` instead of running at a skipped call (anything but
    ``RUN``); the class's forward at any other call. Shared by the eager runner (``SkipForward``) and the compiled
    call (``compiled/run.py``), where Dynamo traces it."""
    own = type(module).forward

    def forward(self, *args, **kwargs):
        value = skip_value() if self is module else RUN
        return own(self, *args, **kwargs) if value is RUN else value

    forward.__wrapped__ = own  # type: ignore[attr-defined]  # inspect.signature sees the class forward's
    return types.MethodType(forward, module)


class SkipForward(InstanceForward):
    """The forward of a module a graph skips (``.skip(value)``), set on the instance for the run: at a skipped
    call it returns the value (the interpreter's ``skip_value``) instead of running the module; at any other call,
    the class's forward. Torch's hooks run around it as around any forward."""

    __slots__ = ()

    def __init__(self, module: torch.nn.Module, path: str, run: ModuleEvents):
        self._install(module, skip_forward(module, lambda: run.skip_value(path)))


class OpForward(InstanceForward):
    """A module's forward rewritten for the run so that the calls the graph touches (op-level sites,
    ``envoy.source``) make events: each named call's pre-hook sees its ``(args, kwargs)`` and may replace them, its
    post-hook its output (``runtime/source.py``)."""

    __slots__ = ()

    def __init__(self, module: torch.nn.Module, calls: dict[str, tuple], locate: Callable[[str], Any]):
        self._install(module, instrumented_forward(module, op_router(module, calls, locate=locate)))


class ModuleEvents(SharedPrefix):
    """The run's module hooks (see the module docstring). Derives from ``SharedPrefix``: the hooks repeat, pack
    and unpack the shared prefix at the event."""

    # the interpreter's
    module: torch.nn.Module
    graph: Graph
    batch: int
    env: dict[int, Any]
    active: dict
    calls_in: dict[str, int]
    calls_out: dict[str, int]
    site_nodes: dict[tuple, list[int]]
    steps: Steps | None
    in_forward: bool
    _plan: GraphPlan
    _events: dict | None
    state: dict
    params: tuple

    if TYPE_CHECKING:

        def visit(self, key: tuple, value: Any) -> Any: ...
        def _visit_fast(self, key: tuple, value: Any) -> Any: ...
        def site_rows(self, site: Site) -> tuple[int, int]: ...

    def _install_hooks(self, handles: list) -> None:
        """Add the run's hooks (and wraps) to ``handles`` as they go in: the caller removes whatever went in,
        even when installing fails part-way."""
        if self._plan.has_cache:
            for node in self.graph.nodes:
                if node.op is Op.CACHE:
                    self._start_cache(node, handles)
        # steps.py registers the ITER bodies' site keys in this run's site_nodes: derive the hooks from them
        hooks = self._plan.hooks if self.steps is None else hook_paths(self.site_nodes)
        # a plain run (one whose nodes use the event schedule, with no reuse, layer swaps or packing, which add
        # hooks and forwards of their own) may wrap the hooked modules' forwards instead of hooking them
        ops: dict[str, dict[str, tuple]] = {}  # module path -> call name -> (its pre-hook, its post-hook)
        if any(owner_and_call(h[0]) is not None for h in hooks):
            module_hooks = []
            for path, hook_in, hook_out in hooks:
                found = owner_and_call(path)
                if found is None:
                    module_hooks.append((path, hook_in, hook_out))
                    continue
                pre = self._pre_hook(path) if hook_in else None
                post = self._post_hook(path) if hook_out else None
                ops.setdefault(found[0], {})[found[1]] = (pre, post)
            hooks = tuple(module_hooks)
        wrap = (
            self._events is not None
            and self.reuse is None
            and self.layer_forward is None
            and self.pack_plan is None
            and not self._plan.skips  # a skipped module's forward is set on the instance (below)
            and not ops  # as is a forward with op-level sites
        )
        hook_modules(self.module, hooks, self._pre_hook, self._post_hook, handles, wrap)
        for path in self._plan.skips:
            handles.append(SkipForward(self.module.get_submodule(path), path, self))
        for path, calls in ops.items():
            if path in self._plan.skips:
                continue  # its forward does not run: its calls' sites are never produced
            prefix = f"{path}{SOURCE}" if path else "source."
            handles.append(
                OpForward(self.module.get_submodule(path), calls, functools.partial(self._site_loc, prefix))
            )

    def _site_loc(self, prefix: str, name: str) -> SourceLoc | None:
        """The line of the first site node on path ``prefix + name`` (where an error about that site points)."""
        path = prefix + name
        for n in walk_nodes(self.graph.nodes):
            if n.op in _SITE_OPS and n.target.path == path:
                return n.loc
        return None

    def skip_value(self, path: str) -> Any:
        """The output a ``.skip(value)`` gives module ``path`` at this call, or ``RUN`` (call the forward)."""
        call = self.calls_out.get(path, 0)
        for node in self._plan.skips[path]:
            if node.target.call != call:
                continue
            state = self.state
            for g, want in node.guards:
                s = state.get(g)
                if s == _SKIPPED_STATE or s == _DONE_STATE and self.env[g] != want:
                    return RUN
                if s != _DONE_STATE:
                    raise _skip_error(node, "its `tracer.cond` condition is not known before the module runs")
            for d in node.refs:
                if state.get(d) != _DONE_STATE:
                    raise _skip_error(node, "its value is computed only after the module would run")
            start, stop = self.site_rows(node.target)
            if stop - start != self.batch:
                raise _skip_error(node, "it is for one invoke's rows, and a module runs for the whole batch")
            return resolve(node.args[0], self.env.__getitem__, self.params.__getitem__)
        return RUN

    def _pre_hook(self, path: str):
        """The forward pre-hook of module ``path``: its ``.input``/``.inputs`` event."""
        calls = self.calls_in
        site_nodes = self.site_nodes

        def hook(mod, args, kwargs):
            if self.adhoc:
                return None
            call = calls.get(path, 0)
            calls[path] = call + 1
            key = (path, _INPUTS, call)
            if self.steps is None:
                if key not in site_nodes:
                    return None
                keys = (key,)
            else:
                keys = self._event_keys(key, (args, kwargs))
                if not keys:
                    return None
            if self.repeat:
                args, kwargs = repeat_rows((args, kwargs), self.repeat)
                self.repeat = 0
                before = None  # the repeated inputs replace the originals
            elif self.pack is not None and path in self.pack.paths:
                args, kwargs = self._unpack_inputs(args, kwargs)
                before = None
            else:
                before = (args, kwargs)
            new = (args, kwargs)
            for k in keys:
                new = self.visit(k, new)
            if new is before:
                return None
            new_args, new_kwargs = new
            return tuple(new_args), dict(new_kwargs)

        return hook

    def _post_hook(self, path: str):
        """The forward hook of module ``path``: its ``.output`` event."""
        calls = self.calls_out
        site_nodes = self.site_nodes

        def hook(mod, args, kwargs, output):
            if self.adhoc:
                return None
            call = calls.get(path, 0)
            calls[path] = call + 1
            key = (path, _OUTPUT, call)
            if self.steps is None:
                if key not in site_nodes:
                    return None
                if self.repeat:
                    new = self.visit(key, repeat_rows(output, self.repeat))
                    self.repeat = 0
                    if self.pack_plan is not None and call == 0:
                        return self._start_pack(path, output, new, args, kwargs)
                    return new
                if self.pack is not None and path in self.pack.paths:  # unpack; pack again after the visit
                    pack = self.pack
                    unedited = pack.unedited(output)
                    new = self.visit(key, self._end_pack(output))
                    if call == 0:
                        return self._start_pack(path, unedited, new, args, kwargs, pack.signature)
                    return new
                if self._events is not None and self.in_forward and not self.active:  # visit's test
                    new = self._visit_fast(key, output)
                else:
                    new = self.visit(key, output)
            else:
                new = output
                for k in self._event_keys(key, output):
                    new = self.visit(k, new)
            return None if new is output else new

        return hook

    def _event_keys(self, key: tuple, value: Any) -> list[tuple]:
        """The site keys a module event serves: its own, and its step-relative key inside a live step (an event
        of a module that runs ahead of the step's forward is kept for the next step: ``Steps.ahead_of_step``)."""
        keys = [key] if key in self.site_nodes else []
        if self.steps is not None:
            self.steps.ahead_of_step(key, value)
            rel = self.steps.relative(key)
            if rel is not None and self.site_nodes.get(rel):
                keys.append(rel)
        return keys

    def _start_cache(self, node: Node, handles: list) -> None:
        """``tracer.cache()``: hook the modules CACHE ``node`` names, filling its dict of ``CacheEntry``s (hooks
        registered before the run's own, so before any node sees the value). A module called again (a shared
        module, each step of ``generate``) gets a list of entries, one per call, as in nnsight."""
        options = dict(node.kwargs)
        cache = ModuleCache()
        self.env[node.id] = cache
        start, stop = (
            (0, self.batch)
            if node.invoke is None
            else self.site_rows(Site("", SiteKind.OUTPUT, 0, node.invoke))
        )
        paths = node.target
        for path, mod in self.module.named_modules():
            if paths is not None and path not in paths:
                continue
            name = "model" + ("." + path if path else "")

            def post(mod, args, kwargs, output, name=name):
                if self.adhoc:
                    return
                entry = CacheEntry()
                if options.get("include_output", True):
                    entry.output = narrow(output, start, stop, self.batch)
                if options.get("include_inputs", False):
                    entry.inputs = narrow((args, kwargs), start, stop, self.batch)
                cache.add(name, entry)

            handles.append(mod.register_forward_hook(post, with_kwargs=True))


__all__ = ["ModuleEvents"]
