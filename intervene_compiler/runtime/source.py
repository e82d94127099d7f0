"""Op-level sites: the calls inside a module's ``forward`` (``model.transformer.h[0].attn.source``).

:func:`source_of` reads a forward's source once per function and names every call in it, nnsight's way: the
called expression's dotted name with ``_`` for ``.`` and the call's index among calls of that name
(``self.c_attn(...)`` is ``self_c_attn_0``, the second ``x.view(...)`` ``x_view_1``; a call of something without a
name, such as ``f(x)(y)``'s outer call, is ``call_<k>``). Calls of ``super``, ``locals``, ``globals`` and ``vars``
are left alone: they need the frame they are written in.

To intervene on those calls, a run replaces the module's ``forward`` on the instance by
:func:`instrumented_forward`: the same function compiled from a rewritten syntax tree in which every named call
``f(a, k=v)`` is ``__ic_op__("name", f, a, k=v)``, and ``__ic_op__`` is the run's (it makes the call's inputs and
output events, as module hooks do). The function keeps its globals and closure (``super()`` works: ``__class__``
is one of its free variables), and decorators applied with ``functools.wraps`` (transformers' deprecation
wrappers) are kept by giving a copy of the wrapper the rewritten function.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SOURCE = ".source."  # in an op-level site's path: the module's path before it, the call's name after it
HOOKED = (
    "#hook"  # ends a MODULE node's target: an ad hoc call with its submodules' sites live (``hook=True``)
)
_UNTOUCHED = frozenset({"super", "locals", "globals", "vars"})
_OP = "__ic_op__"


@dataclass(frozen=True)
class CallSite:
    """One named call in a forward: its name, its line (1-based, in the forward's own source) and the called
    expression's source (``self.c_attn``, ``attention_interface``)."""

    name: str
    line: int
    func: str = ""


@dataclass(frozen=True)
class SourceInfo:
    """A forward's source and call sites, and the factory of its rewritten function (see the module docstring)."""

    function: types.FunctionType  # the innermost function (under functools.wraps decorators)
    lines: tuple[str, ...]  # its source, dedented
    first_line: int  # the first line's number in its file
    sites: tuple[CallSite, ...]
    factory: (
        Callable[..., types.FunctionType] | None
    )  # (__ic_op__, free variables...) -> the rewritten function

    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def render(self, path: str) -> str:
        """The source with each line's call sites named on the right."""
        by_line: dict[int, list[str]] = {}
        for s in self.sites:
            by_line.setdefault(s.line, []).append(s.name)
        width = max((len(line) for line in self.lines), default=0)
        out = [f"{path}.source: {self.function.__qualname__}"]
        for i, line in enumerate(self.lines, start=1):
            names = by_line.get(i)
            out.append(f"{line.ljust(width)}  # {', '.join(names)}" if names else line)
        return "\n".join(out)


_INFO: dict[types.CodeType, SourceInfo] = {}


def innermost(fn: Any) -> Any:
    """``fn`` under the decorators that keep it as ``__wrapped__``."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def source_of(module: torch.nn.Module) -> SourceInfo:
    """The call sites of ``module``'s forward (its class's; cached per function)."""
    fn = innermost(type(module).forward)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(
            f"{type(module).__name__}.forward is not a Python function: it has no source to look into"
        )
    return function_source(fn)


def function_source(fn: types.FunctionType) -> SourceInfo:
    """The call sites of a Python function (cached per code object)."""
    info = _INFO.get(fn.__code__)
    if info is None:
        info = _INFO[fn.__code__] = _analyse(fn)
    return info


# module -> {(code of the function making the call, call name): the function that call last ran}, seen at run
# time: a call of a local variable (``attention_interface(...)``) names its callee only when the forward runs, and
# two models of one class may run different ones (their configs choose)
_SEEN: weakref.WeakKeyDictionary[Any, dict[tuple[types.CodeType, str], types.FunctionType]] = (
    weakref.WeakKeyDictionary()
)


def callee_source(info: SourceInfo, name: str, module: Any, owner: Any = None) -> SourceInfo | None:
    """The source of the function call ``name`` of ``info``'s function runs (in ``module``'s forward), when it can
    be known before the model runs: a global or builtin name (``eager_attention_forward``), an attribute path from
    one or from ``self`` (``owner``: the module, when ``info`` is its forward), or a callee an earlier run of
    ``module`` saw. None when not known yet."""
    site = next((s for s in info.sites if s.name == name), None)
    if site is None:
        return None
    found: Any = _SEEN.get(module, {}).get((info.function.__code__, name))
    if found is None:
        found = _static_callee(info.function, site.func, owner)
    if isinstance(found, torch.nn.Module):
        raise TypeError(f"`{site.func}` is a module ({type(found).__name__}): use its own `.source`")
    if isinstance(found, types.MethodType):
        found = found.__func__
    found = innermost(found) if found is not None else None
    return function_source(found) if isinstance(found, types.FunctionType) else None


def _static_callee(fn: types.FunctionType, expr: str, owner: Any) -> Any:
    """What ``expr`` names in ``fn``'s scope, without running it: None for local variables and anything else."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    code = fn.__code__
    if node.id == "self" and owner is not None:
        value = owner
    elif node.id in code.co_varnames or node.id in code.co_cellvars or node.id in code.co_freevars:
        return None  # a local: known only when the forward runs
    elif node.id in fn.__globals__:
        value = fn.__globals__[node.id]
    else:
        import builtins

        value = getattr(builtins, node.id, None)
    for attr in reversed(attrs):
        value = getattr(value, attr, None)
    return value


