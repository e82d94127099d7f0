"""Sessions: many traces, of one model or several, recorded as one program and run in order when it exits.

``with model.session() as session:`` opens a :class:`Session`. Traces opened inside it do not run when their
block exits: each becomes a TRACE node of the session graph (its own graph as the node's body), and everything
written between traces (``ic.list()``, arithmetic on values, ``session.log``, an optimizer step) becomes session
nodes. The whole program runs when the session exits, traces in the order they were written. A value produced by
one trace can be used by a later one without ``.save()``; only saved values survive the session.

``session.iter(iterable)`` records its body once, as a LOOP node whose body graph runs once per item
(:class:`Loop`); ``iterator.exit()`` / ``session.exit()`` record EXIT nodes that leave the loop / the session.

Graph-era code creates training state inside the session (``torch.nn.Parameter(...)``, ``torch.optim.AdamW(...)``)
and expects it to be part of the program, so that ``optimizer.step()`` inside a loop body runs every iteration.
For that, while a session records (and only then), ``__new__`` of ``torch.nn.Parameter`` and of
``torch.optim.Optimizer`` record: a Parameter created at session level is a session value, and an optimizer built
on session values is one too. The classes themselves are untouched (isinstance, subclassing and lazily imported
torch modules work as usual); ``Parameter.__new__`` is restored when the session's block ends, before anything runs,
also on errors (``Optimizer.__new__`` stays, inert outside a recording session: see ``_install_patches``). This is
the only patching the package does.
"""

from __future__ import annotations

import itertools
import sys
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import SourceLoc, TracingError, ValueNotReadyError, user_location
from ..execute import run_session
from ..ir import Graph, Node, Op, Ref, format_node
from ..ir.nodes import walk_nodes
from .contexts import Cond
from .current import _current, _current_session, current_session
from .proxy import Proxy, _find_live_tracer
from .recorder import Recorder
from .saving import open_block, rebind

if TYPE_CHECKING:
    from contextvars import Token

    from .running import Running
    from .state import Guards
    from .tracer import Tracer


