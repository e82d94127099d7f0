"""NNsight: wrap any torch.nn.Module to trace interventions on it.

The wrapper is the root envoy. It owns how inputs are prepared and batched across invokes (``_prepare_inputs``,
``_batch_inputs``: the base class concatenates tensors along dim 0; subclasses such as LanguageModel tokenize and
pad), how the model is called (``_forward``), and the run's :class:`~intervene_compiler.runtime.Target`
(``_target``: the module, its forward, its caches and facts) that ``execute`` hands to a backend. It never
imports a backend.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any

import torch

from ..errors import InvokeError, SourceLoc, TracingError, user_location
from ..ir import Graph, ModelFacts, prepend
from ..ir.nodes import walk_nodes
from ..runtime import (
    Target,
    check_token_ids,
    decoder_layers_path,
    strip_inert_hooks,
    token_limits,
    unembedding_path,
)
from .envoy import Envoy, ModelState
from .session import Session
from .tracer import Tracer


class NNsight(Envoy):
    """Wrap ``module`` so ``with model.trace(x):`` can read and edit its internals.

    Args:
        module: any ``torch.nn.Module``.
        rename: aliases, e.g. ``{"transformer.h": "layers", "mlp": "ff"}``: a dotted path becomes an attribute of
            the root (``model.layers``), a plain name an alias at every level that has that child.

    Examples:
        >>> model = NNsight(net)
        >>> with model.trace(x):
        ...     h = model.layer1.output.save()
    """

    def __init__(
        self,
        module: torch.nn.Module,
        rename: dict[str, str] | None = None,
        compile: bool | str = False,
        reuse: bool = False,
    ):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, got {type(module).__name__}")
        strip_inert_hooks(module)  # left on a copy of a model the compiled backend ran (runtime/inert.py)
        _warn_site_named_submodules(module)
        super().__init__(module, "", ModelState(rename))
        self._set_edits(())
        from ..execute import compile_option

        object.__setattr__(self, "_compile", compile_option(compile))
        object.__setattr__(self, "_reuse_default", bool(reuse))
        object.__setattr__(self, "_target_memo", None)

    @property
    def _model(self) -> torch.nn.Module:
        return self._module

    def __getstate__(self) -> dict:
        """Pickle the module, aliases, edits and options; the memo of the run target is rebuilt in the copy."""
        state = dict(self.__dict__)
        state["_target_memo"] = None
        state.pop("_limits_memo", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        strip_inert_hooks(self._module)

    # -- contexts ------------------------------------------------------------------------------------------------
    def trace(
        self,
        *inputs: Any,
        trace: bool = True,
        scan: bool = False,
        validate: bool = False,
        invoker_args: dict | None = None,
        compile: bool | str | None = None,
        reuse: bool | None = None,
        remote: bool = False,
        blocking: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Open a tracing block on ``inputs`` (the model runs when it exits).

        With ``trace=False`` the model runs at once (with any edits) and its output is returned.
        ``scan``/``validate`` run the interventions on fake tensors while recording, so mistakes surface at
        their line before the real run. ``compile=True`` runs the block through the compiled backend (model and
        interventions as one graph compiled by Inductor, cached by structure); ``compile="auto"`` runs a
        structure eagerly until it has run twice and compiles it from its third run (one-off traces never pay a
        compile, sweeps do); the default is the model's (``NNsight(module, compile=...)``). ``reuse=True``
        (default: the model's, ``NNsight(module, reuse=...)``, off) replays the unedited decoder layers an
        earlier trace on the same prompt computed: a patching sweep runs about half the layers. Opt in only if the
        weights are not written through ``.data`` or a NumPy view between traces (see :meth:`clear_reuse`).
        """
        if remote:
            if not trace:
                raise TracingError("`trace=False` runs the model here: drop `remote=True`", user_location())
            if reuse:
                raise TracingError(
                    "`reuse=True` replays layers this process computed: it does not apply to a remote trace",
                    user_location(),
                    "drop `reuse=True` (the service compiles each structure once for every user instead)",
                )
            tracer = Tracer(self, inputs, kwargs, scan=scan, validate=validate, invoker_args=invoker_args)
            return remote_tracer(tracer, blocking, compile)
        compile = self._compile if compile is None else compile
        reuse = self._reuse_default if reuse is None else reuse
        if not trace:
            tracer = Tracer(
                self, inputs, kwargs, needs_output=True, invoker_args=invoker_args, compile=compile
            )
            with tracer:
                pass
            return tracer.output
        return Tracer(
            self,
            inputs,
            kwargs,
            scan=scan,
            validate=validate,
            invoker_args=invoker_args,
            compile=compile,
            reuse=reuse,
        )

    def run_graph(
        self,
        graph: Graph,
        inputs: list[tuple[tuple, dict]],
        compile: bool | str = False,
        generate: dict | None = None,
    ) -> Any:
        """Run a recorded intervention graph on this model, as a block's exit would (the service runs a remote
        request's graph this way: ``remote/jobs.py``). ``inputs``: one prepared ``(args, kwargs)`` per invoke;
        ``generate``: ``generate()``'s keyword arguments, to run it as a generate block. Returns the
        ``RunResult`` (saved values by node id). Errors are raised as a local block raises them, except that an
        error of the model's own code names no line (the caller knows the block's)."""
        from ..errors import InterventionError, model_error
        from ..execute import RunOptions, execute
        from ..pipeline import optimize
        from .running import _raised_by_model

        with self._state.lock, self._generating(generate):
            target = self._target(False)
            optimized = optimize(graph, target.facts, target.caches.optimized)
            try:
                return execute(optimized, inputs, target, RunOptions.of(compile, False, False))
            except InterventionError:
                raise
            except Exception as e:
                if _raised_by_model(e):
                    raise model_error(e, None) from e
                raise

    def prepare_inputs(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        """One invoke's input as this model takes it: ``(args, kwargs, batch size)`` (a language model tokenizes
        text). A session's traces on the service prepare their inputs this way."""
        return self._prepare_inputs(*args, **kwargs)

    def _generating(self, generate: dict | None) -> Any:
        """The context in which a run is a generate block (a language model's: ``LanguageModel``)."""
        if generate is not None:
            raise TracingError(f"{type(self).__name__} has no generate()", None)
        return contextlib.nullcontext()

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Like ``trace``, but nothing really runs: shapes and dtypes come from fake tensors."""
        return Tracer(self, inputs, kwargs, mode="scan")

    def session(self, remote: bool = False, **kwargs: Any) -> Session:
        """``with model.session() as session:`` records many traces (of this or other models) as one program.

        The traces run in order when the block exits; a value from one trace can feed a later one without
        ``.save()``, and only saved values survive. See :class:`~intervene_compiler.tracing.session.Session`
        for ``session.iter``, ``session.log``, ``session.exit`` and training state created inside a session.
        ``remote=True`` runs it as one job on the service (``blocking=False``: return at once; ``compile=False``:
        its traces run eagerly there).
        """
        blocking = kwargs.pop("blocking", True)
        compile = kwargs.pop("compile", None)
        checks = {k: kwargs.pop(k) for k in ("validate", "scan") if k in kwargs}
        if kwargs:
            raise TypeError(f"session() got unexpected keyword arguments {sorted(kwargs)}")
        if compile is not None and not remote:  # locally each trace takes its own compile=
            raise TypeError("session(compile=...) is for remote=True; locally, pass compile= to each trace")
        session = Session(self, validate=any(checks.values()))
        return remote_tracer(session, blocking, compile) if remote else session

    def clear_reuse(self) -> None:
        """Forget the unedited decoder-layer outputs kept for reuse across traces of one prompt (``reuse=True``).

        Traces on the same prompt replay them only while every parameter and buffer is unchanged by its version
        counter (``backends/eager/reuse.py``); a write through ``.data`` or a NumPy view bumps none (and
        ``p.data = t`` may land on a freed storage), so call this after one. That is why reuse is opt-in.
        """
        self._state.caches.reuse_memo = None

    def edit(self, *inputs: Any, inplace: bool = False) -> Editor:
        """``with model.edit() as edited:`` records interventions applied to every later trace of ``edited``.

        By default ``edited`` is a copy sharing the weights and the original is untouched; ``inplace=True``
        edits the model itself. ``inputs`` (nnsight 0.4's ``model.edit("example")``) are accepted and not needed:
        an edit applies to whatever later traces run on.
        """
        return Editor(self, inplace)

    @property
    def device(self) -> torch.device:
        """Where the model's first parameter (or buffer) lives; the CPU for a model without either."""
        module = self._module
        first = next(module.parameters(), None)
        if first is None:
            first = next(module.buffers(), None)
        return first.device if first is not None else torch.device("cpu")

    def clear_compiled(self) -> None:
        """Drop this model's compiled programs and remove the compiled backend's dispatcher hooks."""
        self._state.caches.clear_compiled()

    def clear_edits(self) -> None:
        """Remove every edit from this model."""
        self._set_edits(())

    # -- hooks for subclasses ------------------------------------------------------------------------------------
    def _prepare_inputs(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        """Turn one invoke's input into model ``(args, kwargs)`` and its batch size (token ids are checked
        against a ``transformers`` model's vocabulary and positions first)."""
        limits = self._token_limits()
        if limits is not None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                check_token_ids(ids, limits, user_location())
        for v in args:  # the first tensor with a batch dimension, in args then kwargs
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return args, kwargs, v.shape[0]
        for v in kwargs.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return args, kwargs, v.shape[0]
        return args, kwargs, 1

    def _check_batchable(
        self, first: tuple[tuple, dict], new: tuple[tuple, dict], loc: SourceLoc | None
    ) -> None:
        """Raise InvokeError at the invoke's line when its prepared input cannot share a batch with the first
        invoke's: other inputs, or tensors whose shapes past the batch dimension or dtypes differ."""
        (args0, kwargs0), (args1, kwargs1) = first, new
        hint = "give every invoke inputs of one layout (only the batch dimension may differ), or use separate traces"
        if len(args0) != len(args1) or kwargs0.keys() != kwargs1.keys():
            raise InvokeError(
                "this invoke's inputs are not the first invoke's (other positional or keyword inputs), so they "
                "cannot be batched together",
                loc,
                hint,
            )
        names = [f"positional input {i}" for i in range(len(args0))] + [
            f"keyword input {k!r}" for k in kwargs0
        ]
        for name, a, b in zip(names, (*args0, *kwargs0.values()), (*args1, *kwargs1.values())):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() == 0:
                continue
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.dim() != b.dim():
                raise InvokeError(
                    f"{name} of this invoke has shape {tuple(b.shape)} and dtype {b.dtype}, the first invoke's "
                    f"has shape {tuple(a.shape)} and dtype {a.dtype}: they cannot be batched together",
                    loc,
                    hint,
                )

    def _batch_inputs(self, prepared: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
        """Combine every invoke's prepared input into one batch (tensors concatenated along dim 0)."""
        if len(prepared) == 1:
            return prepared[0]
        arg_lists = [p[0] for p in prepared]
        if len({len(a) for a in arg_lists}) != 1:
            raise InvokeError("invokes must give the same number of positional inputs to be batched together")
        args = tuple(
            _concat([a[i] for a in arg_lists], f"positional input {i}") for i in range(len(arg_lists[0]))
        )
        keys = list(prepared[0][1])
        if any(list(p[1]) != keys for p in prepared):
            raise InvokeError("invokes must give the same keyword inputs to be batched together")
        kwargs = {k: _concat([p[1][k] for p in prepared], f"keyword input {k!r}") for k in keys}
        return args, kwargs

    def _fake_extras(self, acts: dict, kwargs: dict, tracer: Any, mode: Any) -> None:
        """Add to a fake run's recorded sites (``tracing/fakes.py``) those a forward does not produce (a language
        model's generated ids); nothing for a plain model."""

    def _token_limits(self) -> tuple[int, int | None] | None:
        """``runtime.token_limits`` of the wrapped model, found once per module."""
        module = self._module
        memo = self.__dict__.get("_limits_memo")
        if memo is None or memo[0] is not module:
            memo = (module, token_limits(module))
            object.__setattr__(self, "_limits_memo", memo)
        return memo[1]

    def _last_position_module(self) -> str | None:
        """The path of the module the model applies last and position-wise, for last-position narrowing
        (``passes/last_position.py``); None when unknown.

        Known only for ``transformers`` causal LMs (models that can ``generate``): their output embeddings are a
        Linear applied to the final hidden states, after everything else. A plain module's order is unknown.
        """
        path = self.__dict__.get("_unembed_path", False)
        if path is False:
            path = unembedding_path(self._module)
            object.__setattr__(self, "_unembed_path", path)
        return path

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model (the forward pass interventions run alongside)."""
        return self._module(*args, **kwargs)

    def _target(self, fake: bool = False) -> Target:
        """The model as ``execute`` and the backends see it for one run (``fake``: on fake tensors, nothing
        loads). Built once per wrapped module and reused: a repeated trace builds nothing."""
        module = self._module
        target = self._target_memo
        if target is not None and target.module is module and target.forward.__self__ is self:
            return target
        target = self._build_target(module, self._last_position_module())
        object.__setattr__(self, "_target_memo", target)
        return target

    def _build_target(self, module: torch.nn.Module, last: str | None, generating=None) -> Target:
        head = module.get_submodule(last) if last is not None else None
        facts = ModelFacts(last, weakref.ref(head) if isinstance(head, torch.nn.Linear) else None)
        layers = decoder_layers_path(module)
        return Target(
            module,
            self._forward,
            self._state.caches,
            self._batch_inputs,
            facts,
            layers,
            shares_prefix=last is not None and layers is not None,
            generating=generating,
        )

    # -- edits ---------------------------------------------------------------------------------------------------
    def _add_edit(self, graph: Graph) -> None:
        self._set_edits(self._edit_graphs + (graph,))

    def _set_edits(self, graphs: tuple[Graph, ...]) -> None:
        """Keep each edit's graph (``_edit_graphs``) and their concatenation, in order (``_edits``, what traces
        get prepended; None without edits)."""
        combined = None
        for graph in graphs:
            combined = graph if combined is None else prepend(combined, graph)
        object.__setattr__(self, "_edit_graphs", graphs)
        object.__setattr__(self, "_edits", combined)

    def _drop_failed_edit(self, error: BaseException) -> SourceLoc | None:
        """When ``error`` (raised by a trace) names a line of one of this model's edits, remove that edit, so the
        next trace runs without it, and return the line; else None."""
        loc = getattr(error, "loc", None)
        graphs = self._edit_graphs
        if loc is None or not graphs:
            return None
        keep = tuple(g for g in graphs if all(n.loc != loc for n in walk_nodes(g.nodes)))
        if len(keep) == len(graphs):
            return None
        self._set_edits(keep)
        return loc

    def _with_edits(self, graph: Graph) -> Graph:
        return graph if self._edits is None else prepend(self._edits, graph)

    # -- paths ---------------------------------------------------------------------------------------------------
    def _path_of(self, module: Any) -> str:
        if isinstance(module, Envoy):
            return module._path
        if isinstance(module, str):
            found = self.get(module)  # raises for unknown paths; knows Llama's real ``model`` submodule
            if isinstance(found, Envoy):
                return found._path
            raise TracingError(f"{module!r} is not a submodule of this model", user_location())
        for name, m in self._module.named_modules():
            if m is module:
                return name
        raise TracingError(f"{type(module).__name__} is not a submodule of this model", user_location())

    def _all_paths(self) -> list[str]:
        return [name for name, _ in self._module.named_modules()]


_SITE_NAMES = ("output", "input", "inputs")


def _warn_site_named_submodules(module: torch.nn.Module) -> None:
    """Warn once per model about a submodule named like a site: ``model.<parent>.output`` is the parent's output."""
    for path, mod in module.named_modules():
        for name, _ in mod.named_children():
            if name in _SITE_NAMES:
                parent = "model" + ("." + path if path else "")
                full = f"{path}.{name}" if path else name
                warnings.warn(
                    f"{parent} has a submodule named {name!r}: `{parent}.{name}` is {parent}'s {name} (a site), not "
                    f"the submodule; reach it with `model.get({full!r})`, or give it another name with "
                    f"`rename={{{full!r}: 'new_name'}}`",
                    stacklevel=4,
                )
                return


def remote_tracer(tracer: Any, blocking: bool, compile: bool | str | None = None) -> Any:
    """Mark a block to run on the intervention service (``remote/client.py``) when it exits. The model must be
    one the service can host: a ``LanguageModel`` made from a hub id or folder (a wrapped module has no name)."""
    if getattr(getattr(tracer.model, "_checkpoint", None), "source", None) is None:
        raise TracingError(
            f"remote execution needs a model the service hosts, named by its id; this "
            f"{type(tracer.model).__name__} wraps a module built here",
            user_location(),
            "load it as `LanguageModel('<hub id or folder the service serves>')`, or drop `remote=True`",
        )
    # compile: what the caller asked for (None: the service's default, compiled)
    tracer._remote = {"blocking": bool(blocking), "compile": compile}
    tracer._with_loc = user_location()
    return tracer


class Editor:
    """The context ``model.edit()`` returns; it yields the edited model."""

    def __init__(self, model: NNsight, inplace: bool):
        self.model = model
        self.inplace = inplace
        self.tracer: Tracer | None = None

    def __enter__(self) -> NNsight:
        target = self.model if self.inplace else copy.copy(self.model)
        self.tracer = Tracer(target, mode="edit")
        self.tracer.__enter__()
        return target

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tracer is not None  # set by __enter__
        return self.tracer.__exit__(exc_type, exc, tb)


def _concat(values: list, what: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise InvokeError(f"{what} is a tensor in some invokes and not in others")
        if first.dim() == 0:
            return first
        return torch.cat(values, dim=0)
    if all(v == first for v in values[1:]):
        return first
    raise InvokeError(f"{what} differs between invokes and is not a tensor, so it cannot be batched")
