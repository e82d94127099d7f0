"""The tracer's recording: every operation inside a block becomes one IR node, in program order.

:class:`Recording` is the part of :class:`~intervene_compiler.tracing.Tracer` that envoys and proxies call while a
block records: ``_record`` (the general path: encode the arguments with :class:`~.recorder.Recorder`, order the
node after the last mutation of what it reads, check iteration-block scope, run it on fakes if they are on),
``_site`` / ``_save`` (the hot path of a loop of small traces: a site read or a save only notes its node in
``_lazy``; ``_nodes`` builds the notes into nodes when something reads them), ``_set_site``, which call of a
module a site addresses (``_call_of``, ``_next_call``), and taking a node out of program order for a backward
block (``_defer_node`` / ``_undefer_node``). The state it reads and writes is declared on ``Tracer`` (and, for the
type checker, in ``state.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import TracingError, user_location, user_location_at
from ..ir import Node, Op, Ref, Site, SiteKind, is_mutation
from ..ir.nodes import make_node
from .iteration import check_scope
from .proxy import new_proxy
from .recorder import Recorder

if TYPE_CHECKING:
    from .proxy import Proxy
    from .state import TracerState
else:
    TracerState = object  # declarations for the type checker only (see state.py)

_SITE, _SAVE = Op.SITE, Op.SAVE  # enum class attribute lookups are slow


class Recording(Recorder, TracerState):
    """Recording a tracer's block into nodes (a part of :class:`~intervene_compiler.tracing.Tracer`)."""

    def _record(
        self, op: Op, target: Any, args: tuple = (), kwargs: dict | None = None, *, after=()
    ) -> Proxy:
        if self._closed:  # a trace recorded earlier in the open session: record where the session is now
            # (not None: a trace is closed by handing it to its session, see Running._defer_to_session)
            return self._session._record(op, target, args, kwargs, after=after)  # type: ignore[union-attr]
        if self._finished:
            raise TracingError(
                "this tracing block has already exited; its values can no longer record operations",
                user_location(),
                "do the work inside the `with` block, or on saved values after it",
            )
        if (op is Op.GRAD or op is Op.SET_GRAD) and self._deferred:
            # inside `with loss.backward():` a gradient is that backward's, the next one in program order (one
            # read after a plain `loss.backward()` call is that earlier backward's: see GraphPlan.grad_backward)
            kwargs = {"backward": "next"}
        refs: list[int] = []
        enc_args: tuple = self._encode(args, refs) if args else ()
        enc_kwargs = tuple([(k, self._encode(v, refs)) for k, v in kwargs.items()]) if kwargs else ()
        if refs:
            last_mut = self._last_mut
            deps = {last_mut[r] for r in refs if r in last_mut} if last_mut else set()
            if self._body_of:
                deps = check_scope(self, refs, deps)
            if after:
                deps.update(after)
        else:
            deps = after
        nid = next(self._ids)
        # the encoding collected the Ref leaves' ids in the order Node would: no second walk of the arguments
        node = make_node(
            nid,
            op,
            target,
            enc_args,
            enc_kwargs,
            self._guards,
            tuple(sorted(set(deps))) if deps else (),
            self._invoke,
            user_location(),
            tuple(refs),
        )
        if self._lazy:
            self._flush()
        self._node_list.append(node)
        if refs and is_mutation(node) and type(enc_args[0]) is Ref:
            if type(self._last_mut) is not dict:  # the class-level default is an empty read-only mapping
                self._last_mut = {}
            self._last_mut[enc_args[0].id] = nid
        if self._fakes is not None:
            self._fakes.execute(node, strict=self._validate)
        return new_proxy(self, nid)

    # The nodes recorded so far. Site reads and saves on the plain path (``_site``, ``_save``) only note what their
    # node is, in ``_lazy``: a repeated trace of nothing else never builds its nodes (``_optimized`` finds its
    # graphs by a key of those notes). Reading ``_nodes`` builds them, after the ones built before, so the list
    # is always every node in program order.
    @property
    def _nodes(self) -> list[Node]:
        if self._lazy:
            self._flush()
        return self._node_list

    @_nodes.setter
    def _nodes(self, nodes: list[Node]) -> None:
        """Record into ``nodes`` from here on (an iteration block records its body into a list of its own)."""
        if self._lazy:
            self._flush()
        self._node_list = nodes

    def _flush(self) -> None:
        """Build the nodes of the notes in ``_lazy``: ``(id, site cache key, loc)`` for a SITE node, ``(id,
        saved id, after, guards, invoke, loc)`` for a SAVE node (what ``_record`` would have built)."""
        out = self._node_list
        for entry in self._lazy:
            if len(entry) == 3:
                nid, (path, kind, call, invoke, guards), loc = entry
                out.append(
                    make_node(nid, _SITE, Site(path, kind, call, invoke), (), (), guards, (), invoke, loc, ())
                )
            else:
                nid, ref, after, guards, invoke, loc = entry
                out.append(make_node(nid, _SAVE, None, (Ref(ref),), (), guards, after, invoke, loc, (ref,)))
        self._lazy = []

    def _call_of(self, path: str) -> int:
        """The call a site access addresses: counted from the run's start, or inside an iteration block from the
        step's start (negative, see ``Site``)."""
        call = self._call_idx.get(path, 0)
        return call if self._frame is None else -1 - call

    def _next_call(self, path: str, step: int) -> None:
        """Address the call ``step`` after the current one of the module at ``path`` from here on."""
        if type(self._call_idx) is not dict:  # the class-level default is an empty read-only mapping
            self._call_idx = {}
        self._call_idx[path] = self._call_idx.get(path, 0) + step

    def _site(self, path: str, kind: SiteKind) -> Proxy:
        call = self._call_idx.get(path, 0)  # _call_of, inlined
        if self._frame is not None:
            call = -1 - call
        invoke = self._invoke
        guards = self._guards
        key = (path, kind, call, invoke, guards)
        proxy = self._site_cache.get(key)
        if proxy is None:
            if self._closed or self._finished or self._fakes is not None:
                proxy = self._record(_SITE, Site(path, kind, call, invoke))
            else:  # _record of a node without arguments, noted (see _nodes)
                nid = next(self._ids)
                # called by an envoy's .output/.input/.inputs, whose caller is the user's line
                self._lazy.append((nid, key, user_location_at(2)))
                proxy = new_proxy(self, nid)
            self._site_cache[key] = proxy
        return proxy

    def _save(self, proxy: Proxy) -> None:
        nid = proxy._id
        if nid is None:
            nid = proxy._node_id()
        saved = self._saved_ids
        if nid in saved:
            return
        saved.add(nid)
        if (
            proxy._tracer is not self
            or self._closed
            or self._finished
            or self._fakes is not None
            or self._body_of
        ):
            # another tracer's value, a block closed into a session or finished, fake execution or closed
            # iteration blocks: recorded as a node (the common case below is only noted)
            self._record(_SAVE, None, (proxy,))
            return
        # _record(Op.SAVE, None, (proxy,)), whose one argument is this tracer's value, noted (see _nodes)
        last = self._last_mut.get(nid)
        self._lazy.append(
            (
                next(self._ids),
                nid,
                () if last is None else (last,),
                self._guards,
                self._invoke,
                user_location_at(2),  # called by Proxy.save, whose caller is the user's line
            )
        )

    def _set_site(self, path: str, kind: SiteKind, value: Any) -> None:
        if value is None:
            name = "model" + ("." + path if path else "")
            raise TracingError(
                f"`{name}.{kind.value} = None` would replace the module's {kind.value} with nothing",
                user_location(),
                "set a value of the same kind (e.g. `torch.zeros_like(...)` to ablate it), or drop the line",
            )
        call = self._call_of(path)
        self._record(Op.SET, Site(path, kind, call, self._invoke), (value,))
        for key in [k for k in self._site_cache if k[0] == path and k[2] == call]:
            del self._site_cache[key]

    def _skip_site(self, path: str, value: Any) -> None:
        """``model.<path>.skip(value)``: a SET of the module's output marked ``skip`` (the runner returns the value
        instead of calling the forward; see backends/eager/events.py)."""
        loc = user_location()
        name = "model" + ("." + path if path else "")
        if not path:
            raise TracingError(
                f"`{name}.skip()` would skip the whole model", loc, "skip one of its submodules"
            )
        if self._frame is not None:
            raise TracingError(
                f"`{name}.skip()` inside `tracer.all()` / `tracer.iter[...]` is not supported",
                loc,
                "skip the module in a trace (or a generate block, where it is skipped at the prompt's step)",
            )
        if value is None:
            raise TracingError(f"`{name}.skip(None)` would make the module's output nothing", loc)
        call = self._call_of(path)
        self._record(Op.SET, Site(path, SiteKind.OUTPUT, call, self._invoke), (value,), {"skip": True})
        for key in [k for k in self._site_cache if k[0] == path and k[2] == call]:
            del self._site_cache[key]

    def _defer_node(self, node_id: int) -> None:
        """Take a just-recorded node out of program order until :meth:`_undefer_node` (backward blocks)."""
        if not self._nodes or self._nodes[-1].id != node_id:
            raise TracingError(
                "`with loss.backward():` must directly follow the backward call", user_location()
            )
        if type(self._deferred) is not dict:  # the class-level default is an empty read-only mapping
            self._deferred = {}
        self._deferred[node_id] = self._nodes.pop()

    def _undefer_node(self, node_id: int) -> None:
        # a dict by now (not the read-only default): _defer_node put the node in it
        n = self._deferred.pop(node_id)  # type: ignore[attr-defined]
        nid = next(self._ids)
        self._nodes.append(
            Node(nid, n.op, n.target, n.args, n.kwargs, n.guards, n.after, n.invoke, n.body, n.loc)
        )


__all__ = ["Recording"]