class Session(Recorder):
    """Records a session block (see the module docstring); users get it from ``model.session()``."""

    def __init__(self, model: Any = None, validate: bool = False):
        self.model = model
        self.validate = validate  # its traces are checked on fake tensors while they record
        self._session = self  # a session's own proxies belong to it, like those of the traces inside it
        self._nodes: list[Node] = []
        self._params: list[Any] = []
        self._param_index: dict[int, int] = {}
        self._ids = itertools.count()
        self._guards: Guards = ()
        self._saved_ids: set[int] = set()
        self._tracers: list[Running] = []  # the traces in the session (the part of a Tracer that runs it)
        self._trace_locs: list[SourceLoc | None] = []
        self._frame: Loop | None = None
        self._finished = False
        self._error: BaseException | None = None
        self._results: dict[int, Any] = {}
        self._exited: SourceLoc | None = None
        self._token: Token[Tracer | Session | None] | None = None
        self._session_token: Token[Session | None] | None = None
        self._patches: list[tuple[Any, str, Any]] = []
        self.graph: Graph | None = None
        self._remote: dict | None = None  # remote=True: {"blocking": bool} (tracing/remote.py)
        self._with_loc: SourceLoc | None = None
        self.job: Any = None

    # -- context protocol ---------------------------------------------------------------------------------------
    def __enter__(self) -> Session:
        if _current_session.get() is not None or _current.get() is not None:
            raise TracingError(
                "a session cannot be opened inside another session or tracing block",
                user_location(),
                "close the open block first; one session can hold traces of several models",
            )
        self._session_token = _current_session.set(self)
        self._token = _current.set(self)
        self._patches = _install_patches()
        open_block()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        _remove_patches(self._patches)
        self._patches = []
        assert self._token is not None and self._session_token is not None  # set by __enter__
        _current.reset(self._token)
        _current_session.reset(self._session_token)
        if exc_type is not None:
            self._finish(exc)
            return False
        try:
            self.graph = self._build_graph()
            self._results = {}
            if self._remote is not None:  # the service runs the whole session as one job (tracing/remote.py)
                from .remote import run_remote_session

                if not run_remote_session(self, self.graph, self._all_saved(), self._remote["blocking"]):
                    return False  # not blocking: `session.job.wait()` binds the values
            else:
                traces = [_SessionTrace(t, loc) for t, loc in zip(self._tracers, self._trace_locs)]
                run_session(self.graph, traces, self._all_saved(), self._results)
        except BaseException as e:
            self._finish(e)
            raise
        self._finish(None)
        rebind(sys._getframe(1), (self, *self._tracers))  # the names holding saved values hold the values now
        return False

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._finished = True
        for tracer in self._tracers:
            tracer._finish_in_session(self._results, error)

    # -- public API inside the block -----------------------------------------------------------------------------
    def iter(self, iterable: Any, return_context: bool = False, progress: bool = False) -> Loop:
        """``with session.iter(items) as item:`` records the body once; it runs once per item of ``items``.
        ``progress=True`` shows a tqdm bar over the items while the session runs (a local session only)."""
        return Loop(self, iterable, return_context, user_location(), progress)

    def log(self, *values: Any) -> None:
        """Print ``values`` when the session runs."""
        self._record(Op.LOG, None, values)

    def cond(self, condition: Any) -> Cond:
        """``with session.cond(x):`` runs what is inside only when ``bool(x)`` holds when the session runs."""
        proxy = self._record(Op.COND, None, (condition,))
        return Cond(self, self._guards + ((proxy._id, True),), (proxy._id,))

    def exit(self) -> None:
        """End the session here when it runs: later traces and nodes do not run."""
        self._record(Op.EXIT, None, ())

    def stop(self) -> None:
        """``session.stop()``: the same as :meth:`exit`."""
        self.exit()

    def apply(self, fn, *args: Any, **kwargs: Any) -> Proxy:
        """Record a call of any callable on session values."""
        return self._record(Op.CALL, fn, args, kwargs)

    # -- recording -----------------------------------------------------------------------------------------------
    def _record(
        self, op: Op, target: Any, args: tuple = (), kwargs: dict | None = None, *, after=()
    ) -> Proxy:
        current = _current.get()
        if current is not self and current is not None and current._session is self:
            return current._record(op, target, args, kwargs, after=after)  # the open trace inside the session
        if self._finished:
            raise TracingError(
                "this session has already run; its values can no longer record operations",
                user_location(),
                "do the work inside the session, or on saved values after it",
            )
        refs: list[int] = []
        enc_args = self._encode(args, refs)
        enc_kwargs = tuple((k, self._encode(v, refs)) for k, v in kwargs.items()) if kwargs else ()
        node = Node(
            next(self._ids), op, target, enc_args, enc_kwargs, self._guards, (), None, (), user_location()
        )
        self._nodes.append(node)
        return Proxy(self, node.id)

    def _add_trace(self, tracer: Running, graph: Graph, inputs: tuple, loc: SourceLoc | None) -> None:
        """Record a trace that exited inside the session as a TRACE node (it runs when the session does)."""
        slot = len(self._tracers)
        self._tracers.append(tracer)
        self._trace_locs.append(loc)
        refs: list[int] = []
        enc_inputs = self._encode(inputs, refs)
        node = Node(next(self._ids), Op.TRACE, slot, enc_inputs, (), self._guards, (), None, (graph,), loc)
        self._nodes.append(node)

    def _build_graph(self) -> Graph:
        graph = Graph(nodes=tuple(self._nodes), params=tuple(self._params), kind="session")
        graph = _add_exports(graph, self._ids)
        from ..ir import verify

        return verify(graph, where="tracing the session")

    # -- what proxies ask ----------------------------------------------------------------------------------------
    def _meta(self, proxy: Proxy, attr: str) -> Any:
        raise TracingError(
            f"`.{attr}` of a session value is not known until the session runs",
            user_location(),
            "read shapes inside a trace (or with `model.scan(x)` before the session)",
        )

    def _describe(self, proxy: Proxy) -> str:
        nid = proxy._node_id()
        node = next((n for n in walk_nodes(self._nodes) if n.id == nid), None)
        text = format_node(node) if node is not None else f"%{nid}"
        return f"<Proxy {text} (session)>"

    def _value_of(self, proxy: Proxy) -> Any:
        nid = proxy._node_id() if not self._finished else proxy._id
        return self._session_value(nid)

    def _session_value(self, nid: int | None) -> Any:
        if not self._finished:
            raise ValueNotReadyError(
                "`.value` was read inside the session, before it ran",
                user_location(),
                "read it after the session's `with` block ends; inside it, use the proxy itself",
            )
        if nid in self._results:
            return self._results[nid]
        if self._error is not None:
            raise ValueNotReadyError(
                f"this value was never computed: the session raised {type(self._error).__name__}",
                user_location(),
                "fix the error the session raised, then run it again",
            )
        if nid in self._all_saved():
            raise ValueNotReadyError(
                "this value was never computed: the session exited (or a condition skipped it) before it ran",
                user_location(),
                "check the session's exit() and cond() calls",
            )
        raise ValueNotReadyError(
            "this value was not saved, so it is gone after the session",
            user_location(),
            "call `.save()` on it inside the session",
        )

    def _all_saved(self) -> set[int]:
        out = set(self._saved_ids)
        for tracer in self._tracers:
            out |= tracer._saved_ids
        return out


