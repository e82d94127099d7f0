"""The compiled backend's shared machinery: entries, the per-model cache, stats, keys and the compiled call.

Every compiled path (one program per structure in ``run.py``, compiled generation steps in ``generate.py``,
compiled decoder layers in ``layered.py``) keeps its :class:`Entry` objects in the model's :class:`CompileCache`,
keys them with :func:`signature`/:func:`param_signature`, compiles through :func:`backend_for` (which counts
compiles and recompiles in :func:`compile_stats`) and records fallbacks with :func:`record_fallback`. Each key gets
its own copy of the entry function's code object (:func:`fresh_entry`), so keys never share a Dynamo cache or its
recompile limit.
"""

from __future__ import annotations

import re
import time
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import user_location
from ...ir import Op
from ...runtime import StructureNumbers, Target
from ...runtime.devices import forward_slot
from ...runtime.progress import note_compile
from .backward import BackwardSplit
from .dispatcher import Dispatcher
from .program import Program

STATS: dict[str, Any] = {}


def reset_compile_stats() -> None:
    """Zero the counters :func:`compile_stats` reports."""
    STATS.clear()
    STATS.update(
        compiles=0,
        cache_hits=0,
        recompiles=0,
        fallbacks=0,
        fallback_reasons=[],
        compiled_calls=0,
        direct_calls=0,
        repeat_calls=0,
    )


def compile_stats() -> dict[str, Any]:
    """Counters of the compiled backend since the last reset.

    ``compiles``: graphs compiled by Inductor; ``recompiles``: compiles of a key that already had a graph (a
    guard failed); ``cache_hits``: compiled calls that reused a program; ``fallbacks``/``fallback_reasons``:
    structures that run eagerly, and why; ``compiled_calls``: calls that ran compiled; ``direct_calls``: those of
    them that ran Dynamo's compiled code directly, its guards checked by our call path (see ``entry.call``);
    ``repeat_calls``: those that repeated the model's last call and took its entry without looking it up
    (``run.Hot``).
    """
    return {k: (list(v) if isinstance(v, list) else v) for k, v in STATS.items()}


reset_compile_stats()


def count_call(entry: Entry, compiled_before: int) -> None:
    """Count a call that ran compiled: a cache hit when it compiled nothing (``entry`` had ``compiled_before``
    graphs before it)."""
    STATS["compiled_calls"] += 1
    if len(entry.graphs) == compiled_before:
        STATS["cache_hits"] += 1


# Opt-in: compile repeated blocks no program looks inside (transformer layers) as nested compile regions
# (Dispatcher.regions). GPT-2-small, one patch structure: cold compile 15 s instead of 20 s, but a warm new
# process 5.3 s instead of 4.9 s (Dynamo's region bookkeeping), and torch 2.13 has gradient bugs there.
REGIONAL = False


UNSUPPORTED: dict[Op, str] = {}  # ops whose traces always run eagerly, and why (none now)


