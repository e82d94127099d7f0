"""The intervention graph: frozen nodes with a closed op set, structured sites, runtime params.

A :class:`Graph` is what a tracing block records. Nodes appear in creation (program) order and only refer to
earlier nodes, so a graph is topologically sorted by construction. Values flow through ``Ref`` (another node's
value) and ``ParamRef`` (a runtime value held in ``Graph.params``: tensors and other non-literal objects), so
the structure can be hashed and serialized apart from the data. Nested graphs (``Node.body``) hold the traces of
a session or the body of a loop (ITER: interventions run at every generation step; LOOP: a session's
``session.iter``); a nested graph's nodes may read the enclosing graph's earlier nodes, and its ParamRefs index the
outermost graph's params, except a TRACE body's, which index its own (a session trace is a self-contained graph).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceLoc


class Op(enum.Enum):
    """The closed op set. ``args``/``kwargs``/``target`` meaning per op is given in the comment."""

    SITE = "site"  # value of a module's input/output at target: Site (the current value, after earlier SETs)
    SET = "set"  # replace the value at target: Site with args[0]
    CALL = "call"  # target(*args, **kwargs): torch functions, operators, builtins, user callables
    METHOD = "method"  # args[0].<target>(*args[1:], **kwargs)
    GETATTR = "getattr"  # getattr(args[0], target)
    SETATTR = "setattr"  # setattr(args[0], target, args[1])
    GETITEM = "getitem"  # args[0][args[1]]
    SETITEM = "setitem"  # args[0][args[1]] = args[2], in place
    UPDATE = (
        "update"  # args[0] with args[0][i] = v applied for (i, v) in args[1]; args[0] has no other reader
    )
    MODULE = "module"  # call the submodule at path target ad hoc (no interventions run inside it)
    SAVE = "save"  # keep args[0] past the run; a root for dead-value elimination
    LOG = "log"  # print(*args) when the values are computed
    STOP = (
        "stop"  # end the forward pass here; target "user" or "truncate" (inserted by early-stop truncation)
    )
    COND = "cond"  # bool(args[0]); nodes guarded by this id run only when it equals their guard
    GRAD = (
        "grad"  # the gradient flowing into args[0] during backward (current value, after earlier SET_GRADs)
    )
    SET_GRAD = "set_grad"  # replace the gradient flowing into args[0] with args[1]
    BACKWARD = "backward"  # args[0].backward(**kwargs)
    CACHE = (
        "cache"  # dict of every (or target's listed) module's output, and inputs if kwargs ask, as they run
    )
    # run body[0] once per matching step (a step is one call of the root module, e.g. one generated token);
    # target: None = every step, a tuple of step indices, or a slice. Inside the body, a Ref to this node is the
    # current step index and a Site with a negative call is relative to the step (see Site).
    ITER = "iter"

    # Members are singletons compared by identity: hash them by identity too (C-level; Enum's own __hash__ is
    # Python code, and ops and site kinds are hashed in every set/dict lookup of tracing and running).
    __hash__ = object.__hash__
    # session graphs (model.session()): run the trace body[0] (a self-contained graph with its own params and
    # invokes; its Refs to ids it does not define read the session's values) on the model in slot target, with
    # args = one (args, kwargs) input per invoke, resolved when the session runs
    TRACE = "trace"
    # run body[0] once per item of iter(args[0]) (session.iter); inside the body, a Ref to this node is the item
    LOOP = "loop"
    EXIT = "exit"  # leave the LOOP whose id is target (iterator.exit()), or the whole session when target is None


class SiteKind(enum.Enum):
    OUTPUT = "output"  # the module's return value
    INPUT = "input"  # the first positional argument (or first keyword argument when there are none)
    INPUTS = "inputs"  # ((args...), {kwargs...})

    __hash__ = object.__hash__  # see Op


@dataclass(frozen=True, slots=True)
class Site:
    """One place in the forward pass: a module path ('' is the root), input or output, which call, which rows.

    ``invoke`` is None for the whole batch, else the index of the invoke whose rows are meant
    (``Graph.invokes[invoke]`` gives the row range). ``call`` counts the module's calls from the start of the
    run; inside an ITER body a negative ``call`` counts them from the start of the current step instead
    (``-1`` is the module's first call in the step, ``-2`` its second, ...).
    """

    path: str
    kind: SiteKind
    call: int = 0
    invoke: int | None = None

    def __init__(self, path: str, kind: SiteKind, call: int = 0, invoke: int | None = None) -> None:
        _site_path(self, path)  # the slots' setters: as the generated frozen __init__, without the lookups
        _site_kind(self, kind)
        _site_call(self, call)
        _site_invoke(self, invoke)

    @property
    def key(self) -> tuple[str, SiteKind, int]:
        """The hook event this site belongs to (rows aside)."""
        kind = self.kind
        return (self.path, kind if kind is _OUTPUT else _INPUTS, self.call)

    def __str__(self) -> str:
        name = "model" + ("." + self.path if self.path else "")
        call = f".call{self.call}" if self.call > 0 else ".step" if self.call == -1 else ""
        if self.call < -1:
            call = f".step.call{-1 - self.call}"
        rows = f"[i{self.invoke}]" if self.invoke is not None else ""
        return f"{name}{call}.{self.kind.value}{rows}"


_site_path, _site_kind, _site_call, _site_invoke = (
    Site.__dict__[name].__set__ for name in ("path", "kind", "call", "invoke")
)
_OUTPUT, _INPUTS = SiteKind.OUTPUT, SiteKind.INPUTS


@dataclass(frozen=True, slots=True)
class Ref:
    """The value of node ``id``."""

    id: int

    def __init__(self, id: int) -> None:  # the generated frozen __init__, minus object.__setattr__'s lookup
        _ref_id(self, id)

    def __repr__(self) -> str:
        return f"%{self.id}"


_ref_id = Ref.__dict__["id"].__set__


@dataclass(frozen=True, slots=True)
class ParamRef:
    """The runtime value ``Graph.params[index]``: a tensor or any object that is not a plain literal."""

    index: int

    def __repr__(self) -> str:
        return f"$p{self.index}"


@dataclass(frozen=True, slots=True)
class Node:
    id: int
    op: Op
    target: Any = None
    args: tuple = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    guards: tuple[tuple[int, bool], ...] = ()  # (COND node id, branch) pairs that must all hold
    after: tuple[int, ...] = ()  # ordering-only dependencies (earlier mutations of an argument)
    invoke: int | None = None  # the invoke this node was recorded in
    body: tuple[Graph, ...] = ()  # nested graphs (session traces, loop bodies)
    loc: SourceLoc | None = field(default=None, compare=False)
    # derived once at construction (nodes are immutable): data dependencies, and all dependencies
    refs: tuple[int, ...] = field(init=False, repr=False, compare=False)
    deps: tuple[int, ...] = field(init=False, repr=False, compare=False)

    # Written out (dataclass keeps a class's own __init__) because tracing builds one node per operation: the
    # generated frozen __init__ plus a __post_init__ cost about twice as much. Same signature and fields.
    def __init__(
        self,
        id: int,
        op: Op,
        target: Any = None,
        args: tuple = (),
        kwargs: tuple[tuple[str, Any], ...] = (),
        guards: tuple[tuple[int, bool], ...] = (),
        after: tuple[int, ...] = (),
        invoke: int | None = None,
        body: tuple[Graph, ...] = (),
        loc: SourceLoc | None = None,
    ) -> None:
        _node_id(self, id)
        _node_op(self, op)
        _node_target(self, target)
        _node_args(self, args)
        _node_kwargs(self, kwargs)
        _node_guards(self, guards)
        _node_after(self, after)
        _node_invoke(self, invoke)
        _node_body(self, body)
        _node_loc(self, loc)
        if args or kwargs:
            out: list[int] = []
            _collect_refs(args, out)
            if kwargs:
                _collect_refs(kwargs, out)
            refs = tuple(out)
        else:
            refs = ()
        _node_refs(self, refs)
        if guards:
            _node_deps(self, refs + after + tuple([g for g, _ in guards]))
        else:
            _node_deps(self, refs + after if after else refs)


# The slots' own setters: a frozen dataclass blocks ``node.x = ...``, and these skip object.__setattr__'s lookup.
(
    _node_id,
    _node_op,
    _node_target,
    _node_args,
    _node_kwargs,
    _node_guards,
    _node_after,
    _node_invoke,
    _node_body,
    _node_loc,
    _node_refs,
    _node_deps,
) = (
    Node.__dict__[name].__set__
    for name in (
        "id",
        "op",
        "target",
        "args",
        "kwargs",
        "guards",
        "after",
        "invoke",
        "body",
        "loc",
        "refs",
        "deps",
    )
)


def make_node(
    id: int,
    op: Op,
    target: Any,
    args: tuple,
    kwargs: tuple[tuple[str, Any], ...],
    guards: tuple[tuple[int, bool], ...],
    after: tuple[int, ...],
    invoke: int | None,
    loc: SourceLoc | None,
    refs: tuple[int, ...],
) -> Node:
    """``Node(id, op, target, args, kwargs, guards, after, invoke, (), loc)`` when the caller already knows the
    node's data dependencies ``refs`` (the ids of the ``Ref`` leaves of ``args`` then ``kwargs``, in order, as
    ``Node`` collects them): what a tracer builds for every recorded operation, without walking the arguments
    again."""
    node = _new_node(Node)
    _node_id(node, id)
    _node_op(node, op)
    _node_target(node, target)
    _node_args(node, args)
    _node_kwargs(node, kwargs)
    _node_guards(node, guards)
    _node_after(node, after)
    _node_invoke(node, invoke)
    _node_body(node, ())
    _node_loc(node, loc)
    _node_refs(node, refs)
    if guards:
        _node_deps(node, refs + after + tuple([g for g, _ in guards]))
    else:
        _node_deps(node, refs + after if after else refs)
    return node


_new_node = object.__new__


@dataclass(frozen=True, slots=True)
class InvokeRows:
    """The batch rows [start, stop) that one invoke's input occupies."""

    start: int
    stop: int

    def __init__(self, start: int, stop: int) -> None:
        _rows_start(self, start)  # the slots' setters: as the generated frozen __init__, without the lookups
        _rows_stop(self, stop)