class _SessionTrace:
    """A trace of the session as the session runner sees it (``execute.SessionTrace``)."""

    __slots__ = ("loc", "tracer")

    def __init__(self, tracer: Running, loc: SourceLoc | None):
        self.tracer = tracer
        self.loc = loc

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, int]:
        return self.tracer.model._prepare_inputs(*args, **kwargs)

    def run(self, graph: Graph, prepared: list[tuple[tuple, dict]]) -> dict[int, Any]:
        return self.tracer._run_bound(graph, prepared)


class Loop:
    """``with session.iter(items) as item:``: a body recorded once that runs once per item.

    With ``return_context=True`` the block yields ``(item, iterator)``; the iterator has ``exit()`` (leave the
    loop, usually under ``iterator.cond(...)``), ``log(...)``, ``cond(...)`` and ``iter(...)`` for nesting.
    """

    def __init__(
        self,
        session: Session,
        iterable: Any,
        return_context: bool,
        loc: SourceLoc | None,
        progress: bool = False,
    ):
        if progress and getattr(session, "_remote", None) is not None:
            raise TracingError(
                "session.iter(progress=True) shows a bar where the session runs, and this one runs on the service",
                loc,
                "drop `progress=True`: a remote job's status lines are printed instead (ic.CONFIG.APP.REMOTE_LOGGING)",
            )
        if isinstance(iterable, (str, bytes)) or not (
            isinstance(iterable, Proxy) or hasattr(iterable, "__iter__")
        ):
            raise TracingError(
                f"session.iter() needs an iterable, got {type(iterable).__name__}",
                loc,
                "pass a list, a tensor, a DataLoader or a session value such as an `ic.list()`",
            )
        self.session = session
        self.iterable = iterable
        self.return_context = return_context
        self.loc = loc
        self.progress = bool(progress)
        self.id: int | None = None  # set when the loop is entered
        self._arg: Any = None
        # what the body replaces while it records: the session's nodes, guards and open loop
        self._saved: tuple[list[Node], Guards, Loop | None] | None = None

    def __enter__(self) -> Any:
        s = self.session
        if _current.get() is not s:
            raise TracingError(
                "session.iter() must be used at session level, not inside a trace",
                self.loc,
                "open the loop in the session and the trace inside the loop",
            )
        self._arg = s._encode(self.iterable, [])
        self.id = next(s._ids)
        self._saved = (s._nodes, s._guards, s._frame)
        s._nodes, s._guards, s._frame = [], (), self
        item = Proxy(s, self.id)
        return (item, self) if self.return_context else item

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        s = self.session
        assert self.id is not None and self._saved is not None  # set by __enter__
        body = s._nodes
        s._nodes, guards, s._frame = self._saved
        s._guards = guards
        if exc_type is not None:
            return False
        node = Node(
            self.id,
            Op.LOOP,
            None,
            (self._arg,),
            (("progress", True),) if self.progress else (),
            guards,
            (),
            None,
            (Graph(nodes=tuple(body), kind="loop"),),
            self.loc,
        )
        s._nodes.append(node)
        return False

    def exit(self) -> None:
        """Leave this loop when the session runs this line (the rest of the iteration does not run)."""
        self.session._record(Op.EXIT, self.id, ())

    def log(self, *values: Any) -> None:
        self.session.log(*values)

    def cond(self, condition: Any) -> Cond:
        return self.session.cond(condition)

    def iter(self, iterable: Any, return_context: bool = False, progress: bool = False) -> Loop:
        return Loop(self.session, iterable, return_context, user_location(), progress)

    def apply(self, fn, *args: Any, **kwargs: Any) -> Proxy:
        return self.session.apply(fn, *args, **kwargs)


