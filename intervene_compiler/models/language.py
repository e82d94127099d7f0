"""LanguageModel: any causal LM ``transformers`` can load, with tokenized, padded invokes and ``generate``.

``LanguageModel("path/or/hub-id")`` reads the config and tokenizer and builds the model on the meta device (no
weight memory: printing, ``scan`` and shape reads inside a block work); the first real trace loads the weights
through ``AutoModelForCausalLM.from_pretrained`` (``dispatch=True`` loads at once) and points the envoy tree at the
loaded modules. ``LanguageModel(hf_model, tokenizer=tok)`` wraps a model that is already built.

Inputs: a string, a list of strings, token ids (tensor, list, list of lists) or a tokenizer's
``BatchEncoding``/dict. Every invoke is tokenized on its own and the batch is left-padded to the longest invoke
(pad token, attention mask 0), so ``[:, -1]`` is every prompt's last real token. Position ids are derived from
the attention mask, so a padded prompt computes what it computes alone. An invoke's rows keep their pad positions
(as in nnsight): a saved activation of a shorter prompt has the batch's length, with pads on the left.

``model.generate(...)`` is a tracing block around ``transformers``' ``generate``: each new token is one forward
of the model (one step: ``module.next()``, ``tracer.all()``, ``tracer.iter[...]``), and the generated ids pass
through ``model.generator`` (an identity module), so ``model.generator.output`` is the full sequence.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, InvokeError, SourceLoc, user_location
from ..ir import ModelFacts, SiteKind
from ..runtime import Target, check_positions, check_token_ids
from ..runtime.devices import execution_device, offloaded
from ..tracing import Envoy, NNsight, Tracer
from ..tracing.model import remote_tracer
from .loading import input_device, meta_dtype, offload_as_fakes, running_on_fakes

# keyword arguments of ``tracer.invoke(text, ...)`` that go to the tokenizer; the rest go to the model's forward
TOKENIZER_KWARGS = frozenset(
    {
        "max_length",
        "truncation",
        "padding",
        "add_special_tokens",
        "pad_to_multiple_of",
        "stride",
        "is_split_into_words",
    }
)
# keyword arguments that locate a checkpoint: given to the config, tokenizer and model loaders alike
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")


class WrapperModule(torch.nn.Module):
    """An identity module: ``model.generator`` passes ``generate``'s output through it, making it a site."""

    def forward(self, *args: Any) -> Any:
        return args[0] if len(args) == 1 else args


class Streamer(WrapperModule):
    """``model.generator.streamer``: the streamer ``generate`` is given (unless the caller gives one). Each
    ``put`` is a call, so ``streamer.output`` is what ``generate`` streamed: the prompt's ids at the first call,
    then each step's new token ids (on the CPU, as ``transformers`` streams them). ``generate`` streams a step's
    ids before the step's forward takes them: inside ``tracer.iter[k]`` it is the ids step ``k`` takes (the
    prompt's at step 0, the token step ``k - 1`` chose after it), nnsight's count."""

    runs_ahead_of_step = True  # see backends/eager/steps.py

    def put(self, value: Any) -> Any:
        return self(value)

    def end(self) -> None:
        return None


class Generation(WrapperModule):
    """``model.generator``: ``generate``'s full output passes through it; its ``streamer`` sees each token."""

    def __init__(self) -> None:
        super().__init__()
        self.streamer = Streamer()


@dataclass
class _Checkpoint:
    """Loading state shared by a LanguageModel and its edited copies."""

    source: str | None  # hub id or folder; None for a wrapped module
    load_kwargs: dict = field(default_factory=dict)
    loaded: torch.nn.Module | None = None  # the module with real weights, once dispatched
    generating: dict | None = None  # generate() keyword arguments while a generate block runs
    progress: bool = False  # that block asked for a bar over its new tokens (generate(progress=True))