_rows_start, _rows_stop = InvokeRows.__dict__["start"].__set__, InvokeRows.__dict__["stop"].__set__


@dataclass(frozen=True)
class Graph:
    """A recorded block: nodes in program order plus the runtime values and invokes they refer to.

    ``needs_output``: the caller wants the model's own output (so the forward may not be truncated).
    """

    nodes: tuple[Node, ...]
    params: tuple[Any, ...] = ()
    invokes: tuple[InvokeRows, ...] = ()
    kind: str = "trace"
    needs_output: bool = False

    def __init__(
        self,
        nodes: tuple[Node, ...],
        params: tuple[Any, ...] = (),
        invokes: tuple[InvokeRows, ...] = (),
        kind: str = "trace",
        needs_output: bool = False,
    ) -> None:  # the generated frozen __init__ sets each field through object.__setattr__: one dict update
        self.__dict__.update(
            nodes=nodes, params=params, invokes=invokes, kind=kind, needs_output=needs_output
        )

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def users(self) -> dict[int, list[int]]:
        """node id -> ids of the nodes that depend on it (data, ordering or guard)."""
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for d in n.deps:
                if d in out:
                    out[d].append(n.id)
        return out

    def replace(self, **changes: Any) -> Graph:
        own = self.__dict__
        if len(own) == 5 and _GRAPH_FIELDS.issuperset(changes):  # only the fields: copy them as they are
            graph = _new_graph(Graph)
            fields = graph.__dict__
            fields.update(own)
            fields.update(changes)
            return graph
        fields = {
            "nodes": self.nodes,
            "params": self.params,
            "invokes": self.invokes,
            "kind": self.kind,
            "needs_output": self.needs_output,
        }
        fields.update(changes)
        return Graph(**fields)