def _name_of(func: ast.expr) -> str | None:
    """``self_c_attn`` for ``self.c_attn``, ``super_forward`` for ``super().forward``; the method's name alone on
    another call's result (``x.view(s).transpose(1, 2)``'s outer call is ``transpose``); None otherwise."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return "_".join(reversed(parts))
    if isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "super" and parts:
        return "super_" + "_".join(reversed(parts))  # super().forward(x): super_forward
    return parts[0] if parts else None


class _Namer(ast.NodeVisitor):
    """Names the calls of one function body in source order (not those of nested functions and lambdas)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Call, str]] = []
        self.counts: dict[str, int] = {}
        self.depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # noqa: N802 - ast's visitor protocol
        self.depth += 1
        if self.depth == 1:
            for stmt in node.body:
                self.visit(stmt)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]  # noqa: N815

    def visit_Lambda(self, node: ast.Lambda) -> None:  # noqa: N802
        return None

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        base = _name_of(node.func)
        if base not in _UNTOUCHED:
            base = base or "call"
            k = self.counts.get(base, 0)
            self.counts[base] = k + 1
            self.found.append((node, f"{base}_{k}"))
        self.generic_visit(node)


class _Rewriter(ast.NodeTransformer):
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names  # id(call node) -> its name

    def visit_Call(self, node: ast.Call) -> Any:  # noqa: N802
        name = self.names.get(id(node))
        node = self.generic_visit(node)  # type: ignore[assignment]
        if name is None:
            return node
        return ast.copy_location(
            ast.Call(
                func=ast.Name(id=_OP, ctx=ast.Load()),
                args=[ast.Constant(value=name), node.func, *node.args],
                keywords=node.keywords,
            ),
            node,
        )


