"""Tiny real models for tests and docs: transformers architectures from configs, seeded weights.

No network: every model is built from a config with ``torch.manual_seed`` weights. ``tiny_mlp`` is the
walkthrough's two-layer network.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


def tiny_mlp(seed: int = 0, input_size: int = 5, hidden: int = 10, output: int = 2) -> torch.nn.Sequential:
    """The walkthrough's network: ``layer1`` (Linear) then ``layer2`` (Linear), grads off."""
    torch.manual_seed(seed)
    layers: OrderedDict[str, torch.nn.Module] = OrderedDict(
        [("layer1", torch.nn.Linear(input_size, hidden)), ("layer2", torch.nn.Linear(hidden, output))]
    )
    return torch.nn.Sequential(layers).requires_grad_(False)


# a keyword every transformers config takes (``PretrainedConfig``), not in the typed signature of each config class
_EAGER_ATTENTION: dict[str, Any] = {"attn_implementation": "eager"}


def tiny_gpt2(
    seed: int = 0, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 128, init_range: float = 0.02
):
    """A GPT2LMHeadModel with random seeded weights, eval mode, eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=init_range,
        **_EAGER_ATTENTION,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, n_layer: int = 2, hidden: int = 32, vocab_size: int = 128):
    """A LlamaForCausalLM with random seeded weights, eval mode, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **_EAGER_ATTENTION,
    )
    return LlamaForCausalLM(config).eval()


def assert_clean(module: torch.nn.Module) -> None:
    """Fail if any hook, or a ``forward`` replaced on the instance, is left on ``module`` or its submodules (after
    a trace, successful or not). accelerate's own (``from_pretrained(..., device_map=...)``: the ``forward`` its
    ``add_hook_to_module`` sets beside ``_hf_hook``) belongs to the model and is allowed."""
    for name, m in module.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, attr)
            assert not hooks, f"{attr} left on module {name or '<root>'}: {hooks}"
        forward = m.__dict__.get("forward")
        assert forward is None or _accelerate_forward(m, forward), (
            f"a replaced forward left on module {name or '<root>'}"
        )


def _accelerate_forward(module: torch.nn.Module, forward: Any) -> bool:
    """Whether ``forward`` is the one accelerate's ``add_hook_to_module`` set on ``module``: a
    ``functools.partial(accelerate.hooks.new_forward, module)``, with the hook and the old forward beside it."""
    import functools

    return (
        isinstance(forward, functools.partial)
        and getattr(forward.func, "__module__", None) == "accelerate.hooks"
        and forward.args[:1] == (module,)
        and "_hf_hook" in module.__dict__
        and "_old_forward" in module.__dict__
    )


def decoder_blocks(model: Any) -> torch.nn.ModuleList:
    """A tiny GPT-2's or Llama's decoder blocks."""
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def plain_block_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Reference for reading tests: every decoder block's output on ``ids``, in order, taken by plain forward hooks
    (no autograd)."""
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in decoder_blocks(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def plain_patch_logits(
    model: torch.nn.Module, ids: torch.Tensor, layer: int, pos: int, value
) -> torch.Tensor:
    """Reference for patching tests: the last position's logits with decoder block ``layer``'s output at ``pos``
    set to ``value`` by a plain forward hook (no autograd)."""

    def patch(mod, args, output):
        output = output.clone()
        output[:, pos] = value
        return output

    handle = decoder_blocks(model)[layer].register_forward_hook(patch)
    try:
        with torch.no_grad():
            return model(ids).logits[:, -1]
    finally:
        handle.remove()


# -- tiny language models saved to a folder, loaded through the real ``from_pretrained`` path ----------------------

_CORPUS = (
    "The Eiffel Tower is in the city of Paris. Madison Square Garden is located in the city of New York. "
    "The Colosseum is in the city of Rome, and the Brandenburg Gate is in Berlin. "
    "After John and Mary went to the store, John gave a drink to Mary. "
    "When Alice and Bob met at the park, Bob handed the book to Alice. "
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a small model. "
    "Hello, world! The answer is 42; the question is unknown. Vatican is located in the city of Rome. "
    "_ _ _ _ _ _ _ _ _ _"
)
EOS = "<|endoftext|>"
BOS = "<s>"


def tiny_tokenizer(vocab_size: int = 384, bos: bool = False):
    """A byte-level BPE tokenizer trained offline on a fixed corpus (deterministic), as a transformers tokenizer.

    It has no pad token, like GPT-2's and Llama's. ``bos=True`` prepends ``<s>`` to every encoding, like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, BOS] if bos else [EOS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=BOS if bos else EOS,
        unk_token=EOS,
    )


