"""``envoy.source``: the calls inside a module's forward, as sites (``model.transformer.h[0].attn.source``).

``print(model.transformer.h[0].attn.source)`` shows the forward's source with each call named
(``runtime/source.py``: ``self_c_attn_0``, ``attention_interface_0``, ...). ``source.<name>.output`` reads that
call's return value, ``.input`` its first argument and ``.inputs`` its ``(args, kwargs)``; setting them (or editing
them in place) changes what the forward sees. The site's path is the module's, ``.source.`` and the call's name;
its call index counts that call's runs in the module's forward (``.next()`` as for modules). A call's own
``.source`` reaches into the function it calls: ``attn.source.attention_interface_0.source.matmul_0`` is a site
whose path continues with ``.source.`` and the inner call's name. The eager backend runs the module with its forward
rewritten for the run (``backends/eager/events.py``, ``runtime.source.op_router``); the compiled one sets the
rewritten forward for its call (a call's own ``.source`` runs eagerly).
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

from ..errors import TracingError, UnknownModuleError, user_location
from ..ir import SiteKind
from ..runtime.source import SOURCE, SourceInfo, callee_source, source_of

if TYPE_CHECKING:
    from .envoy import Envoy


class SourceEnvoy:
    """``envoy.source``: the named calls of the module's forward; attribute access gives an :class:`OpEnvoy`."""

    _envoy: Envoy
    _info: SourceInfo

    def __init__(self, envoy: Envoy):
        object.__setattr__(self, "_envoy", envoy)
        try:
            info = source_of(envoy._module)
        except (OSError, TypeError) as e:
            raise TracingError(
                f"{envoy._name()}.source is not available: {e}",
                user_location(),
                "op-level sites need a module whose forward is Python source (not a compiled or C++ module)",
            ) from None
        object.__setattr__(self, "_info", info)

    @property
    def info(self) -> SourceInfo:
        return self._info

    def __getattr__(self, name: str) -> OpEnvoy:
        if name.startswith("__"):
            raise AttributeError(name)
        envoy = self._envoy
        names = self._info.names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            raise UnknownModuleError(
                f"{envoy._name()}.source has no call named {name!r}",
                user_location(),
                f"did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else f"print({envoy._name()}.source) shows the calls' names",
            )
        return OpEnvoy(envoy, name, self._info)

    def __dir__(self) -> list[str]:
        return list(self._info.names())

    def __str__(self) -> str:
        return self._info.render(self._envoy._name())

    __repr__ = __str__


class OpEnvoy:
    """One call inside a module's forward (``attn.source.attention_interface_0``): its ``.output``, ``.input``
    and ``.inputs`` are sites, read and set as a module's are; its ``.source`` reaches into the function it calls.

    ``call`` is the call's name within the module's forward (``attention_interface_0``, or for a call inside a
    called function ``attention_interface_0.source.matmul_0``); ``scope`` is the source of the function making the
    call (None when that function is known only when the model runs)."""

    _owner: Envoy
    _call: str
    _path: str
    _label: str
    _scope: SourceInfo | None

    def __init__(self, owner: Envoy, call: str, scope: SourceInfo | None = None):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_path", f"{owner._path}{SOURCE}{call}" if owner._path else f"source.{call}")
        object.__setattr__(self, "_label", f"{owner._name()}.source.{call}")
        object.__setattr__(self, "_scope", scope)

    def _tracer(self, what: str) -> Any:
        return self._owner._tracer(f"source.{what}")

    @property
    def output(self):
        return self._tracer("output")._site(self._path, SiteKind.OUTPUT)

    @output.setter
    def output(self, value) -> None:
        self._tracer("output")._set_site(self._path, SiteKind.OUTPUT, value)

    @property
    def input(self):
        return self._tracer("input")._site(self._path, SiteKind.INPUT)

    @input.setter
    def input(self, value) -> None:
        self._tracer("input")._set_site(self._path, SiteKind.INPUT, value)

    @property
    def inputs(self):
        return self._tracer("inputs")._site(self._path, SiteKind.INPUTS)

    @inputs.setter
    def inputs(self, value) -> None:
        self._tracer("inputs")._set_site(self._path, SiteKind.INPUTS, value)

    def next(self, step: int = 1) -> OpEnvoy:
        """Address this call's next run in the forward (or the next step's)."""
        self._owner._tracer("next")._next_call(self._path, step)
        return self

    @property
    def source(self) -> CallSource:
        """The calls inside the function this call runs (``...attention_interface_0.source.matmul_0``)."""
        info = None
        if self._scope is not None:
            module = self._owner._module
            owner = module if SOURCE not in self._call else None
            try:
                info = callee_source(self._scope, self._call.rpartition(SOURCE)[2], module, owner)
            except TypeError as e:
                raise TracingError(f"{self._label}.source: {e}", user_location()) from None
        return CallSource(self, info)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            object.__setattr__(self, name, value)
            return
        raise TracingError(f"{self._label} has no attribute {name!r} to set", user_location())

    def __repr__(self) -> str:
        return f"<call site {self._label}>"


_CALL_NAME = re.compile(r"^[A-Za-z_]\w*_\d+$")


class CallSource:
    """``call_site.source``: the named calls of the function a call runs. When that function can be known before
    the model runs (a global function, ``self``'s method, or one an earlier run saw) its names are checked here;
    otherwise (a local variable, such as transformers' ``attention_interface``) when the call runs."""

    _call: OpEnvoy
    _info: SourceInfo | None

    def __init__(self, call: OpEnvoy, info: SourceInfo | None):
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_info", info)

    def __getattr__(self, name: str) -> OpEnvoy:
        if name.startswith("__"):
            raise AttributeError(name)
        call, info = self._call, self._info
        names = info.names() if info is not None else ()
        if (info is not None and name not in names) or (info is None and not _CALL_NAME.match(name)):
            close = difflib.get_close_matches(name, names, n=3)
            raise UnknownModuleError(
                f"{call._label}.source has no call named {name!r}",
                user_location(),
                f"did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else f"print({call._label}.source) shows the calls' names",
            )
        return OpEnvoy(call._owner, f"{call._call}{SOURCE}{name}", info)

    def __dir__(self) -> list[str]:
        return list(self._info.names()) if self._info is not None else []

    def __str__(self) -> str:
        label = f"{self._call._label}"
        if self._info is None:
            return (
                f"{label}.source: the function this call runs is known only when the model runs; print this "
                "after a trace that reaches the call"
            )
        return self._info.render(label)

    __repr__ = __str__


__all__ = ["CallSource", "OpEnvoy", "SourceEnvoy"]
