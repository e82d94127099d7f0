"""What a tracer and a session share: turning the values a block records with into IR arguments.

:class:`Recorder` is the base of :class:`~intervene_compiler.tracing.Tracer` and of
:class:`~intervene_compiler.tracing.Session` (``session.py``). It encodes a recorded operation's arguments: literals
stay as they are, a proxy of the same block (or of the same session) becomes a :class:`~intervene_compiler.ir.Ref`,
a saved value of a finished block and any other object (a tensor, a module, a callable) becomes a
:class:`~intervene_compiler.ir.ParamRef` to the block's params; and it records saves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TracingError, user_location
from ..ir import Op, ParamRef, Ref
from .proxy import Proxy
from .shapes import Shape

if TYPE_CHECKING:
    from .session import Session

_LITERALS = frozenset({int, float, str, bool, type(None), complex, bytes})


class Recorder:
    """What a tracer and a session (session.py) share: turning recorded values into IR arguments.

    Subclasses provide ``_record``, ``_session`` (the open session, or None), ``_params``/``_param_index`` and
    ``_saved_ids`` (declared here; a tracer's defaults are in tracer.py).
    """

    _session: Session | None  # a session's own is itself
    _params: tuple | list[Any]
    _param_index: Mapping[int, int]  # id of a param -> its index in _params
    _saved_ids: set[int]

    if TYPE_CHECKING:

        def _record(
            self,
            op: Op,
            target: Any,
            args: tuple = (),
            kwargs: dict | None = None,
            *,
            after: tuple[int, ...] = (),
        ) -> Proxy: ...

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
            # a dict: a tracer's own, made with its list of params above (a session's from the start)
            self._param_index[id(obj)] = index  # type: ignore[index]
        return ParamRef(index)

    def _save(self, proxy: Proxy) -> None:
        nid = proxy._node_id()
        if nid not in self._saved_ids:
            self._saved_ids.add(nid)
            self._record(Op.SAVE, None, (proxy,))


__all__ = ["Recorder"]
