"""Traceable built-ins and ``apply``: values created inside a block that live in the intervention graph.

``ic.list()`` inside a block records a list that exists when the model runs (append to it, save it);
``ic.apply(fn, *args)`` records a call of any callable. Outside a block they simply call through.
"""

from __future__ import annotations

import builtins
from typing import Any

from ..ir import Op
from .current import current_tracer
from .proxy import Proxy, _find_live_tracer
from .saving import save_container


def apply(fn, *args: Any, **kwargs: Any) -> Any:
    """Record ``fn(*args, **kwargs)`` in the graph (or call it, outside a tracing block)."""
    tracer = _find_live_tracer(args, kwargs) or current_tracer()
    if tracer is None or tracer._finished:
        return fn(*args, **kwargs)
    return tracer._record(Op.CALL, fn, args, kwargs)


def save(value: Any) -> Any:
    """``ic.save(x)`` is ``x.save()`` for proxies and for a list, dict, set or tuple inside a block (a container of the
    graph, a plain container after the block: ``saving.py``); anything else is returned unchanged."""
    if isinstance(value, Proxy):
        return value.save()
    if type(value) in (builtins.list, builtins.dict, builtins.set, builtins.tuple):
        tracer = current_tracer()
        if tracer is not None and not tracer._finished:
            return save_container(value)
    return value


def _traced(fn):
    def make(*args: Any, **kwargs: Any) -> Any:
        return apply(fn, *args, **kwargs)

    make.__name__ = fn.__name__
    make.__qualname__ = fn.__name__
    make.__doc__ = f"A traceable ``{fn.__name__}(...)``: inside a tracing block it becomes a graph value."
    return make


list = _traced(builtins.list)  # noqa: A001
dict = _traced(builtins.dict)  # noqa: A001
tuple = _traced(builtins.tuple)  # noqa: A001
set = _traced(builtins.set)  # noqa: A001
int = _traced(builtins.int)  # noqa: A001
float = _traced(builtins.float)  # noqa: A001
str = _traced(builtins.str)  # noqa: A001
bool = _traced(builtins.bool)  # noqa: A001
bytes = _traced(builtins.bytes)  # noqa: A001
bytearray = _traced(builtins.bytearray)  # noqa: A001
complex = _traced(builtins.complex)  # noqa: A001