def _analyse(fn: types.FunctionType) -> SourceInfo:
    lines, first = inspect.getsourcelines(fn)
    text = textwrap.dedent("".join(lines))
    tree = ast.parse(text)
    func = tree.body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TypeError(f"the source of {fn.__qualname__} is not a function definition")
    namer = _Namer()
    namer.visit(func)
    sites = tuple(CallSite(name, call.lineno, ast.unparse(call.func)) for call, name in namer.found)
    func.decorator_list = []
    _Rewriter({id(call): name for call, name in namer.found}).visit(func)
    free = fn.__code__.co_freevars
    fields: dict[str, Any] = {
        "name": "__ic_factory__",
        "args": ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=a) for a in (_OP, *free)],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        "body": [func, ast.Return(value=ast.Name(id=func.name, ctx=ast.Load()))],
        "decorator_list": [],
        "returns": None,
        "type_comment": None,
    }
    if sys.version_info >= (3, 12):
        fields["type_params"] = []
    factory_def = ast.FunctionDef(**fields)
    module = ast.Module(body=[factory_def], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first - 1)  # tracebacks name the file's own lines
    namespace: dict[str, Any] = {}
    try:
        code = compile(module, fn.__code__.co_filename, "exec")
        exec(code, fn.__globals__, namespace)  # noqa: S102 - the model's own forward, rewritten
        factory = namespace.pop("__ic_factory__")
    except SyntaxError:
        factory = None
    return SourceInfo(fn, tuple(text.splitlines()), first, sites, factory)


def instrumented_forward(module: torch.nn.Module, op: Callable[..., Any]) -> Any:
    """``module``'s forward with every named call going through ``op(name, fn, *args, **kwargs)``, bound to the
    module (to be set on the instance); decorators kept (see the module docstring)."""
    return types.MethodType(_instrumented(type(module).forward, op), module)


def _instrumented(outer: Any, op: Callable[..., Any]) -> Any:
    """The Python function ``outer`` (under its ``functools.wraps`` decorators) with its named calls going
    through ``op``."""
    fn = innermost(outer)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(
            f"{getattr(outer, '__qualname__', outer)!r} is not a Python function: it has no source"
        )
    info = function_source(fn)
    if info.factory is None:
        raise TypeError(f"{fn.__qualname__} could not be rewritten")
    cells = fn.__closure__ or ()
    rewritten = info.factory(op, *(c.cell_contents for c in cells))
    rewritten.__defaults__ = fn.__defaults__
    rewritten.__kwdefaults__ = fn.__kwdefaults__
    if outer is not fn:
        rewritten = _rewrap(outer, fn, rewritten)
    return rewritten


def instrumented_callable(fn: Any, op: Callable[..., Any], where: str, names: Any = ()) -> Any:
    """``fn`` (a function or bound method a forward calls) with its named calls going through ``op``, for a
    call site's own ``.source``; ``names`` (the calls the run touches) must be ``fn``'s. Records ``fn`` as the
    callee of ``where`` (see :func:`callee_source`)."""
    if isinstance(fn, torch.nn.Module):
        raise TypeError(f"{where} calls a module ({type(fn).__name__}): use that module's own `.source`")
    bound = fn.__self__ if isinstance(fn, types.MethodType) else None
    func = fn.__func__ if isinstance(fn, types.MethodType) else fn
    inner = innermost(func)
    if not isinstance(inner, types.FunctionType):
        raise TypeError(
            f"{where} calls {fn!r}, which is not a Python function: it has no source to look into"
        )
    info = function_source(inner)
    missing = sorted(set(names) - set(info.names()))
    if missing:
        raise LookupError(
            f"{where} calls {inner.__qualname__}, which has no call named {', '.join(map(repr, missing))} "
            f"(its calls: {', '.join(info.names()) or 'none'})"
        )
    new = _instrumented(func, op)
    return new if bound is None else types.MethodType(new, bound)


