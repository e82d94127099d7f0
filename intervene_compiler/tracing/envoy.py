"""Envoys mirror a model's module tree; ``.output``/``.input``/``.inputs`` on them record site accesses.

``model.transformer.h[3].mlp`` walks the envoy tree (with ``rename`` aliases); attributes that are not
submodules (``.weight``, ``.config``) come from the module itself. Inside a tracing block, reading
``envoy.output`` records a SITE node and returns its proxy; assigning records a SET node. Calling an envoy inside a
block runs the module ad hoc on traced values (logit lens: ``model.lm_head(model.transformer.ln_f(h))``).
"""

from __future__ import annotations

import difflib
import threading
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModuleIndexError, TracingError, UnknownModuleError, user_location
from ..ir import Op, SiteKind
from ..runtime import ModelCaches
from ..runtime.source import HOOKED

if TYPE_CHECKING:
    from .tracer import Tracer

_OUTPUT, _INPUT, _INPUTS = SiteKind.OUTPUT, SiteKind.INPUT, SiteKind.INPUTS  # enum class lookups are slow


class ModelState:
    """State shared by a model's envoy tree and every edited copy of it: the stack of open tracers, the
    front-end's memo of recorded structures, and the runtime's caches (``runtime.ModelCaches``)."""

    def __init__(self, rename: dict[str, str] | None):
        self.rename = dict(rename or {})
        self.tracers: list[Tracer] = []
        # held by a tracing block from its first line to the end of its run (and by a session's trace while it
        # runs): blocks on one model from several threads take turns, so no thread records into another's block
        # or runs while another's hooks are installed. Reentrant: a block may open inside another's forward.
        self.lock = threading.RLock()
        self.caches = ModelCaches()
        # a trace of only site reads and saves: the key of its notes -> (facts, Optimized); see Tracer._optimized
        self.simple: dict[tuple, Any] = {}
        self.last_simple: tuple | None = None  # (key, Optimized) of the last one: a repeat compares, no hash

    def __getstate__(self) -> dict:
        """A pickled model keeps its aliases; its open tracers, lock, memos and compiled programs belong to this
        process and start empty in the copy."""
        return {"rename": self.rename}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["rename"])  # type: ignore[misc]

    def push(self, tracer: Tracer) -> None:
        self.tracers.append(tracer)

    def pop(self, tracer: Tracer) -> None:
        if self.tracers and self.tracers[-1] is tracer:
            self.tracers.pop()
        elif tracer in self.tracers:
            self.tracers.remove(tracer)

    def current(self, what: str) -> Tracer:
        if not self.tracers:
            raise TracingError(
                f"`{what}` is only available inside a tracing block",
                user_location(),
                f"use it inside `with model.trace(input):` (e.g. `{what.split('.')[-1]} = ...{what}.save()`)",
            )
        return self.tracers[-1]


def module_tensor(value: torch.Tensor) -> torch.Tensor:
    """A module's parameter or buffer as a traced value: the tensor itself (see ``Envoy.__getattr__``)."""
    return value


def _holds(module: torch.nn.Module, name: str) -> bool:
    d = module.__dict__
    return name in d.get("_parameters", ()) or name in d.get("_buffers", ())


