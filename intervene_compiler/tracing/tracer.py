"""The tracing context: records a block's operations into an intervention graph, then runs it on exit.

``with model.trace(x) as tracer:`` opens a Tracer. Inside, envoy and proxy operations call
:meth:`Tracer._record`, which appends one frozen :class:`~intervene_compiler.ir.Node`. On exit the graph is
verified, optimized by the pass pipeline and handed to a backend together with the batched inputs; saved values
come back to the proxies. Nothing is written into the caller's frames and no global state is patched: the only
process-level state is a context variable naming the innermost open tracer (for ``ic.list()`` and friends; see
``current.py``).

This module owns the :class:`Tracer` users see: its state (declared here, with class-level defaults), entering and
leaving the block, the block API (``invoke``, ``cond``, ``stop``, ``log``, ``apply``, ``barrier``, ``cache``,
``all``/``iter``/``next``) and invokes. Its other jobs are parts it inherits: recording nodes (``recording.py``,
on :class:`~.recorder.Recorder`, shared with sessions), fake-tensor shapes (``shapes.py``), running the block
(``running.py``) and reading its values and graphs afterwards (``results.py``). The state the parts share is
declared for the type checker once more in ``state.py``, so that each part is checked on its own.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvokeError, SourceLoc, user_location
from ..execute import compile_option
from ..ir import Graph, Node, Op
from . import current
from .contexts import Barrier, Cond, Invoker, WholeBatch
from .current import current_tracer
from .iteration import Iteration, IterSelector
from .proxy import Proxy, _find_live_tracer
from .recording import Recording
from .results import Results
from .running import Running
from .saving import open_block, rebind
from .shapes import FakeShapes, Shape

if TYPE_CHECKING:
    from contextvars import Token

    from ..pipeline import Optimized
    from .fakes import FakeTracker
    from .model import NNsight
    from .session import Session
    from .state import Note, SiteKey

# Bound here by assignment, not by an import: CPython 3.11 compiles ``name.method()`` on an imported name as an
# attribute load and a call (a bound method object per call) instead of LOAD_METHOD, and ``__init__``,
# ``__enter__`` and ``_close`` call these on every trace.
_current, _current_session = current._current, current._current_session
_REAL_RUNS = frozenset({"trace", "generate"})


class Tracer(Recording, FakeShapes, Running, Results):
    """Records one tracing block. See the module docstring; users get it from ``model.trace()``."""

    # State that starts out empty: class-level defaults, so a tracer sets only what it uses (tracing one block
    # is on the hot path of a loop of traces). Containers here are immutable; a tracer that adds to one gets its
    # own (barrier(), _defer_node(), iteration blocks).
    _guards: tuple[tuple[int, bool], ...] = ()
    _invoke: int | None = None
    _batch_size = 0
    _results: dict[int, Any] | None = None
    _finished = False
    _error: BaseException | None = None
    _stop_loc: SourceLoc | None = None
    _skipped: Mapping[int, SourceLoc | None] = MappingProxyType({})
    _barriers: tuple[()] | list[Barrier] = ()
    _deferred: Mapping[int, Node] = MappingProxyType({})
    # the open `tracer.all()` / `tracer.iter[...]` block, if any (see iteration.py)
    _frame: Iteration | None = None
    # node id inside a closed iteration block -> that block's ITER id
    _body_of: Mapping[int, int] = MappingProxyType({})
    _entry: Any = None  # what ran a compiled trace (``describe()`` for explain), from RunResult.explain
    _optimized_graph: Optimized | None = None
    _reuse_note: str | None = None  # see RunResult.reuse
    _remote: dict | None = None  # remote=True (remote/client.py)
    _with_loc: SourceLoc | None = None
    job: Any = None  # a remote block's job (remote/client.py)
    _fakes: FakeTracker | None = None
    _token: Token[Tracer | Session | None] | None = None
    _implicit: Invoker | None = None
    _promptless: SourceLoc | None = None  # the first `tracer.invoke()` without an input, if any
    graph: Graph | None = None
    output: Any = None
    # inside `model.session()`: the block records into the session (see session.py) and runs when it does
    _session: Session | None = None
    _closed = False  # recorded and handed to the session, which has not run yet
    # Recorder._param makes a tracer's own list (and index) on its first param
    _params: tuple | list[Any] = ()
    _param_index: Mapping[int, int] = MappingProxyType({})
    _call_idx: Mapping[str, int] = MappingProxyType({})  # path -> call addressed (.next()); see _next_call
    _last_mut: Mapping[int, int] = MappingProxyType({})  # object node id -> its last mutation (see _record)

    def __init__(
        self,
        model: NNsight,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        mode: str = "trace",
        needs_output: bool = False,
        scan: bool = False,
        validate: bool = False,
        invoker_args: dict | None = None,
        compile: bool | str = False,
        reuse: bool = False,
    ):
        self.model = model
        self._state = model._state
        self._mode = mode
        self._node_list: list[Node] = []  # see _nodes
        self._lazy: list[Note] = []
        self._ids = itertools.count()
        self._invokers: list[Invoker] = []
        self._site_cache: dict[SiteKey, Proxy] = {}
        self._saved_ids: set[int] = set()
        self._needs_output = needs_output
        if type(compile) is not bool:
            compile = compile_option(compile)
        self._compile = compile
        self._reuse = reuse
        self._validate = validate = validate or scan or mode == "scan"
        self._kwargs = dict(kwargs) if kwargs else {}
        self._invoker_args = dict(invoker_args) if invoker_args else {}
        self._implicit_args = args
        if (
            mode == "trace" or mode == "generate"
        ):  # (validated on fakes too: session values are of unknown shape)
            session = _current_session.get()
            if session is not None:
                self._session = session
                if session.validate:
                    self._validate = True
                self._ids = session._ids  # ids are unique across the session, so traces can read each other
                self._loc = user_location()

    # -- context protocol ---------------------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        state = self._state
        state.lock.acquire()  # one block at a time per model, from its first line to the end of its run
        open_block()  # `.save()` on built-in containers while the block is open (saving.py)
        self._token = _current.set(self)
        state.tracers.append(self)  # ModelState.push
        if self._implicit_args or self._kwargs:
            try:
                kwargs = {**self._kwargs, **self._invoker_args} if self._invoker_args else self._kwargs
                self._implicit = invoker = Invoker(self, self._implicit_args, kwargs, None)
                self._enter_invoke(invoker)  # Invoker.__enter__
            except BaseException:
                self._close()
                state.lock.release()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        try:
            self._exit(exc_type, exc)
        finally:
            self._state.lock.release()
        if (
            exc_type is None
            and self._session is None
            and self._mode in _REAL_RUNS
            and (self._remote is None or self._remote["blocking"])
        ):
            # the block ran: the names holding its saved values hold the values now (saving.py)
            rebind(sys._getframe(1), (self,))
        return False

    def _exit(self, exc_type, exc) -> Literal[False]:
        try:
            if self._implicit is not None and self._invoke is not None:
                self._exit_invoke(self._implicit)  # Invoker.__exit__
        finally:
            self._close()
        if exc_type is not None:
            self._finished = True
            self._error = exc
            return False
        if self._session is not None:
            try:
                self._defer_to_session()
            except BaseException as e:
                self._finished = True
                self._error = e
                raise
            return False
        try:
            self._run()
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._finished = True
            self._release()
        return False

    def _close(self) -> None:
        tracers = self._state.tracers
        if tracers and tracers[-1] is self:
            tracers.pop()
        else:
            self._state.pop(self)
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    def _release(self) -> None:
        """Drop the references back to this tracer that only recording needed, once the block has run.

        Proxies in the site cache and the implicit invoker point back at the tracer: without these cycles a
        finished tracer is freed as soon as its last proxy is, instead of waiting for the cyclic garbage
        collector (which made a loop of small traces measurably slower).
        """
        self._site_cache.clear()
        if self._implicit is not None:
            # (Invoker.tracer is typed for the invokers that can still be entered; this one never is again)
            self._implicit.tracer = None  # type: ignore[assignment]

    # -- public API inside the block -----------------------------------------------------------------------------
    @property
    def invoker(self) -> Invoker | None:
        """The current invoke (or the implicit one created for ``model.trace(input)``)."""
        if self._invoke is not None:
            return self._invokers[self._invoke]
        return self._implicit

    def invoke(self, *args, **kwargs) -> Invoker | WholeBatch:
        """Add an input to the batch; interventions inside the returned block see only its rows.

        Without an input (``with tracer.invoke():``) the block adds nothing to the batch and its interventions
        see every row: the batch of all the other invokes. ``scan=``/``validate=`` given here check the block
        on fake tensors, as given to ``trace()``."""
        loc = user_location()
        if self._mode == "edit":
            raise InvokeError("model.edit() takes no inputs, so it has no invokes", loc)
        checks = {k: kwargs.pop(k) for k in ("scan", "validate") if k in kwargs}
        if any(checks.values()) and not self._validate:
            self._validate = True
            if self._invokers and self._fakes is None:
                self._enable_fakes()
        if not args and not kwargs:
            return WholeBatch(self, loc)
        if self._implicit is not None:
            raise InvokeError(
                "this trace was given its input directly (`model.trace(x)`), so it cannot take invokes too",
                loc,
                "open `with model.trace() as tracer:` without input and give each input its own `tracer.invoke(x)`",
            )
        return Invoker(self, args, kwargs, loc)

    def cond(self, condition: Any) -> Cond:
        """``with tracer.cond(x):`` runs the block's interventions only when ``bool(x)`` holds at run time."""
        proxy = self._record(Op.COND, None, (condition,))
        return Cond(self, self._guards + ((proxy._id, True),), (proxy._id,))

    def stop(self) -> None:
        """End the forward pass once everything recorded before this line has run."""
        after = tuple(n.id for n in self._nodes)
        self._record(Op.STOP, "user", (), after=after)

    def log(self, *values: Any) -> None:
        """Print ``values`` when they are computed during the run."""
        self._record(Op.LOG, None, values)

    def apply(self, fn, *args, **kwargs) -> Proxy:
        """Record a call of any callable on traced values."""
        return self._record(Op.CALL, fn, args, kwargs)

    def barrier(self, n: int) -> Barrier:
        """A barrier ``n`` invokes call before exchanging values (see :class:`Barrier`)."""
        b = Barrier(self, n, user_location())
        if not self._barriers:
            self._barriers = []
        self._barriers.append(b)
        return b

    def cache(self, modules: Any = None, include_output: bool = True, include_inputs: bool = False) -> Proxy:
        """A saved mapping ``"model.path" -> CacheEntry(output, inputs)`` for every module (or ``modules``)."""
        paths = None
        if modules is not None:
            paths = tuple(self.model._path_of(m) for m in modules)
        proxy = self._record(
            Op.CACHE, paths, (), {"include_output": include_output, "include_inputs": include_inputs}
        )
        return proxy.save()

    def all(self) -> Iteration:
        """``with tracer.all():`` runs the block's interventions at every step (every generated token)."""
        return Iteration(self, None, user_location())

    @property
    def iter(self) -> IterSelector:
        """``with tracer.iter[1:3]:`` (or ``[i]``, ``[[0, 2]]``, ``for step in tracer.iter[1:3]:``): those steps."""
        return IterSelector(self)

    def _step_count(self) -> int | None:
        """How many steps (root module calls) the run has, when known before it runs: one for a trace."""
        return 1

    def next(self, step: int = 1) -> Tracer:
        """Move every module to its next call (e.g. the next generated token)."""
        for path in self.model._all_paths():
            self._next_call(path, step)
        return self

    # -- invokes -------------------------------------------------------------------------------------------------
    def _enter_invoke(self, invoker: Invoker) -> None:
        if self._invoke is not None:
            raise InvokeError(
                "invokes cannot be nested", invoker.loc, "close one invoke before opening the next"
            )
        if self._session is not None and _find_live_tracer(invoker.args, invoker.kwargs) is not None:
            args, kwargs, batch_size = None, None, 0  # a session value: prepared when the session runs
        else:
            args, kwargs, batch_size = self.model._prepare_inputs(*invoker.args, **invoker.kwargs)
            first = self._invokers[0].inputs if self._invokers else None
            if first is not None and first[0] is not None and first[1] is not None:
                self.model._check_batchable((first[0], first[1]), (args, kwargs), invoker.loc)
        invoker.inputs = (args, kwargs)
        invoker.batch_size = batch_size
        invoker.index = len(self._invokers)
        invoker.start = self._batch_size
        self._batch_size += batch_size
        self._invokers.append(invoker)
        self._invoke = invoker.index
        if self._validate and self._fakes is None:
            self._enable_fakes()

    def _exit_invoke(self, invoker: Invoker) -> None:
        self._invoke = None


__all__ = ["Shape", "Tracer", "current_tracer"]