@dataclass
class Entry:
    """One structure's compiled program (or its fallback reason)."""

    key: Any
    program: Program | None = None
    fn: Any = None
    fallback: str | None = None
    layered: bool = False  # compiled decoder layers under the eager runner (layered.py), not one program
    layouts: dict = field(default_factory=dict)  # layered: a layer call's layout -> its compiled forward
    graphs: list = field(default_factory=list)  # FX graphs our backend received (the spliced program)
    calls: int = 0
    split: BackwardSplit | None = None
    probe_specs: tuple = ()  # (shape, dtype, device) of each activation-gradient probe
    # tracer.cond: node id -> its effective guards (see predication.effective_guards); COND id -> value of each
    # condition on a Python value (fixed for the key); COND id -> its line
    guards: dict = field(default_factory=dict)
    static_conds: dict = field(default_factory=dict)
    cond_locs: dict = field(default_factory=dict)
    # tracer.cache() nodes and saves of them -> entry names in the eager cache's order (CacheEntry dicts on the host)
    cache_ids: dict = field(default_factory=dict)
    # lifted index param -> (size, dim, node id) of the dimension it indexes: checked on the host before each call
    bounds: dict = field(default_factory=dict)
    regional: bool = False  # repeated blocks compile as nested regions (see Dispatcher.regions)
    # recording the schedule raised the user's own error: not kept (the eager run reports it; once fixed, the
    # structure compiles)
    users_error: bool = False
    # (module, forward) set on the instance during each call: the modules the graph skips (run.py)
    skip_forwards: tuple = ()
    # compile="reduce-overhead": None when not asked for, "on" (CUDA graphs replay the program), or why not
    cuda_graphs: str | None = None
    code: Any = None  # the code object compiled (fresh_entry's copy): Dynamo's cache for it is this entry's
    # the direct call (see call): ((Dynamo's guard check, its transformed code as a function), ...) per cache
    # entry of ``code``, newest first; None until a call through ``fn`` has compiled one
    direct: tuple | None = None

    def describe(self) -> list[str]:
        """What ``tracer.explain()`` says about how this entry ran its trace."""
        if self.layered:
            state = f"fell back to eager layers: {self.fallback}" if self.fallback else "compiled"
            parts = [
                "-- backend: compiled, layered: the interventions run by the eager runner, unedited decoder layers"
                f" replayed from earlier traces of this prompt, the others {state} ({len(self.graphs)} graph(s)"
                f" for the layers' forward, {self.calls} call(s) so far)"
            ]
            if self.graphs:
                parts.append("-- decoder layer FX graph:\n" + self.graphs[-1].code.strip())
            return parts
        if self.fallback is not None:
            return [f"-- backend: compiled, fell back to eager: {self.fallback}"]
        parts = [
            f"-- backend: compiled; {len(self.graphs)} graph(s) compiled for this structure, "
            f"{self.calls} call(s) so far"
        ]
        if self.cuda_graphs == "on":
            parts.append(
                "-- CUDA graphs: on (compile='reduce-overhead'; saved values are copied out of them)"
            )
        elif self.cuda_graphs is not None:
            parts.append(f"-- CUDA graphs: not used: {self.cuda_graphs}")
        if self.graphs:
            parts.append("-- spliced FX graph:\n" + self.graphs[-1].code.strip())
        return parts


class CompileCache:
    """Per-model cache of compiled entries, with the model's dispatcher hooks."""

    def __init__(self, size: int = 64):
        self.entries: OrderedDict[Any, Entry] = OrderedDict()
        self.size = size
        self.dispatcher: Dispatcher | None = None
        self.last: Entry | None = None
        self.host_only: dict[
            Any, frozenset[int]
        ] = {}  # (structure, tensor params) -> backward.host_only_params
        # the model's first parameter (False: none), whose dtype a floating-point input must have (run.py)
        self.first_weight: Any = None
        self.warned_cuda_graphs = False  # compile="reduce-overhead" off a CUDA device: warned once per model
        self.plans: dict[Any, Any] = {}  # run.py's Plan per graph nodes (runtime.nodes_memo)
        self.structures = StructureNumbers()  # a lowered structure's number in keys (run.py)
        self.hot: Any = None  # run.py's Hot: the last plain call, which a repeat of it skips finding again

    def lookup(self, key: Any, build) -> Entry:
        """The entry for ``key``, made by ``build()`` on a miss (evicting the oldest past ``size``); it becomes
        ``last`` (what ``tracer.explain()`` reports)."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = build()
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        elif entry is not self.last:  # (the last entry is the newest already: a repeat moves nothing)
            self.entries.move_to_end(key)
        self.last = entry
        return entry

    def forget(self, key: Any) -> None:
        """Drop ``key``'s entry: its next call builds (and compiles) it again."""
        self.entries.pop(key, None)
        self.hot = None

    def clear(self) -> None:
        self.first_weight = None
        self.entries.clear()
        self.host_only.clear()
        self.plans.clear()
        self.structures.clear()
        self.last = None
        self.hot = None
        if self.dispatcher is not None:
            self.dispatcher.remove()
            self.dispatcher = None


def cache_of(target: Target) -> CompileCache:
    """The model's compile cache (``target.caches.compiled``), made on first use."""
    cache = target.caches.compiled
    if cache is None:
        cache = target.caches.compiled = CompileCache()
    return cache


_FIRST_TENSOR: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # module -> its first param/buffer, or None
_CPU = torch.device("cpu")


def model_device(module: torch.nn.Module) -> torch.device:
    """Where the model computes (its first parameter's or buffer's device; the CPU for a model with neither):
    lifted indices, family gates and probes are made there. The tensor is found once per model (walking every
    module for it cost more than the rest of a small compiled call); ``module.to(device)`` moves that same
    Parameter object, so its ``.device`` stays current."""
    first = first_tensor(module)
    return _CPU if first is None else first.device