class Envoy:
    """A proxy for one module of the wrapped model."""

    def __init__(self, module: torch.nn.Module, path: str, state: ModelState):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_state", state)
        self.__dict__["_kids"] = None  # see _children
        object.__setattr__(self, "_aliases", None)

    @property
    def _envoy_module(self) -> torch.nn.Module:
        return self._module

    @property
    def _children(self) -> dict[str, Envoy] | None:
        """The child envoys by name, None until built (then ``_child_envoys`` builds them).

        Built children are also instance attributes (unless that name is the class's or already the instance's),
        so ``model.layer1`` is found by plain attribute lookup: ``__getattr__`` runs only after Python has raised
        and caught an AttributeError for the lookup, the larger part of an envoy access. Setting this (to None:
        rebuild lazily) withdraws the previous children's attributes.
        """
        return self.__dict__["_kids"]

    @_children.setter
    def _children(self, children: dict[str, Envoy] | None) -> None:
        own = self.__dict__
        old = own.get("_kids")
        if old:
            for name, child in old.items():
                if own.get(name) is child:
                    del own[name]
        own["_kids"] = children
        if children:
            cls = type(self)
            for name, child in children.items():
                if name not in own and not hasattr(cls, name) and not name.startswith("__"):
                    own[name] = child

    # -- the tree ------------------------------------------------------------------------------------------------
    def _child_envoys(self) -> dict[str, Envoy]:
        children = self._children
        if children is None:
            prefix = self._path + "." if self._path else ""
            children = {
                name: Envoy(child, prefix + name, self._state)
                for name, child in self._module.named_children()
            }
            object.__setattr__(self, "_children", children)
        return children

    def _alias_map(self) -> dict[str, str]:
        aliases = self._aliases
        if aliases is None:
            aliases = {}
            for key, alias in self._state.rename.items():
                if "." in key:
                    if not self._path:
                        aliases[alias] = key
                elif key in self._child_envoys():
                    aliases[alias] = key
            object.__setattr__(self, "_aliases", aliases)
        return aliases

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        children = self._children
        if children is None:
            children = self._child_envoys()
        child = children.get(name)
        if child is not None:
            return child
        alias = self._alias_map().get(name)
        if alias is not None:
            return self._resolve(alias)
        module = self._module
        try:
            value = getattr(module, name)
        except AttributeError:
            pass
        else:
            tracers = self._state.tracers
            if tracers and isinstance(value, torch.Tensor) and _holds(module, name):
                # a parameter or buffer inside a block is a traced value (nnsight 0.4's protocol):
                # `model.lm_head.weight.save()`, `model.layer1.weight[:] = 0` (in place on the weight, as written)
                return tracers[-1]._record(Op.CALL, module_tensor, (value,))
            return value
        options = list(children) + list(self._alias_map())
        close = difflib.get_close_matches(name, options, n=3)
        where = "model" + ("." + self._path if self._path else "")
        hint = (
            f"did you mean {', '.join(repr(c) for c in close)}?"
            if close
            else f"print({where}) shows its submodules"
        )
        raise UnknownModuleError(
            f"{where} ({type(module).__name__}) has no submodule or attribute {name!r}", user_location(), hint
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs") or name in type(self).__dict__ or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if self._state.tracers and not hasattr(self._module, name):
            # inside a block, a new attribute on the torch module is a typo of a site far more often than intended
            where = self._name()
            close = difflib.get_close_matches(name, ["output", "input", "inputs"], n=1)
            raise TracingError(
                f"{where} ({type(self._module).__name__}) has no attribute {name!r} to set inside a tracing block",
                user_location(),
                f"did you mean `{where}.{close[0]}`?"
                if close
                else f"set the attribute on the module outside the block (`{where}.{name} = ...`)",
            )
        setattr(self._module, name, value)
        if isinstance(value, torch.nn.Module):  # a module attached here: a child envoy from now on
            object.__setattr__(self, "_children", None)
            object.__setattr__(self, "_aliases", None)

    def _resolve(self, dotted: str) -> Envoy:
        """The envoy at ``dotted``, each part a submodule's name first (so a submodule named ``output`` or
        ``input``, which attribute access gives the site of, is reached), else an alias or attribute."""
        envoy: Envoy = self
        for part in dotted.split("."):
            child = envoy._child_envoys().get(part)
            envoy = child if child is not None else getattr(envoy, part)
        return envoy

    def get(self, path: str) -> Envoy:
        """The envoy at a dotted path, e.g. ``model.get("transformer.h.0.mlp")`` (a ``model.`` prefix is fine).

        Path parts name submodules before attributes: ``model.get("head.output")`` is a submodule named
        ``output``, which ``model.head.output`` (its site) cannot reach; ``rename={"head.output": "out"}``
        gives it an attribute too."""
        if path in ("", "model"):
            return self
        if path.startswith("model."):
            try:
                return self._resolve(path[len("model.") :])
            except UnknownModuleError:
                pass  # a real submodule named "model" (Llama's ``model.layers``): resolve the path as given
        return self._resolve(path)

    def __getitem__(self, index: int | slice | str) -> Envoy | list[Envoy]:
        if isinstance(index, str):  # ModuleDict (or any submodule by name, `output` too)
            return self._resolve(index)
        children = list(self._child_envoys().values())
        if isinstance(index, slice):
            return children[index]
        try:
            return children[index]
        except (IndexError, TypeError):
            raise ModuleIndexError(
                f"model.{self._path}[{index!r}] does not exist: it has {len(children)} submodules",
                user_location(),
                f"use an index in range({len(children)}) (negative indices count from the end)",
            ) from None

    def __iter__(self):
        return iter(list(self._child_envoys().values()))

    # -- moving the model: the wrapper stays the wrapper (``model.to("cuda")`` returns ``model``) ---------------
    def to(self, *args: Any, **kwargs: Any) -> Envoy:
        """Move or cast the module (``torch.nn.Module.to``); returns this envoy, not the bare module."""
        self._module.to(*args, **kwargs)
        return self

    def cpu(self) -> Envoy:
        self._module.cpu()
        return self

    def cuda(self, device: Any = None) -> Envoy:
        self._module.cuda(device)
        return self

    def __len__(self) -> int:
        return len(self._child_envoys())

    def __repr__(self) -> str:
        return repr(self._module)

    # -- sites ---------------------------------------------------------------------------------------------------
    def _tracer(self, what: str) -> Tracer:
        tracers = self._state.tracers
        if tracers:  # the common case, without building the error text
            return tracers[-1]
        return self._state.current(f"{self._name()}.{what}")

    def _name(self) -> str:
        return "model" + ("." + self._path if self._path else "")

    @property
    def output(self):
        """This module's output in the current call (a proxy inside a tracing block)."""
        tracers = self._state.tracers  # self._tracer("output"), inlined
        return (tracers[-1] if tracers else self._tracer("output"))._site(self._path, _OUTPUT)

    @output.setter
    def output(self, value) -> None:
        self._tracer("output")._set_site(self._path, SiteKind.OUTPUT, value)

    @property
    def input(self):
        """This module's first positional argument in the current call."""
        tracers = self._state.tracers
        return (tracers[-1] if tracers else self._tracer("input"))._site(self._path, _INPUT)

    @input.setter
    def input(self, value) -> None:
        self._tracer("input")._set_site(self._path, SiteKind.INPUT, value)

    @property
    def inputs(self):
        """This module's ``(args, kwargs)`` in the current call."""
        tracers = self._state.tracers
        return (tracers[-1] if tracers else self._tracer("inputs"))._site(self._path, _INPUTS)

    @inputs.setter
    def inputs(self, value) -> None:
        self._tracer("inputs")._set_site(self._path, SiteKind.INPUTS, value)

    @property
    def source(self) -> Any:
        """The calls inside this module's forward, as sites: ``print(envoy.source)`` names them,
        ``envoy.source.<name>.output`` reads one (see ``tracing/source.py``)."""
        from .source import SourceEnvoy

        return SourceEnvoy(self)

    def skip(self, value: Any) -> None:
        """Do not run this module (in its current call): ``value`` is its output, e.g.
        ``model.transformer.h[1].skip(model.transformer.h[0].output)``. Modules inside it do not run either. The
        value must exist before the module would run (computed from earlier modules), and a skip applies to the
        whole batch (a module cannot run for some rows only)."""
        self._tracer("skip")._skip_site(self._path, value)

    def next(self, step: int = 1) -> Envoy:
        """Address this module's next call (e.g. the next generated token) from here on in the block."""
        self._tracer("next()")._next_call(self._path, step)
        return self

    def __call__(self, *args, **kwargs):
        """Inside a block, an ad hoc call of the module (recorded): interventions on its submodules do not run
        during it, unless ``hook=True`` (nnsight 0.4: an attached adapter's sites are then interceptable)."""
        tracers = self._state.tracers
        if tracers:
            hook = kwargs.pop("hook", False)
            return tracers[-1]._record(Op.MODULE, self._path + HOOKED if hook else self._path, args, kwargs)
        kwargs.pop("hook", None)
        return self._module(*args, **kwargs)