def save_tiny_lm(
    folder: str,
    arch: str = "gpt2",
    seed: int = 0,
    n_layer: int = 2,
    hidden: int = 64,
    init_range: float = 0.15,
) -> str:
    """Build a tiny GPT-2 or Llama causal LM and its tokenizer, ``save_pretrained`` both into ``folder``.

    Load it back the way a user would: ``LanguageModel(folder)`` or
    ``AutoModelForCausalLM.from_pretrained(folder)``. Weights are seeded; ``init_range`` is larger than the
    usual 0.02 so greedy predictions are decisive. No network is needed.

    Args:
        folder: where to write ``config.json``, the weights and the tokenizer files.
        arch: ``"gpt2"`` or ``"llama"``.
    Returns:
        ``folder``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(bos=arch == "llama")
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config: Any
    model: Any
    if arch == "gpt2":
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=hidden,
            n_head=4,
            vocab_size=vocab,
            n_positions=256,
            bos_token_id=eos,
            eos_token_id=eos,
            initializer_range=init_range,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            num_hidden_layers=n_layer,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=256,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=eos,
            initializer_range=init_range,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: use 'gpt2' or 'llama'")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def steered_generate(model, text, n, steer, block, compile=None):
    """The steering program the generation tests compare with :func:`generate_with_hooks`: ``n`` greedy tokens of
    ``text`` with ``steer`` added to ``block``'s last position at every step (``tracer.all()``). Returns the ids,
    and per step the steered last position and the last-token logits."""
    import intervene_compiler as ic

    with model.generate(text, max_new_tokens=n, min_new_tokens=n, do_sample=False, compile=compile) as tracer:
        hidden = ic.list().save()
        logits = ic.list().save()
        with tracer.all():
            model.get(block).output[:, -1] += steer
            hidden.append(model.get(block).output[:, -1])
            logits.append(model.lm_head.output[:, -1])
        out = model.generator.output.save()
    return out.value, hidden.value, logits.value


def generate_with_hooks(
    hf, tok, text, n, steer_at=None, steer=None, block=None, ablate_steps=None, steer_if=None
):
    """Plain greedy ``hf.generate`` of ``text`` (``n`` new tokens) with forward hooks: the reference that tests
    compare generation blocks against.

    At each step (one forward of ``hf``) the hook on ``block`` adds ``steer`` to the last position (at every step,
    or at the steps in ``steer_at``; with ``steer_if``, only when ``steer_if(output)`` holds) and zeroes the output
    at the steps in ``ablate_steps``. Returns the ids, the
    per-step last-position logits and the per-step last-position outputs of ``block``.
    """
    step = {"k": -1}
    logits, hidden = [], []

    def count(m, args, kwargs):
        step["k"] += 1

    def edit(m, a, out):
        k = step["k"]
        if steer is not None and (steer_at is None or k in steer_at) and (steer_if is None or steer_if(out)):
            out = out.clone()
            out[:, -1] += steer
        if ablate_steps is not None and k in ablate_steps:
            out = torch.zeros_like(out)
        hidden.append(out[:, -1])
        return out

    handles = [
        hf.register_forward_pre_hook(count, with_kwargs=True),
        hf.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1])),
    ]
    if block is not None:
        handles.append(hf.get_submodule(block).register_forward_hook(edit))
    try:
        with torch.no_grad():
            ids = hf.generate(
                **tok(text, return_tensors="pt"),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
    finally:
        for h in handles:
            h.remove()
    return ids, logits, hidden


def stop_process(proc: Any, timeout: float = 30.0) -> None:
    """Stop a process a test started (a server): terminate it, and kill it if it has not exited within
    ``timeout`` seconds. Nothing happens to a process that has already exited (or to None)."""
    import subprocess

    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