_GRAPH_FIELDS = frozenset({"nodes", "params", "invokes", "kind", "needs_output"})
_new_graph = object.__new__


def walk_nodes(nodes) -> Any:
    """Every node of ``nodes`` and, after each, the nodes of its nested graphs (depth first)."""
    for n in nodes:
        yield n
        for sub in n.body:
            yield from walk_nodes(sub.nodes)


def _collect_refs(value: Any, out: list[int]) -> None:
    t = type(value)
    if t is Ref:
        out.append(value.id)
    elif t is tuple or t is list:
        for v in value:
            _collect_refs(v, out)
    elif t is dict:
        for v in value.values():
            _collect_refs(v, out)
    elif t is slice:
        _collect_refs((value.start, value.stop, value.step), out)


def map_args(value: Any, fn) -> Any:
    """Rebuild an argument structure with ``fn`` applied to every Ref and ParamRef leaf."""
    t = type(value)
    if t is Ref or t is ParamRef:
        return fn(value)
    if t is tuple:
        return tuple(map_args(v, fn) for v in value)
    if t is list:
        return [map_args(v, fn) for v in value]
    if t is dict:
        return {k: map_args(v, fn) for k, v in value.items()}
    if t is slice:
        return slice(map_args(value.start, fn), map_args(value.stop, fn), map_args(value.step, fn))
    return value