def op_router(
    module: Any,
    calls: dict[str, tuple],
    scope: types.CodeType | None = None,
    locate: Callable[[str], Any] | None = None,
    prefix: str = "",
) -> Callable[..., Any]:
    """The ``__ic_op__`` of a rewritten forward: ``calls`` maps a call's name to its (pre-hook, post-hook), either
    may be None (``hooked_call``); a name ``a_0.source.b_0`` reaches into the function call ``a_0`` runs (its
    own calls go through a router of their own). Calls not in ``calls`` run as written. A called function that
    cannot be looked into (a module, no Python source, no call of a wanted name) raises ``UnknownModuleError`` at
    the line ``locate(full call name)`` gives."""
    direct: dict[str, tuple] = {}
    nested: dict[str, dict[str, tuple]] = {}
    for name, hooks in calls.items():
        head, sep, rest = name.partition(SOURCE)
        if sep:
            nested.setdefault(head, {})[rest] = hooks
        else:
            direct[name] = hooks
    inner = {head: (sub, {n.partition(SOURCE)[0] for n in sub}) for head, sub in nested.items()}

    if scope is None:
        scope = innermost(type(module).forward).__code__
    seen = _SEEN.setdefault(module, {})

    def op(name, fn, *args, **kwargs):
        if (
            type(fn) is types.FunctionType
        ):  # functions only: a bound method or module would keep its model alive
            seen[(scope, name)] = fn
        found = inner.get(name)
        if found is not None:
            sub, names = found
            callee = innermost(fn.__func__ if isinstance(fn, types.MethodType) else fn)
            code = getattr(callee, "__code__", None)
            where = prefix + name
            try:
                router = op_router(module, sub, code, locate, where + SOURCE)
                fn = instrumented_callable(fn, router, where, names)
            except (LookupError, TypeError) as e:
                from ..errors import UnknownModuleError

                wanted = where + SOURCE + next(iter(sub))
                raise UnknownModuleError(
                    str(e), locate(wanted) if locate else None, "print the call's `.source` to see its calls"
                ) from None
        hooks = direct.get(name)
        if hooks is None:
            return fn(*args, **kwargs)
        return hooked_call(module, hooks[0], hooks[1], fn, args, kwargs)

    return op


def _rewrap(outer: Any, inner: Any, new: Any) -> Any:
    """A copy of the decorator chain ``outer`` (down to ``inner``) calling ``new`` where it called ``inner``."""
    wrapped = outer.__wrapped__
    below = new if wrapped is inner else _rewrap(wrapped, inner, new)
    cells = outer.__closure__ or ()
    if not any(c.cell_contents is wrapped for c in cells):
        raise TypeError(f"cannot see inside the decorator around {inner.__qualname__}")
    closure = tuple(types.CellType(below) if c.cell_contents is wrapped else c for c in cells)
    copy = types.FunctionType(outer.__code__, outer.__globals__, outer.__name__, outer.__defaults__, closure)
    copy.__kwdefaults__ = outer.__kwdefaults__
    copy.__dict__.update(outer.__dict__)
    setattr(copy, "__wrapped__", below)  # noqa: B010 - functools' attribute, on a function object
    return copy


def hooked_call(module: Any, pre: Any, post: Any, fn: Any, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` between a forward pre-hook and post-hook (either may be None), called as torch
    calls a module's: a hook's result, when not None, replaces the arguments or the output."""
    if pre is not None:
        new = pre(module, args, kwargs)
        if new is not None:
            args, kwargs = new
    output = fn(*args, **kwargs)
    if post is not None:
        new = post(module, args, kwargs, output)
        if new is not None:
            output = new
    return output


def owner_and_call(path: str) -> tuple[str, str] | None:
    """``(module path, call name)`` of an op-level site's path, None for a module's."""
    if path.startswith("source."):  # the root's (checked first: a nested call's path holds SOURCE too)
        return "", path[len("source.") :]
    if SOURCE in path:
        owner, _, name = path.partition(SOURCE)
        return owner, name
    return None


__all__ = [
    "HOOKED",
    "SOURCE",
    "CallSite",
    "SourceInfo",
    "callee_source",
    "function_source",
    "hooked_call",
    "innermost",
    "instrumented_callable",
    "instrumented_forward",
    "op_router",
    "owner_and_call",
    "source_of",
]