def first_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    """The tensor whose device :func:`model_device` reports (None: the model has no parameter or buffer)."""
    try:
        return _FIRST_TENSOR[module]
    except KeyError:
        first: torch.Tensor | None = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        _FIRST_TENSOR[module] = first
        return first


def call(
    cache: CompileCache, entry: Entry, params: tuple, args: tuple, kwargs: dict, direct_only: bool = False
):
    """Run ``entry``'s compiled function with the model's dispatcher serving its program (installing the hooks
    the program needs); returns what ``Program.run`` returns.

    A repeated call goes straight to Dynamo's compiled code (:func:`_direct`) when Dynamo's own guards for it
    pass, checked as Dynamo checks them; anything else (the first call, a failed guard, a recompile) goes through
    ``torch.compile``'s wrapper, as before. ``direct_only`` (a :func:`plain_call` entry): :data:`MISSED` instead
    of the wrapper."""
    dispatcher, program = cache.dispatcher, entry.program
    if dispatcher is None or program is None:
        raise RuntimeError("a compiled call of an entry that was never built (a bug in intervene_compiler)")
    if not direct_only:  # (a direct-only call's hooks are there: Dynamo's guards on the hook dicts check it)
        dispatcher.ensure(program)
    dispatcher.program = program
    try:
        if direct_only:
            return _run(entry, params, args, kwargs, (), direct_only=True)
        dispatcher.keep_last()  # (the wrapper's call, where Dynamo checks its guards and may trace)
        regions = dispatcher.usable_regions() if REGIONAL and entry.regional else ()
        try:
            return _call_with(entry, params, args, kwargs, regions)
        except Exception:
            if not regions:
                raise
            # a model whose blocks Dynamo cannot capture as regions: this key compiles them inline
            entry.regional = False
            return _call_with(entry, params, args, kwargs, ())
    finally:
        dispatcher.program = None


MISSED = object()  # call(direct_only=True): Dynamo's guards for the entry's code failed; nothing ran


def plain_call(entry: Entry) -> bool:
    """Whether a call of ``entry`` sets nothing up around its compiled code (regions, skipped modules' forwards,
    CUDA graphs): its direct call is all of it."""
    return not entry.skip_forwards and entry.cuda_graphs != "on" and not (REGIONAL and entry.regional)


def _call_with(entry: Entry, params: tuple, args: tuple, kwargs: dict, regions: tuple):
    graphs = entry.cuda_graphs == "on"
    if not regions and not entry.skip_forwards and not graphs:  # nothing to set up around the call
        return _run(entry, params, args, kwargs, regions)
    for member, fn, _ in regions:
        member.__dict__["forward"] = fn
    # (module, slot, what was there): on a module accelerate hooked the forward goes inside accelerate's
    swapped = [(m, slot, m.__dict__.get(slot)) for m, _ in entry.skip_forwards for slot in (forward_slot(m),)]
    for (module, slot, _), (_, fn) in zip(swapped, entry.skip_forwards):
        module.__dict__[slot] = fn
    try:
        if graphs:  # a new step of the CUDA graph tree: the last call's outputs were copied out (below)
            torch.compiler.cudagraph_mark_step_begin()
        result = _run(entry, params, args, kwargs, regions)
        return copy_out(result) if graphs else result
    finally:
        for member, _, _ in regions:
            member.__dict__.pop("forward", None)
        for (module, slot, before), (_, fn) in zip(swapped, entry.skip_forwards):
            if module.__dict__.get(slot) is fn:
                if before is None:
                    del module.__dict__[slot]
                else:
                    module.__dict__[slot] = before


def _run(entry: Entry, params: tuple, args: tuple, kwargs: dict, regions: tuple, direct_only: bool = False):
    """Run ``entry``'s compiled code: directly when Dynamo's guards for it pass (:func:`_direct`), else through
    ``torch.compile``'s wrapper (which compiles on a miss), keeping what the direct call needs for next time;
    ``direct_only``: :data:`MISSED` instead of the wrapper."""
    code = None if regions else _direct(entry, params, args, kwargs)
    if code is not None:
        STATS["direct_calls"] += 1
        return code(entry.program, params, args, kwargs)
    if direct_only:
        return MISSED
    compiled, start = len(entry.graphs), time.perf_counter()
    with DynamoSettings():
        result = entry.fn(entry.program, params, args, kwargs)
    if len(entry.graphs) > compiled:
        note_compile(_what(entry), time.perf_counter() - start)
    entry.direct = _direct_codes(entry) if not regions else None
    return result


