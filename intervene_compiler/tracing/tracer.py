"""The tracing context: records a block's operations into an intervention graph, then runs it on exit.

``with model.trace(x) as tracer:`` opens a Tracer. Inside, envoy and proxy operations call
:meth:`Tracer._record`, which appends one frozen :class:`~intervene_compiler.ir.Node`. On exit the graph is
verified, optimized by the pass pipeline and handed to a backend together with the batched inputs; saved values
come back to the proxies. Nothing is written into the caller's frames and no global state is patched: the only
process-level state is a context variable naming the innermost open tracer (for ``ic.list()`` and friends).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ..errors import (
    InvokeError,
    TracingError,
    ValueNotReadyError,
    user_location,
    user_location_at,
)
from ..execute import RunOptions, execute
from ..ir import (
    Graph,
    InvokeRows,
    ModelFacts,
    Node,
    Op,
    ParamRef,
    Ref,
    Site,
    SiteKind,
    format_graph,
    format_node,
    is_mutation,
)
from ..ir.nodes import make_node, walk_nodes
from ..pipeline import Optimized, optimize
from ..runtime import Target
from .contexts import Barrier, Cond, Invoker, no_input_error
from .iteration import Iteration, IterSelector, check_scope, nodes_for_fakes
from .proxy import Proxy, _find_live_tracer, new_proxy

if TYPE_CHECKING:
    from .model import NNsight

_current: ContextVar[Tracer | None] = ContextVar("intervene_compiler_tracer", default=None)
# the session being recorded (tracing/session.py); traces opened inside it become part of it
_current_session: ContextVar[Any] = ContextVar("intervene_compiler_session", default=None)
_LITERALS = frozenset({int, float, str, bool, type(None), complex, bytes})
_SITE, _SAVE = Op.SITE, Op.SAVE  # enum class attribute lookups are slow


def current_tracer() -> Tracer | None:
    """The innermost open tracing block in this context, if any."""
    return _current.get()


class Shape(tuple):
    """A shape read inside a block: a tuple that prints and compares like ``torch.Size``.

    ``.save()`` returns it, so era-two code (``x.shape.save()``) runs.
    """

    def save(self) -> Shape:
        return self

    def numel(self) -> int:
        return torch.Size(self).numel()

    def __getitem__(self, index):
        item = tuple.__getitem__(self, index)
        return Shape(item) if isinstance(index, slice) else item

    def __repr__(self) -> str:
        return repr(torch.Size(self))


class Recorder:
    """What a tracer and a session (session.py) share: turning recorded values into IR arguments.

    Subclasses provide ``_record``, ``_session`` (the open session, or None), ``_params``/``_param_index`` and
    ``_saved_ids``.
    """

    def _encode(self, v: Any, refs: list[int]) -> Any:
        t = type(v)
        if t in _LITERALS:
            return v
        if t is Proxy:
            tracer = v._tracer
            if tracer is self:
                nid = v._node_id()
                refs.append(nid)
                return Ref(nid)
            if self._session is not None and tracer._session is self._session:
                nid = v._node_id()  # a value of the session, or of a trace in it
                refs.append(nid)
                return Ref(nid)
            if tracer._finished:
                return self._param(v.value)
            raise TracingError(
                "a value from another open tracing block was used here",
                user_location(),
                "save it in its own block and use it after that block exits",
            )
        if t is tuple:
            return tuple(self._encode(x, refs) for x in v)
        if t is list:
            return [self._encode(x, refs) for x in v]
        if t is dict:
            return {k: self._encode(x, refs) for k, x in v.items()}
        if t is slice:
            return slice(self._encode(v.start, refs), self._encode(v.stop, refs), self._encode(v.step, refs))
        if v is Ellipsis or t is torch.Size or t is Shape or isinstance(v, (torch.dtype, torch.device)):
            return torch.Size(v) if t is Shape else v
        module = getattr(v, "_envoy_module", None)
        if module is not None:  # an envoy passed as a value stands for its module
            return self._param(module)
        return self._param(v)

    def _param(self, obj: Any) -> ParamRef:
        index = self._param_index.get(id(obj))
        if index is None:
            params = self._params
            if type(params) is not list:  # a tracer's first param (its class-level default is empty)
                self._params = params = []
                self._param_index = {}
            index = len(params)
            params.append(obj)
            self._param_index[id(obj)] = index
        return ParamRef(index)

    def _save(self, proxy: Proxy) -> None:
        nid = proxy._node_id()
        if nid not in self._saved_ids:
            self._saved_ids.add(nid)
            self._record(Op.SAVE, None, (proxy,))


class Tracer(Recorder):
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
    _stop_loc = None
    _skipped: Mapping = MappingProxyType({})
    _barriers: tuple | list[Barrier] = ()
    _deferred: Mapping[int, Node] = MappingProxyType({})
    _frame = None  # the open `tracer.all()` / `tracer.iter[...]` block, if any (see iteration.py)
    # node id inside a closed iteration block -> that block's ITER id
    _body_of: Mapping[int, int] = MappingProxyType({})
    _entry = None  # what ran a compiled trace (``describe()`` for explain), from RunResult.explain
    _optimized_graph: Optimized | None = None
    _reuse_note = None  # see RunResult.reuse
    _fakes = None
    _token = None
    _implicit: Invoker | None = None
    graph: Graph | None = None
    output: Any = None
    # inside `model.session()`: the block records into the session (see session.py) and runs when it does
    _session = None
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
        compile: bool = False,
        reuse: bool = True,
    ):
        self.model = model
        self._state = model._state
        self._mode = mode
        self._node_list: list[Node] = []  # see _nodes
        self._lazy: list[tuple] = []
        self._ids = itertools.count()
        self._invokers: list[Invoker] = []
        self._site_cache: dict[tuple, Proxy] = {}
        self._saved_ids: set[int] = set()
        self._needs_output = needs_output
        self._compile = compile
        self._reuse = reuse
        self._validate = validate = validate or scan or mode == "scan"
        self._kwargs = dict(kwargs) if kwargs else {}
        self._invoker_args = dict(invoker_args) if invoker_args else {}
        self._implicit_args = args
        if not validate and (mode == "trace" or mode == "generate"):
            session = _current_session.get()
            if session is not None:
                self._session = session
                self._ids = session._ids  # ids are unique across the session, so traces can read each other
                self._loc = user_location()

    # -- context protocol ---------------------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        self._token = _current.set(self)
        self._state.tracers.append(self)  # ModelState.push
        if self._implicit_args or self._kwargs:
            try:
                self._implicit = invoker = Invoker(
                    self, self._implicit_args, {**self._kwargs, **self._invoker_args}, None
                )
                self._enter_invoke(invoker)  # Invoker.__enter__
            except BaseException:
                self._close()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
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
            self._implicit.tracer = None

    # -- public API inside the block -----------------------------------------------------------------------------
    @property
    def invoker(self) -> Invoker | None:
        """The current invoke (or the implicit one created for ``model.trace(input)``)."""
        if self._invoke is not None:
            return self._invokers[self._invoke]
        return self._implicit

    def invoke(self, *args, **kwargs) -> Invoker:
        """Add an input to the batch; interventions inside the returned block see only its rows."""
        loc = user_location()
        if self._mode == "edit":
            raise InvokeError("model.edit() takes no inputs, so it has no invokes", loc)
        if self._implicit is not None:
            raise InvokeError(
                "this trace was given its input directly (`model.trace(x)`), so it cannot take invokes too",
                loc,
                "open `with model.trace() as tracer:` without input and give each input its own `tracer.invoke(x)`",
            )
        if not args and not kwargs:
            raise no_input_error(loc)
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

    def next(self, step: int = 1) -> Tracer:
        """Move every module to its next call (e.g. the next generated token)."""
        for path in self.model._all_paths():
            self._next_call(path, step)
        return self

    def _next_call(self, path: str, step: int) -> None:
        """Address the call ``step`` after the current one of the module at ``path`` from here on."""
        if type(self._call_idx) is not dict:  # the class-level default is an empty read-only mapping
            self._call_idx = {}
        self._call_idx[path] = self._call_idx.get(path, 0) + step

    # -- recording -----------------------------------------------------------------------------------------------
    def _record(
        self, op: Op, target: Any, args: tuple = (), kwargs: dict | None = None, *, after=()
    ) -> Proxy:
        if self._closed:  # a trace recorded earlier in the open session: record where the session is now
            return self._session._record(op, target, args, kwargs, after=after)
        if self._finished:
            raise TracingError(
                "this tracing block has already exited; its values can no longer record operations",
                user_location(),
                "do the work inside the `with` block, or on saved values after it",
            )
        refs: list[int] = []
        enc_args = self._encode(args, refs) if args else ()
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

    def _plain(self) -> bool:
        """Does recording take the plain path: an open block of its own (not closed into a session), without
        fake execution or closed iteration blocks? (The fast paths of ``_site``/``_save`` check this.)"""
        return not (self._closed or self._finished or self._fakes is not None or self._body_of)

    def _call_of(self, path: str) -> int:
        """The call a site access addresses: counted from the run's start, or inside an iteration block from the
        step's start (negative, see ``Site``)."""
        call = self._call_idx.get(path, 0)
        return call if self._frame is None else -1 - call

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
        if proxy._tracer is not self or not self._plain():
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
        call = self._call_of(path)
        self._record(Op.SET, Site(path, kind, call, self._invoke), (value,))
        for key in [k for k in self._site_cache if k[0] == path and k[2] == call]:
            del self._site_cache[key]

    def _defer_node(self, node_id: int) -> None:
        """Take a just-recorded node out of program order until :meth:`_undefer_node` (backward blocks)."""
        if not self._nodes or self._nodes[-1].id != node_id:
            raise TracingError(
                "`with loss.backward():` must directly follow the backward call", user_location()
            )
        if not self._deferred:
            self._deferred = {}
        self._deferred[node_id] = self._nodes.pop()

    def _undefer_node(self, node_id: int) -> None:
        n = self._deferred.pop(node_id)
        nid = next(self._ids)
        self._nodes.append(
            Node(nid, n.op, n.target, n.args, n.kwargs, n.guards, n.after, n.invoke, n.body, n.loc)
        )

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

    # -- shapes from fake tensors ----------------------------------------------------------------------------
    def _enable_fakes(self) -> None:
        from .fakes import FakeTracker

        self._fakes = FakeTracker(self)
        for node in nodes_for_fakes(self):
            self._fakes.execute(node, strict=self._validate)

    def _meta(self, proxy: Proxy, attr: str) -> Any:
        if self._finished:
            return getattr(proxy.value, attr)
        if self._fakes is None:
            if any(inv.inputs[0] is None for inv in self._invokers):
                raise TracingError(
                    f"`.{attr}` is not known while this trace records: its input is a session value, which exists "
                    "only when the session runs",
                    user_location(),
                    "read shapes with `model.scan(example_input)` before the session",
                )
            self._enable_fakes()
        nid = proxy._node_id()
        fake = self._fakes.value(nid)
        value = getattr(fake, attr)
        return Shape(value) if attr == "shape" else value

    def _describe(self, proxy: Proxy) -> str:
        nid = proxy._node_id()
        node = next((n for n in reversed(self._nodes) if n.id == nid), None)
        text = format_node(node) if node is not None else f"%{nid}"
        return f"<Proxy {text}>"

    # -- running ---------------------------------------------------------------------------------------------
    def _build_graph(self) -> Graph:
        rows = tuple([InvokeRows(inv.start, inv.start + inv.batch_size) for inv in self._invokers])
        return Graph(tuple(self._nodes), tuple(self._params), rows, self._mode, self._needs_output)

    def _run(self) -> None:
        model = self.model
        for barrier in self._barriers:
            barrier.check()
        if self._mode == "edit":
            self.graph = graph = self._build_graph()
            model._add_edit(graph)
            return
        invokers = self._invokers
        if not invokers:
            self._check_has_input()
        prepared = [invokers[0].inputs] if len(invokers) == 1 else [inv.inputs for inv in invokers]
        fake = self._mode == "scan"
        target = model._target(fake)
        self._execute(self._optimized(model, target), prepared, target, fake)

    def _run_bound(self, graph: Graph, prepared: list[tuple[tuple, dict]]) -> dict[int, Any]:
        """Run as a session's trace: ``graph`` has the session's values bound as params (backends/session.py).
        Returns the saved values."""
        model = self.model
        target = model._target(False)
        optimized = optimize(model._with_edits(graph), target.facts, target.caches.optimized)
        self._execute(optimized, prepared, target, False)
        return self._results or {}

    def _execute(self, optimized: Optimized, prepared: list, target: Target, fake: bool) -> None:
        self._optimized_graph = optimized
        self.graph = optimized.graph
        options = RunOptions(compile=self._compile, reuse=self._reuse, fake=fake)
        result = execute(optimized, prepared, target, options)
        self._entry = result.explain
        self._results = result.values
        self._stop_loc = result.stop_loc
        self._skipped = result.skipped
        if result.reuse is not None:
            self._reuse_note = result.reuse
        self.output = result.output

    def _optimized(self, model: NNsight, target: Target) -> Optimized:
        """The graph as traced (with the model's edits), optimized, with the pass steps (see ``optimize``).

        A trace of only site reads and saves (the common ``model.layer.output.save()``) has a cheap key of its
        structure (``_simple_key``): repeating it reuses what the first such trace built and optimized (graphs
        that are immutable and hold no params: nothing to bind per trace) instead of building a graph to have the
        pass memo key it again. That memo is the model's (``ModelState.simple``).
        """
        facts = target.facts
        key = _simple_key(self, facts) if model._edits is None and not self._params else None
        memo = self._state.simple
        if key is not None:
            hit = memo.get(key)
            if hit is not None:
                return hit
        traced = model._with_edits(self._build_graph())
        optimized = optimize(traced, facts, target.caches.optimized)
        if key is not None:
            if len(memo) >= _SIMPLE_SIZE:
                del memo[next(iter(memo))]  # the oldest entry
            memo[key] = optimized
        return optimized

    def _check_has_input(self) -> None:
        if not self._invokers:
            raise InvokeError(
                "the trace has no input",
                None,
                "pass the input to `model.trace(x)`, or add `with tracer.invoke(x):` blocks",
            )

    def _defer_to_session(self) -> None:
        """Hand the recorded block to the open session as one TRACE node; it runs when the session does."""
        for barrier in self._barriers:
            barrier.check()
        self._check_has_input()
        graph = self._build_graph()
        inputs = tuple((inv.args, inv.kwargs) for inv in self._invokers)
        self._closed = True
        self._session._add_trace(self, graph, inputs, self._loc)

    def _finish_in_session(self, results: dict[int, Any], error: BaseException | None) -> None:
        """The session ran (or failed): saved values are the session's, keyed by this trace's node ids."""
        self._closed = False
        self._finished = True
        self._results = results
        self._skipped = {}
        self._stop_loc = None
        if error is not None and self._error is None:
            self._error = error

    def explain(self, file=None) -> str:
        """Print (and return) the graph as traced and after each pass, and how the run was executed.

        For ``compile=True`` it says whether the program was compiled, reused from the cache or fell back to the
        eager backend (and why), and shows the spliced FX graph (model and interventions) Inductor compiled.
        """
        if self.graph is None:
            raise TracingError(
                "explain() needs a trace that has run", user_location(), "call it after the block"
            )
        parts = [f"-- {name}:\n{format_graph(graph)}" for name, graph in self.steps]
        if self._reuse_note:
            parts.append(f"-- reuse across traces: {self._reuse_note}")
        entry = self._entry
        if not self._compile:
            parts.append("-- backend: eager (hooks)")
        elif entry is None:
            parts.append("-- backend: compiled, fell back to eager: unknown")
        else:
            parts.extend(entry.describe())
        text = "\n".join(parts)
        print(text, file=file)
        return text

    @property
    def steps(self) -> list[tuple[str, Graph]]:
        """The graph as traced and after each pass: ``[("traced", g), ("dead_values", g), ...]``."""
        optimized = self._optimized_graph
        return [(name, optimized.traced.replace(nodes=nodes)) for name, nodes in optimized.steps]

    def _value_of(self, proxy: Proxy) -> Any:
        nid = proxy._node_id() if not self._finished else proxy._id
        if self._session is not None:  # saved values of a session's traces are the session's
            return self._session._session_value(nid)
        if not self._finished:
            raise ValueNotReadyError(
                "`.value` was read inside the tracing block, before the model ran",
                user_location(),
                "read it after the `with` block ends; inside the block, use the proxy itself",
            )
        results = self._results or {}
        if nid is not None and nid in results:
            return results[nid]
        made = self._loc_of(nid)
        made_text = f" (the value recorded at {made.filename}:{made.lineno})" if made else ""
        if self._error is not None:
            raise ValueNotReadyError(
                f"this value{made_text} was never computed: the trace raised {type(self._error).__name__}",
                user_location(),
                "fix the error the tracing block raised, then run it again",
            )
        if nid in self._skipped:
            cond = self._skipped[nid]
            where = f" (at {cond.filename}:{cond.lineno})" if cond else ""
            raise ValueNotReadyError(
                f"this value{made_text} was never computed: the `tracer.cond` condition guarding it{where} was false",
                user_location(),
                "read it only when the condition holds, or save a value computed outside the condition",
            )
        if nid in self._saved_ids:
            where = f" at {self._stop_loc.filename}:{self._stop_loc.lineno}" if self._stop_loc else ""
            raise ValueNotReadyError(
                f"this value{made_text} was never computed: the forward pass was stopped{where} before it",
                user_location(),
                "stop after the module it needs, or drop the stop",
            )
        raise ValueNotReadyError(
            f"this value{made_text} was not saved, so it is gone after the tracing block",
            user_location(),
            "call `.save()` on it inside the block",
        )

    def _loc_of(self, nid: int | None):
        for n in walk_nodes(self._nodes):
            if n.id == nid:
                return n.loc
        return None