def _add_exports(graph: Graph, ids) -> Graph:
    """Give each TRACE body a SAVE for every value it computes that a node outside it reads.

    A trace hands back only saved values; a later trace (or the session) reading an unsaved value of an earlier
    trace needs it handed back too. These saves are the session's plumbing: only the user's saves survive it.
    """
    owner: dict[int, int] = {}  # node id -> id of the innermost TRACE whose body defines it

    def index(nodes, trace: int | None) -> None:
        for n in nodes:
            if trace is not None:
                owner[n.id] = trace
            for sub in n.body:
                index(sub.nodes, n.id if n.op is Op.TRACE else trace)

    index(graph.nodes, None)
    exports: dict[int, list[int]] = {}

    def scan(nodes, trace: int | None) -> None:
        for n in nodes:
            for r in n.refs:
                o = owner.get(r)
                if o is not None and o != trace and r not in exports.setdefault(o, []):
                    exports[o].append(r)
            for sub in n.body:
                scan(sub.nodes, n.id if n.op is Op.TRACE else trace)

    scan(graph.nodes, None)
    if not exports:
        return graph

    def rebuild(nodes) -> tuple:
        out = []
        for n in nodes:
            body = tuple(sub.replace(nodes=rebuild(sub.nodes)) for sub in n.body)
            if n.op is Op.TRACE and n.id in exports:
                sub = body[0]
                top = {m.id for m in sub.nodes}
                for r in exports[n.id]:
                    if r not in top:
                        raise TracingError(
                            "a value computed inside a `tracer.all()` / `tracer.iter[...]` block is used outside "
                            "its trace",
                            n.loc,
                            "save it inside the block and read it after the session",
                        )
                saves = tuple(Node(next(ids), Op.SAVE, None, (Ref(r),)) for r in exports[n.id])
                body = (sub.replace(nodes=sub.nodes + saves),)
            if body != n.body:
                n = Node(n.id, n.op, n.target, n.args, n.kwargs, n.guards, n.after, n.invoke, body, n.loc)
            out.append(n)
        return tuple(out)

    return graph.replace(nodes=rebuild(graph.nodes))


# -- recording constructors while a session records -----------------------------------------------------------
# Only ``__new__`` of ``Parameter`` and ``Optimizer`` is swapped (the classes stay the same objects): isinstance
# checks, subclasses (torch's own, imported lazily while a session records) and pickling are unaffected. A
# ``__new__`` that returns a proxy, which is not an instance of the class, makes Python skip ``__init__``.
_PARAMETER = torch.nn.parameter.Parameter
_OPTIMIZER = torch.optim.Optimizer


def _parameter_new(cls, data: Any = None, requires_grad: bool = True) -> Any:
    session = _current_session.get()
    if cls is _PARAMETER and session is not None and _current.get() is session and not session._finished:
        return session._record(Op.CALL, _PARAMETER, (data,), {"requires_grad": requires_grad})
    return _ORIGINAL_PARAMETER_NEW(cls, data, requires_grad)


def _optimizer_new(cls, *args: Any, **kwargs: Any) -> Any:
    tracer = _find_live_tracer(args, kwargs)
    if tracer is not None and getattr(tracer, "_session", None) is _current_session.get():
        return tracer._record(Op.CALL, cls, args, kwargs)  # an optimizer over session values
    return object.__new__(cls)


_ORIGINAL_PARAMETER_NEW = _PARAMETER.__dict__["__new__"].__func__


def _install_patches() -> list[tuple[Any, str, Any]]:
    saved = [(_PARAMETER, "__new__", _PARAMETER.__dict__["__new__"])]
    try:
        # the deliberate patch of a method, described above
        _PARAMETER.__new__ = staticmethod(_parameter_new)  # type: ignore[method-assign]
        # Optimizer has no __new__ of its own, and CPython cannot give a class back its inherited object.__new__
        # once one was assigned (deleting it leaves a slot that rejects arguments): the first session installs
        # this one for good. Outside a recording session it is exactly object.__new__(cls).
        if _OPTIMIZER.__dict__.get("__new__") is None:
            _OPTIMIZER.__new__ = staticmethod(_optimizer_new)  # type: ignore[method-assign]  # the same patch
    except BaseException:
        _remove_patches(saved)
        raise
    return saved


def _remove_patches(saved: list[tuple[Any, str, Any]]) -> None:
    for owner, name, obj in saved:
        setattr(owner, name, obj)


__all__ = ["Loop", "Session", "current_session"]