class DynamoSettings:
    """The Dynamo settings our compiles run under, set for a call through ``torch.compile``'s wrapper (where Dynamo
    may trace) and restored after (``config.patch()`` builds a class per call):

    - hook guards on: a compiled graph never outlives a hook change;
    - no profiler region around the code Dynamo runs before the graph (``record_runtime_overhead``): it puts two
      calls, one through a Dynamo-disabled wrapper, into every call of the code it generates, about 1 us of a
      direct call on the tiny MLP. ``torch.profiler`` still shows the graph and its kernels."""

    __slots__ = ("saved",)

    def __enter__(self) -> None:
        config = torch._dynamo.config
        self.saved = (config.skip_nnmodule_hook_guards, config.record_runtime_overhead)
        config.skip_nnmodule_hook_guards = False
        config.record_runtime_overhead = False

    def __exit__(self, *exc: object) -> None:
        config = torch._dynamo.config
        config.skip_nnmodule_hook_guards, config.record_runtime_overhead = self.saved


def _what(entry: Entry) -> str:
    """What ``entry`` compiled, for the compile note."""
    program = entry.program
    model = type(program.target.module).__name__ if program is not None else "the model"
    if isinstance(entry.key, tuple) and entry.key and entry.key[0] == "generate-step":
        return f"a generation step of {model} with its interventions"
    return f"{model} and the trace's interventions as one program"


def _entry(program, params, args, kwargs):
    return program.run(params, args, kwargs)


def fresh_entry():
    """A copy of ``_entry`` with its own code object: its own Dynamo cache and recompile budget."""
    return _as_entry(_entry.__code__.replace())


def _as_entry(code: types.CodeType) -> types.FunctionType:
    """``code`` (a copy of ``_entry``'s, or the code Dynamo made of one) as a function in ``_entry``'s module."""
    return types.FunctionType(code, _entry.__globals__, "_entry", None, None)


def compile_entry(entry: Entry) -> None:
    """Give ``entry`` its compiled function: a fresh copy of ``_entry`` under ``torch.compile`` (one graph,
    static shapes: the key already holds them, and automatic-dynamic state is shared by name across copies),
    through :func:`backend_for`, keeping only the guards that can fail (:func:`_guard_filter`)."""
    fn = fresh_entry()
    entry.code = fn.__code__
    entry.direct = None
    entry.fn = torch.compile(
        fn,
        fullgraph=True,
        dynamic=False,
        backend=backend_for(entry),
        options={"guard_filter_fn": _guard_filter},
    )


# -- the direct call ---------------------------------------------------------------------------------------------
# ``torch.compile``'s wrapper costs more per call than a small compiled program itself (about 18 us of Python on
# the tiny MLP, against 6 us for the program): a repeated call runs the code Dynamo made for the entry directly,
# after checking the guards Dynamo keeps for it with Dynamo's own guard manager, exactly as its frame evaluation
# would before running that code. Nothing is skipped that Dynamo checks; a failed guard (a module's mode, a new
# hook, a weight's dtype, global state) takes the wrapper, which recompiles as it always did.
def _guard_filter(entries: list) -> list[bool]:
    """Keep every guard but those on our own objects, which never change once an entry is built:

    - the ``Program``'s (``program.events``, ``program.graph``, its class's methods, the aliasing of the program
      that the model's hooks reach through their dispatcher): a program is built once for its entry's key (the
      structure, shapes, dtypes, grad mode) and never changed after; its per-call state is reset by each call,
      and ``call`` sets the dispatcher's program before each call;
    - the identity of this package's module-level objects (its enums, classes, functions, modules), which our
      code never rebinds (a type, length or value guard on one of our globals stays: a flag, a list that grows).

    Guards reached through ``program.target`` (the model: its modules, hooks, weights, forward) all stay, as do
    those on the arguments, torch's globals and the global state (grad mode, dtype, ...)."""
    return [_keeps(e.name, e.guard_type) for e in entries]


_OURS = re.compile(r"\bprogram\b(?!\.target\b)")
_IDENTITY = frozenset(
    {
        "ID_MATCH",
        "CLASS_MATCH",
        "MODULE_MATCH",
        "CLOSURE_MATCH",
        "DUPLICATE_INPUT",
    }
)