# -- the pass memo, in front --------------------------------------------------------------------------------------
# ``pipeline.optimize`` memoizes by a key covering every kind of node. Most traces only read module values and save
# them (SITE and SAVE nodes, no params): for those, a key of the same facts (ids, sites, dependencies, guards,
# invokes and the identity of source locations, which errors name) is built here from the tracer's notes of those
# nodes (``Tracer._lazy``) for a fraction of the cost, and maps to the traced and optimized graphs and pass steps
# of the first trace with that key. Entries keep that trace's nodes (and so the source locations whose ids are in
# the key) alive, as optimize's memo does. The memo is the model's (``ModelState.simple``).
_SIMPLE_SIZE = 512


def _simple_key(tracer: Tracer, facts: ModelFacts) -> tuple | None:
    """The structure of a trace whose nodes are all noted site reads and saves (see ``Tracer._nodes``), None for
    any other trace; see ``Tracer._optimized``."""
    if tracer._node_list:  # some node was recorded by the general path
        return None
    parts = []
    for entry in tracer._lazy:
        if len(entry) == 3:  # a site read: (id, (path, kind, call, invoke, guards), loc)
            parts.append((entry[0], entry[1], id(entry[2])))
        else:  # a save: (id, saved id, after, guards, invoke, loc)
            nid, ref, after, guards, invoke, loc = entry
            parts.append((nid, ref, after, guards, invoke, id(loc)))
    invokers = tracer._invokers
    if len(invokers) == 1:
        inv = invokers[0]
        rows = ((inv.start, inv.start + inv.batch_size),)
    else:
        rows = tuple([(inv.start, inv.start + inv.batch_size) for inv in invokers])
    return (tuple(parts), rows, tracer._mode, tracer._needs_output, facts)


__all__ = ["Shape", "Tracer", "current_tracer"]
