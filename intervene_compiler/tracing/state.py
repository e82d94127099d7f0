"""The state a :class:`~intervene_compiler.tracing.Tracer`'s parts share, declared once for the type checker.

Tracer is one class over parts that each do one job: recording (``recording.py``), fake-tensor shapes
(``shapes.py``), running the block (``running.py``) and reading its results (``results.py``). The parts read and
write state that ``tracer.py`` gives its values (class-level defaults and ``Tracer.__init__``), and ``_nodes``,
which ``Recording`` builds. :class:`TracerState` declares that state, so that each part, and each helper a tracer
hands itself to (``check_scope``, ``nodes_for_fakes``, ``FakeTracker``), is type-checked on its own.

It is a base of the parts for the type checker only: each part's module binds the name to ``object`` at run time,
so the parts keep their own bases and Tracer's method resolution order is what it was. Its declarations are bare
annotations, which create no class attributes; the values are in ``tracer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import SourceLoc
from ..ir import SiteKind

if TYPE_CHECKING:
    import itertools

    from ..ir import Graph, Node
    from ..pipeline import Optimized
    from .contexts import Barrier, Invoker
    from .envoy import ModelState
    from .fakes import FakeTracker
    from .iteration import Iteration
    from .model import NNsight
    from .proxy import Proxy
    from .session import Session

# the conditions a node is recorded under: (COND node id, branch) pairs (``Node.guards``)
Guards: TypeAlias = tuple[tuple[int, bool], ...]
# a site read's key in ``Tracer._site_cache``: (path, kind, call, invoke, guards)
SiteKey: TypeAlias = tuple[str, SiteKind, int, int | None, Guards]
# the notes ``Recording._site`` and ``Recording._save`` leave in ``Tracer._lazy`` for the nodes ``_flush`` builds:
# (id, site key, loc) for a SITE node, (id, saved id, after, guards, invoke, loc) for a SAVE node
SiteNote: TypeAlias = tuple[int, SiteKey, SourceLoc | None]
SaveNote: TypeAlias = tuple[int, int, tuple[int, ...], Guards, int | None, SourceLoc | None]
Note: TypeAlias = SiteNote | SaveNote


class TracerState:
    """What a tracer's parts read and write (see the module docstring). Values and defaults: ``tracer.py``."""

    # what the tracer was opened with
    model: NNsight
    _state: ModelState
    _mode: str
    _needs_output: bool
    _compile: bool | str
    _reuse: bool
    _validate: bool
    _session: Session | None  # the session the block records into, if any
    _loc: SourceLoc | None  # where the block was opened (inside a session)
    _closed: bool  # recorded and handed to the session, which has not run yet
    _finished: bool
    _error: BaseException | None

    # recording (recording.py, iteration.py)
    _ids: itertools.count[int]
    _node_list: list[Node]
    _lazy: list[Note]
    _nodes: list[Node]  # Recording's property: _node_list with the notes in _lazy built
    _guards: Guards
    _invoke: int | None
    _invokers: list[Invoker]
    _promptless: SourceLoc | None  # the first `tracer.invoke()` without an input
    _site_cache: dict[SiteKey, Proxy]
    _saved_ids: set[int]
    _params: tuple | list[Any]
    _param_index: Mapping[int, int]
    # the read-only empty mappings of the class-level defaults until a tracer writes: then dicts of its own
    _last_mut: Mapping[int, int]
    _call_idx: Mapping[str, int]
    _body_of: Mapping[int, int]
    _deferred: Mapping[int, Node]
    _frame: Iteration | None
    _fakes: FakeTracker | None
    _barriers: tuple[()] | list[Barrier]

    # the run and its results (running.py, results.py)
    graph: Graph | None
    output: Any
    _results: dict[int, Any] | None
    _stop_loc: SourceLoc | None
    _skipped: Mapping[int, SourceLoc | None]
    _entry: Any  # the compiled entry that ran the block (has ``describe()``), from ``RunResult.explain``
    _optimized_graph: Optimized | None
    _reuse_note: str | None
    _remote: dict | None  # remote=True: {"blocking": bool} (remote/client.py)
    _with_loc: SourceLoc | None  # the `with` line of a remote block, for errors that name no line
    job: Any  # the remote job (remote/client.py RemoteJob)


__all__ = ["Guards", "Note", "SaveNote", "SiteKey", "SiteNote", "TracerState"]