def _keeps(name: str, kind: str) -> bool:
    """Whether the guard ``kind`` on source ``name`` stays (see :func:`_guard_filter`)."""
    if _OURS.search(name):
        return False
    if kind == "DUPLICATE_INPUT" and name.endswith(".dispatcher.program"):
        return False
    return not (kind in _IDENTITY and "__import_intervene_compiler" in name)


# Dynamo's reader of a code object's cache entries and the ids of the code objects it has compiled since its last
# reset, imported by the first _direct_codes (importing torch._dynamo at our import would patch torch.manual_seed
# and friends: `import intervene_compiler` patches nothing)
_cache_entries: Any = None
_compiled_codes: Any = None
_eval_frame: Any = None  # torch._dynamo.eval_frame, whose _stance is torch.compiler.set_stance's
_is_compiling = torch.compiler.is_compiling


def _direct_codes(entry: Entry) -> tuple | None:
    """``((guard check, code), ...)`` for the cache entries Dynamo holds for ``entry``'s code, newest first (the
    order its frame evaluation tries them), or None when they cannot be read (then every call takes the wrapper)."""
    global _cache_entries, _compiled_codes, _eval_frame
    try:
        if _cache_entries is None:
            from torch._dynamo import eval_frame
            from torch._dynamo.convert_frame import input_codes
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            _eval_frame = eval_frame
            _compiled_codes = input_codes.seen_ids
            _cache_entries = _debug_get_cache_entry_list
        found = _cache_entries(entry.code)
        # (the guard manager's root: its ``check`` is the wrapper's, one Python call less)
        return tuple((ce.guard_manager.root.check, _as_entry(ce.code)) for ce in found) or None
    except Exception:  # another torch's internals: the wrapper serves every call
        return None


def _direct(entry: Entry, params: tuple, args: tuple, kwargs: dict) -> Any:
    """The compiled code whose guards pass for this call (None: take the wrapper). Not while something else is
    being compiled or exported, nor under a non-default ``torch.compiler.set_stance``."""
    direct = entry.direct  # (None: never read)
    if direct is None or _is_compiling() or _eval_frame._stance.stance != "default":  # noqa: SLF001 - no public getter
        return None
    # torch._dynamo.reset() dropped the entry's compiled code (it forgets every code object it compiled): the
    # wrapper compiles it again, as plain torch.compile would
    if id(entry.code) not in _compiled_codes:
        return None
    frame = {"program": entry.program, "params": params, "args": args, "kwargs": kwargs}
    for check, code in direct:
        if check(frame):
            return code
    return None


_PREWARM: list = []  # the thread started by prewarm_inductor, once per process


def prewarm_inductor() -> None:
    """Start Inductor's per-process CPU ISA probe in a thread, so it overlaps Dynamo's tracing.

    ``pick_vec_isa`` dry-compiles a test program per ISA and ``dlopen``s it in a child Python (about 1.2 s per
    process, even with a warm on-disk cache); it waits on subprocesses, so the thread does not hold the GIL.
    The modules it imports are imported here first, and the backend joins the thread before compiling.
    """
    if _PREWARM:
        return
    import threading

    try:
        from torch._inductor import codecache, cpp_builder  # noqa: F401
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except Exception:
        return

    def probe():
        try:
            pick_vec_isa()
        except Exception:  # Inductor probes again (and reports) when it compiles
            pass

    thread = threading.Thread(target=probe, name="intervene-inductor-prewarm", daemon=True)
    _PREWARM.append(thread)
    thread.start()


def _join_prewarm() -> None:
    for thread in _PREWARM:
        thread.join()