MUTATING_METHODS = frozenset(
    {
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "clear",
        "update",
        "add",
        "discard",
        "setdefault",
        "popitem",
        "sort",
        "reverse",
        "retain_grad",
        "__setitem__",
        "__delitem__",
    }
)


def is_mutation(node: Node) -> bool:
    """Does running this node change the object in args[0] (rather than only producing a new value)?"""
    op = node.op
    if op is _SETITEM or op is _SETATTR:
        return True
    if op is _METHOD:
        name = node.target
        return name in MUTATING_METHODS or (name.endswith("_") and not name.endswith("__"))
    if op is _CALL:
        target = node.target
        if getattr(target, "mutates_first_argument", False) is True:  # a lowering's in-place write (put, ...)
            return True
        name = getattr(target, "__name__", "")
        return name.startswith("__i") and name.endswith("__") or name.startswith("i") and name in _INPLACE_OPS
    return False


_SETITEM, _SETATTR, _METHOD, _CALL = Op.SETITEM, Op.SETATTR, Op.METHOD, Op.CALL  # enum lookups are slow
_INPLACE_OPS = frozenset(
    {
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "imatmul",
        "iand",
        "ior",
        "ixor",
        "ilshift",
        "irshift",
    }
)


def prepend(prefix: Graph, graph: Graph) -> Graph:
    """``prefix``'s nodes (renumbered below ``graph``'s ids, params appended) followed by ``graph``'s nodes.

    Used to apply a model's persistent edits before every trace. The prefix addresses whole-batch sites.
    """
    if not prefix.nodes:
        return graph
    first = graph.nodes[0].id if graph.nodes else 0
    offset = first - 1 - prefix.nodes[-1].id
    shift = len(graph.params)

    def remap(leaf):
        return Ref(leaf.id + offset) if type(leaf) is Ref else ParamRef(leaf.index + shift)

    nodes = tuple(
        Node(
            n.id + offset,
            n.op,
            n.target,
            map_args(n.args, remap),
            tuple((k, map_args(v, remap)) for k, v in n.kwargs),
            tuple((g + offset, b) for g, b in n.guards),
            tuple(a + offset for a in n.after),
            None,
            n.body,
            n.loc,
        )
        for n in prefix.nodes
    )
    return graph.replace(nodes=nodes + graph.nodes, params=graph.params + prefix.params)


def structure_tuple(graph: Graph, numbers: bool = True) -> tuple:
    """A hashable, cheap form of ``graph``'s structure: everything but param values and source locations.

    Two graphs with equal tuples differ only in the runtime values their params hold (what the pass memo and
    the compile cache rely on). ``serialize.structure_key`` is the stable, printable digest of the same idea.
    ``numbers=False`` abstracts int and float literals to their type (the compiled lowering lifts them to inputs:
    a value or position sweep is one structure; ``compile="auto"`` counts runs by it).
    """
    nodes = tuple(_node_tuple(n, numbers) for n in graph.nodes)
    return (nodes, graph.invokes, graph.kind, graph.needs_output)


def _node_tuple(node: Node, numbers: bool) -> tuple:
    body = tuple(structure_tuple(g, numbers) for g in node.body)
    return (
        node.id,
        node.op,
        _freeze(node.target, numbers),  # an ITER node's slice is unhashable before Python 3.12
        _freeze(node.args, numbers),
        _freeze(node.kwargs, numbers),
        node.guards,
        node.after,
        node.invoke,
        body,
    )


def _freeze(value: Any, numbers: bool = True) -> Any:
    """A hashable form of an argument structure (slices, lists and dicts are unhashable); ``numbers=False``: int
    and float literals as their type."""
    t = type(value)
    if t is tuple:
        return tuple(_freeze(v, numbers) for v in value)
    if t is list:
        return ("[", *(_freeze(v, numbers) for v in value))
    if t is dict:
        return ("{", *((k, _freeze(v, numbers)) for k, v in value.items()))
    if t is slice:
        return (
            ":",
            _freeze(value.start, numbers),
            _freeze(value.stop, numbers),
            _freeze(value.step, numbers),
        )
    if not numbers and (t is int or t is float):
        return t
    return value


def saved_ids(nodes) -> tuple[int, ...]:
    """Ids of the values SAVE nodes among ``nodes`` keep (what a run hands back to the user)."""
    return tuple(n.args[0].id for n in nodes if n.op is Op.SAVE and type(n.args[0]) is Ref)