class LanguageModel(NNsight):
    """A causal language model from ``transformers``, traced like any :class:`NNsight` model.

    Args:
        repo_id_or_path_or_module: a Hugging Face id, a local folder (``save_pretrained`` output), or a built
            ``PreTrainedModel``.
        tokenizer: a tokenizer, or an id/folder to load one from (default: the model's own). A tokenizer
            without a pad token gets its EOS token as pad; padding is on the left.
        device_map: passed to ``from_pretrained`` (``"auto"`` and friends need ``accelerate``).
        dispatch: load the weights now instead of at the first trace.
        torch_dtype: the weights' dtype (``from_pretrained``'s ``dtype``).
        compile: the default of ``trace(compile=...)`` and ``generate(compile=...)`` (see :class:`NNsight`).
        rename: module aliases, as for :class:`NNsight`.
        **hf_kwargs: any other ``from_pretrained`` keyword argument (``attn_implementation``, ``revision``, ...).

    Examples:
        >>> model = LanguageModel("openai-community/gpt2")
        >>> with model.trace("The Eiffel Tower is in the city of"):
        ...     logits = model.lm_head.output[:, -1].save()
    """

    def __init__(
        self,
        repo_id_or_path_or_module: Any,
        tokenizer: Any = None,
        device_map: Any = None,
        dispatch: bool = False,
        torch_dtype: Any = None,
        compile: bool | str = False,
        rename: dict[str, str] | None = None,
        reuse: bool = False,
        **hf_kwargs: Any,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = repo_id_or_path_or_module
        hub = {k: hf_kwargs[k] for k in _HUB_KWARGS if k in hf_kwargs}
        dtype = hf_kwargs.pop("dtype", torch_dtype)
        if isinstance(source, torch.nn.Module):
            checkpoint = _Checkpoint(None)
            module = source
            checkpoint.loaded = module
            if tokenizer is None:
                tokenizer = getattr(getattr(module, "config", None), "name_or_path", None) or None
                if tokenizer is None:
                    raise TypeError(
                        "LanguageModel(module) needs `tokenizer=`: the module names no checkpoint"
                    )
        else:
            source = str(source)
            load_kwargs = dict(hf_kwargs)
            if device_map is not None:
                load_kwargs["device_map"] = device_map
            if dtype is not None:
                load_kwargs["dtype"] = dtype
            checkpoint = _Checkpoint(source, load_kwargs)
            if dispatch:
                module = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
                checkpoint.loaded = module
            else:
                config = AutoConfig.from_pretrained(source, **hub)
                build = {
                    k: hf_kwargs[k] for k in ("attn_implementation", "trust_remote_code") if k in hf_kwargs
                }
                with torch.device("meta"):  # no weight memory until the first trace
                    module = AutoModelForCausalLM.from_config(
                        config, dtype=meta_dtype(dtype, config), **build
                    ).eval()
            tokenizer = source if tokenizer is None else tokenizer
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, **hub)
        _prepare_tokenizer(tokenizer)
        _add_generator(module)
        super().__init__(module, rename=rename, compile=compile, reuse=reuse)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_checkpoint", checkpoint)
        object.__setattr__(self, "_takes_positions", _accepts(module, "position_ids"))

    # -- loading -------------------------------------------------------------------------------------------------
    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (False while the model lives on the meta device)."""
        return self._checkpoint.loaded is not None

    def dispatch(self) -> LanguageModel:
        """Load the real weights now (the first trace does it otherwise). Returns the model."""
        from transformers import AutoModelForCausalLM

        ckpt = self._checkpoint
        if ckpt.loaded is None:
            module = AutoModelForCausalLM.from_pretrained(ckpt.source, **ckpt.load_kwargs)
            _add_generator(module)
            _keep_frozen(self._module, module)
            ckpt.loaded = module
        if self._module is not ckpt.loaded:
            self._point_envoys_at(ckpt.loaded)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs: the device its input embeddings run on (accelerate's execution
        device on a dispatched or offloaded model, whose first weight may be on meta), meta before the weights
        load, the CPU for a model without tensors."""
        device = input_device(self._module)
        return device if device is not None else torch.device("cpu")

    def _point_envoys_at(self, module: torch.nn.Module) -> None:
        """Swap the wrapped module; every envoy built so far now mirrors the same path of ``module``."""
        object.__setattr__(self, "_module", module)
        stack: list[Envoy] = [self]
        while stack:
            envoy = stack.pop()
            children = envoy._children
            if children is None:
                continue
            try:
                for child in children.values():
                    object.__setattr__(child, "_module", module.get_submodule(child._path))
            except AttributeError:  # the loaded tree differs: rebuild this level lazily
                object.__setattr__(envoy, "_children", None)
                object.__setattr__(envoy, "_aliases", None)
                continue
            stack.extend(children.values())

    # -- contexts ------------------------------------------------------------------------------------------------
    def generate(
        self,
        *inputs: Any,
        invoker_args: dict | None = None,
        scan: bool = False,
        validate: bool = False,
        compile: bool | str | None = None,
        remote: bool = False,
        blocking: bool = True,
        **generate_kwargs: Any,
    ) -> Tracer:
        """A tracing block around ``transformers``' ``generate`` (keyword arguments go to ``generate``).

        Inside, ``model.generator.output`` is the generated ids (prompt included), ``module.output`` is the
        module's output at the first step (the prompt) and ``module.next().output`` at the next token;
        ``with tracer.all():`` / ``with tracer.iter[1:3]:`` apply interventions at every step / those steps.
        ``compile=True`` (default: the model's) runs each step's forward with the interventions that apply at
        that step as one compiled program (a static KV cache: one program for the prefill, one for decode);
        blocks it cannot compile run eagerly, with the reason in ``ic.compile_stats()["fallback_reasons"]``.

        Examples:
            >>> with model.generate("Hello", max_new_tokens=3) as tracer:
            ...     with tracer.all():
            ...         model.transformer.h[0].output[:, -1] += steer
            ...     out = model.generator.output.save()
        """
        new = generate_kwargs.get("max_new_tokens")
        if new is not None and (not isinstance(new, int) or isinstance(new, bool) or new < 1):
            raise InputError(
                f"`max_new_tokens={new!r}` asks for no tokens: generate makes at least one",
                user_location(),
                "pass `max_new_tokens=1` or more, or use `model.trace(...)` to run the prompt without generating",
            )
        progress = generate_kwargs.pop("progress", False)
        if progress and remote:
            raise TypeError(
                "generate(progress=True) draws a bar where generate runs, and remote=True runs it on the service; "
                "drop progress=True (the job's status lines are printed: ic.CONFIG.APP.REMOTE_LOGGING)"
            )
        asked = compile
        compile = self._compile if compile is None else compile
        tracer = Generator(
            self,
            inputs,
            generate_kwargs,
            scan=scan,
            validate=validate,
            invoker_args=invoker_args,
            compile=compile,
            progress=bool(progress),
        )
        return remote_tracer(tracer, blocking, asked) if remote else tracer

    # -- inputs --------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        """Tokenize one invoke's input: ``((), {"input_ids", "attention_mask", ...model kwargs}, batch size)``."""
        tok_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in TOKENIZER_KWARGS}
        if not args and "input_ids" in kwargs:
            args = ({k: kwargs.pop(k) for k in list(kwargs) if k in ("input_ids", "attention_mask")},)
        if len(args) != 1:
            raise InvokeError(
                f"a language model invoke takes one input (text, token ids or an encoding), got {len(args)}",
                user_location(),
                "pass a list of prompts as one input: `tracer.invoke(['a', 'b'])`",
            )
        encoded = self._encode(args[0], tok_kwargs, kwargs.pop("attention_mask", None))
        limits = self._token_limits()
        if limits is not None:
            check_token_ids(encoded["input_ids"], limits, user_location())
        batch = encoded["input_ids"].shape[0]
        return (), {**encoded, **kwargs}, batch

    def _encode(self, value: Any, tok_kwargs: dict, mask: Any) -> dict:
        tokenizer = self.tokenizer
        if isinstance(value, str) or _is_list_of(value, str):
            texts = [value] if isinstance(value, str) else list(value)
            enc = tokenizer(texts, return_tensors="pt", **{"padding": True, **tok_kwargs})
            return {k: enc[k] for k in ("input_ids", "attention_mask")}
        if isinstance(value, torch.Tensor):
            ids = value if value.dim() == 2 else value.unsqueeze(0)
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
            return {"input_ids": ids, "attention_mask": mask}
        if _is_list_of(value, int):
            return self._encode(torch.tensor([value]), tok_kwargs, mask)
        if _is_list_of(value, (list, tuple)) and all(_is_list_of(v, int) for v in value):
            enc = tokenizer.pad({"input_ids": [list(v) for v in value]}, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if isinstance(value, Mapping) and "input_ids" in value:
            ids = value["input_ids"]
            if not isinstance(ids, torch.Tensor):  # lists, as ``tokenizer(text)`` returns them
                single = _is_list_of(ids, int)
                enc = tokenizer.pad({k: [v] if single else v for k, v in value.items()}, return_tensors="pt")
                return {k: enc[k] for k in enc}
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
            given = value.get("attention_mask")
            out = {k: v for k, v in value.items() if k not in ("input_ids", "attention_mask")}
            mask = torch.ones_like(ids) if given is None else given.reshape(ids.shape)
            return {"input_ids": ids, "attention_mask": mask, **out}
        raise InvokeError(
            f"cannot make model input from a {type(value).__name__}",
            user_location(),
            "pass a string, a list of strings, token ids (tensor or lists of ints) or a tokenizer's output",
        )

    def _fake_extras(self, acts: dict, kwargs: dict, tracer: Any, mode: Any) -> None:
        """In a generate block the fake forward runs the prompt only: the generated ids (``generator.output``)
        are a fake (batch, prompt + new tokens) tensor."""
        if getattr(tracer, "_generate_kwargs", None) is None or "input_ids" not in kwargs:
            return
        batch, length = kwargs["input_ids"].shape
        new = tracer._step_count()
        if new is None:
            config = self._module.generation_config
            new = config.max_new_tokens or max(0, (config.max_length or length) - length)
        with mode:
            acts[("generator", SiteKind.OUTPUT, 0)] = torch.empty(batch, length + new, dtype=torch.long)

    def _check_batchable(
        self, first: tuple[tuple, dict], new: tuple[tuple, dict], loc: SourceLoc | None
    ) -> None:
        """Token inputs of any lengths batch (they are left-padded); other inputs must match as for any model."""
        strip = ("input_ids", "attention_mask")
        super()._check_batchable(
            (first[0], {k: v for k, v in first[1].items() if k not in strip}),
            (new[0], {k: v for k, v in new[1].items() if k not in strip}),
            loc,
        )
        if ("input_ids" in first[1]) != ("input_ids" in new[1]):
            raise InvokeError("some invokes give token ids and others do not", loc)

    def _batch_inputs(self, prepared: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
        """Left-pad every invoke to the longest one, then concatenate along the batch."""
        if len(prepared) > 1 and all("input_ids" in kw for _, kw in prepared):
            length = max(kw["input_ids"].shape[1] for _, kw in prepared)
            prepared = [(args, self._left_pad(kw, length)) for args, kw in prepared]
        return super()._batch_inputs(prepared)

    def _left_pad(self, kwargs: dict, length: int) -> dict:
        ids = kwargs["input_ids"]
        n, have = ids.shape
        if have == length:
            return kwargs
        out = dict(kwargs)
        for key, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == (n, have):
                fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
                out[key] = torch.cat([v.new_full((n, length - have), fill), v], dim=1)
        return out

    # -- running -------------------------------------------------------------------------------------------------
    def _target(self, fake: bool = False) -> Target:
        """A real run loads the weights first (``dispatch``); inside a generate block the target carries the
        ``generate()`` arguments (and no last position-wise module: ``generate`` reads the logits itself)."""
        if not fake:
            self.dispatch()
        generating = self._checkpoint.generating
        if generating is not None:
            return self._build_target(self._module, None, generating)
        return super()._target(fake)

    def _build_target(self, module: torch.nn.Module, last: str | None, generating=None) -> Target:
        """The base target, except that an output embedding accelerate placed (hooked: its weight may be offloaded
        to meta, or on another device than its input site's value) is not applied by the last-position pass
        from its weight (``facts.unembedding``): the module runs, on the last position only."""
        target = super()._build_target(module, last, generating)
        if target.facts.unembedding is not None and last is not None:
            head = module.get_submodule(last)
            if execution_device(head) is not None or any(p.is_meta for p in head.parameters()):
                target.facts = ModelFacts(last, None)
        return target

    @contextlib.contextmanager
    def _generating(self, generate: dict | None) -> Any:
        """While a run is a generate block: the run calls ``generate`` with these keyword arguments."""
        checkpoint = self._checkpoint
        checkpoint.generating = generate
        try:
            yield
        finally:
            checkpoint.generating = None

    def _last_position_module(self) -> str | None:
        """The output embeddings (``lm_head``): a causal LM applies them last, to each position on its own."""
        if self._checkpoint.generating is not None:
            return None
        return super()._last_position_module()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The HF model's forward (position ids from the attention mask), or ``generate`` in a generate block.
        Inputs go where the input embeddings run (``loading.input_device``); a shape run (fake tensors) of a model
        accelerate offloads runs with fakes in place of the offloaded weights (``loading.offload_as_fakes``)."""
        module = self._module
        kwargs = _to_device(kwargs, module)
        if not torch.compiler.is_compiling() and offloaded(module) and running_on_fakes(kwargs):
            with offload_as_fakes(module, kwargs):
                return self._call(module, args, kwargs)
        return self._call(module, args, kwargs)

    def _call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        generating = self._checkpoint.generating
        if generating is not None:
            options = dict(generating)
            options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            hf: Any = module
            if _streams(options, module):
                options.setdefault("streamer", hf.generator.streamer)
            with _token_bar(options) if self._checkpoint.progress else contextlib.nullcontext():
                return hf.generator(hf.generate(*args, **kwargs, **options))
        mask = kwargs.get("attention_mask")
        if (
            mask is not None
            and self._takes_positions
            and "position_ids" not in kwargs
            and kwargs.get("past_key_values") is None
        ):
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return module(*args, **kwargs)


def _keep_frozen(meta: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Parameters the user froze (``requires_grad_(False)``) on the model while it was still on the meta device
    stay frozen in the loaded one (``from_pretrained`` makes every parameter require grad)."""
    if meta is loaded:
        return
    frozen = {name for name, p in meta.named_parameters() if not p.requires_grad}
    if not frozen:
        return
    for name, p in loaded.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def _token_bar(options: dict) -> Any:
    """``generate(progress=True)``: a tqdm bar over the new tokens, moved by a stopping criterion that never stops
    (it runs once per generated token, after the step's forward), added to ``options``' own criteria."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from ..runtime.progress import progress_bar

    new = options.get("max_new_tokens")
    bar = progress_bar(new if isinstance(new, int) else None, "generate", "token")

    class _Tick(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    options["stopping_criteria"] = StoppingCriteriaList([*(options.get("stopping_criteria") or ()), _Tick()])
    return bar


class Generator(Tracer):
    """The tracing block ``LanguageModel.generate`` opens: the run calls ``generate`` instead of the forward."""

    def __init__(
        self,
        model: LanguageModel,
        inputs: tuple,
        generate_kwargs: dict,
        progress: bool = False,
        **options: Any,
    ):
        # a streamer of the caller's own sees the whole generation (generation is not cut after the last step
        # the interventions need)
        super().__init__(model, inputs, {}, needs_output="streamer" in generate_kwargs, **options)
        self._generate_kwargs = generate_kwargs
        self._progress = progress  # generate(progress=True): a tqdm bar over the new tokens (_call)

    def _run(self) -> None:
        self._check_positions()
        checkpoint = self.model._checkpoint
        checkpoint.generating = self._generate_kwargs
        checkpoint.progress = self._progress
        try:
            super()._run()
        finally:
            checkpoint.generating = None
            checkpoint.progress = False

    def _step_count(self) -> int | None:
        """One step per generated token: ``max_new_tokens`` (None when generate was not told)."""
        new = self._generate_kwargs.get("max_new_tokens")
        return new if isinstance(new, int) else None

    def _check_positions(self) -> None:
        """The longest prompt plus the tokens to generate must fit the model's positions (a learned position
        table has no row past its end: eager raises deep in the model, a compiled kernel aborts)."""
        limits = self.model._token_limits()
        if limits is None or limits[1] is None:
            return
        prompts = [inv.inputs[1] for inv in self._invokers if inv.inputs is not None and inv.inputs[1]]
        lengths = [kw["input_ids"].shape[-1] for kw in prompts if "input_ids" in kw]
        if not lengths:
            return
        longest = max(lengths)
        options = self._generate_kwargs
        more = options.get("max_new_tokens")
        if more is None:
            total = (
                options.get("max_length")
                or getattr(self.model._module.generation_config, "max_length", 0)
                or 0
            )
            more = max(0, int(total) - longest)
        check_positions(longest, limits, user_location(), int(more))


def _prepare_tokenizer(tokenizer: Any) -> None:
    """Left padding, and a pad token (the EOS) for tokenizers that have none (GPT-2's, Llama's)."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _add_generator(module: torch.nn.Module) -> None:
    if not isinstance(getattr(module, "generator", None), Generation):
        # in the model's mode: a new module trains by default, and a training module anywhere turns off reuse
        module.add_module("generator", Generation().train(module.training))


def _streams(options: dict, module: torch.nn.Module) -> bool:
    """Whether ``generate`` takes a streamer with these options (``transformers`` refuses one with beams)."""
    beams = options.get("num_beams")
    if beams is None:
        config = options.get("generation_config") or getattr(module, "generation_config", None)
        beams = getattr(config, "num_beams", 1)
    return (beams or 1) == 1


def _accepts(module: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _is_list_of(value: Any, kind: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, kind) for v in value)


def _to_device(kwargs: dict, module: torch.nn.Module) -> dict:
    """Input tensors on the device the model's input embeddings run on (``loading.input_device``: accelerate's
    execution device on a dispatched or offloaded model, whose first weight may be on meta; on a model built on
    meta: fake inputs, moved to meta)."""
    device = input_device(module)
    if device is None:
        return kwargs
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


__all__ = ["Generation", "Generator", "LanguageModel", "Streamer", "TOKENIZER_KWARGS", "WrapperModule"]