def backend_for(entry: Entry):
    """The ``torch.compile`` backend of ``entry``: counts compiles and recompiles, keeps each FX graph (explain),
    then compiles with Inductor (with its CUDA graph trees when ``entry.cuda_graphs`` is on)."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        _join_prewarm()
        if entry.graphs:
            STATS["recompiles"] += 1
        STATS["compiles"] += 1
        entry.graphs.append(gm)
        if entry.cuda_graphs == "on":
            return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})
        return compile_fx(gm, example_inputs)

    return backend


# -- CUDA graphs (compile="reduce-overhead") ---------------------------------------------------------------------
def cuda_graphs_state(cache: CompileCache, asked: bool, device: torch.device) -> str | None:
    """What an entry built now does about CUDA graphs: None (not asked for), "on", or why they are not used. On a
    device without them the program compiles as ``compile=True`` would, and the first such entry of a model says
    so in a warning (``explain()`` says so for every one)."""
    if not asked:
        return None
    if device.type == "cuda":
        return "on"
    why = (
        f"the model is on {device.type}, and CUDA graphs need a CUDA device: compile='reduce-overhead' runs as "
        "compile=True here"
    )
    if not cache.warned_cuda_graphs:
        cache.warned_cuda_graphs = True
        loc = user_location()  # the user's trace, not this line
        if loc is None:
            warnings.warn(why, UserWarning, stacklevel=2)
        else:
            warnings.warn_explicit(why, UserWarning, loc.filename, loc.lineno)
    return why


def copy_out(value: Any) -> Any:
    """``value`` with its tensors copied out of the CUDA graph's static output buffers, which the next replay
    overwrites: tensors in tuples, lists, dicts and model outputs (``ModelOutput``). Other objects (a KV cache,
    whose tensors are the model's static buffers the next step writes into) stay as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    t = type(value)
    if t is tuple or t is list:
        return t(copy_out(v) for v in value)
    if t is dict:
        return {k: copy_out(v) for k, v in value.items()}
    if isinstance(value, dict) and hasattr(value, "to_tuple"):  # transformers' ModelOutput: copied in place
        for k in list(value.keys()):
            value[k] = copy_out(value[k])
        return value
    return value


def record_fallback(entry: Entry | None, reason: str, prefix: str = "") -> None:
    """Count a fallback and keep its reason (``prefix`` + reason in ``compile_stats``); ``entry`` runs eagerly."""
    if entry is not None:
        entry.fallback = reason
    STATS["fallbacks"] += 1
    STATS["fallback_reasons"].append(prefix + reason)


def failure_reason(e: BaseException) -> str:
    """One line for a compile failure: our own error when Dynamo wraps one raised in the program it traced."""
    while isinstance(e, (torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed)):
        cause = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
        if not isinstance(cause, Exception):
            break
        e = cause
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def signature(value: Any) -> Any:
    """A hashable key of a call argument: tensors by shape, dtype, device and grad; containers walked; a KV cache
    by its layout; other hashable values as themselves; anything else by identity."""
    if isinstance(value, torch.Tensor):  # (a torch.Size is a tuple: equal to and hashed as one)
        return ("T", value.shape, value.dtype, value.device, value.requires_grad)
    t = type(value)
    if t is tuple or t is list:
        return (t.__name__, *[signature(v) for v in value])
    if t is dict:
        return ("{", *[(k, signature(v)) for k, v in value.items()]) if value else _NO_ITEMS
    layers = getattr(value, "layers", None)
    if isinstance(layers, list) and hasattr(value, "get_seq_length"):  # a KV cache: by layout, not identity
        return (t.__qualname__, tuple(_kv_layer_signature(layer) for layer in layers))
    try:
        hash(value)
    except TypeError:
        return (t.__qualname__, id(value))
    return value


_NO_ITEMS = ("{",)  # an empty dict's signature (the usual kwargs)


def _kv_layer_signature(layer: Any) -> tuple:
    """A KV cache layer's type and tensors' signatures; Dynamo's own guards check the rest of the object."""
    tensors = tuple(
        signature(v) for k, v in sorted(vars(layer).items()) if isinstance(v, torch.Tensor) and k != "device"
    )
    return (type(layer).__qualname__, getattr(layer, "is_initialized", None), tensors)


def param_signature(params: tuple, host_only: frozenset[int] = frozenset()) -> tuple:
    """Tensors by shape/dtype; other objects by identity (the graph may bake them in), except containers only
    host effects touch (they never enter the graph, see ``split_backward``), which key by type."""
    return tuple(
        signature(p)
        if isinstance(p, torch.Tensor)
        else (type(p).__qualname__,)
        if i in host_only
        else (type(p).__qualname__, id(p))
        for i, p in enumerate(params)
    )


__all__ = [
    "MISSED",
    "REGIONAL",
    "STATS",
    "UNSUPPORTED",
    "backend_for",
    "cache_of",
    "call",
    "compile_entry",
    "compile_stats",
    "CompileCache",
    "copy_out",
    "DynamoSettings",
    "count_call",
    "cuda_graphs_state",
    "Entry",
    "failure_reason",
    "first_tensor",
    "fresh_entry",
    "model_device",
    "param_signature",
    "plain_call",
    "prewarm_inductor",
    "record_fallback",
    "reset_compile_stats",
    "signature",
]
