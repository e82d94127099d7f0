"""Real models as users load them (issue 18): ``device_map`` / offload through accelerate, dtypes, hub ids.

The offloaded models split their layers between the CPU and disk offload (accelerate keeps a disk layer's weights
on the meta device between calls, and its hooks load them for each call), with the input embeddings and the
unembedding on disk, so the model's first weight is on meta. Every intervention is checked against plain
``transformers`` with forward hooks on a reference loaded with the same ``device_map``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import intervene_compiler as ic
from intervene_compiler.testing import assert_clean, generate_with_hooks

ARCHS = ("gpt2", "llama")
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
NORM = {"gpt2": "transformer.ln_f", "llama": "model.norm"}
# two decoder layers (the session's tiny checkpoints): layer 0 in memory, layer 1 offloaded to disk, and the
# embeddings and unembedding on disk (the model's first weight is on meta)
DEVICE_MAPS = {
    "gpt2": {
        "transformer.wte": "disk",
        "transformer.wpe": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "disk",
    },
    "llama": {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    },
}
PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Hello, world! The answer"


def hooked(hf, tok, text, hooks=(), grad=False):
    """The reference's logits of ``text`` with ``(module path, forward hook)`` hooks."""
    handles = [hf.get_submodule(p).register_forward_hook(h) for p, h in hooks]
    try:
        with torch.set_grad_enabled(grad):
            return hf(**tok(text, return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()


def captured(hf, tok, text, path):
    """``path``'s output when the reference runs ``text``."""
    box = {}

    def keep(m, a, out):
        box["out"] = out

    hooked(hf, tok, text, [(path, keep)])
    return box["out"]


def edit_last(value):
    """A forward hook writing ``value`` at the last position of the module's output."""

    def hook(m, a, out):
        out = out.clone()
        out[:, -1] = value
        return out

    return hook


def accelerate_forwards(module):
    """The modules accelerate hooked, and the forward it set on each."""
    return {n: m.__dict__["forward"] for n, m in module.named_modules() if "_hf_hook" in m.__dict__}


def assert_only_accelerate(module, before):
    """No hook or forward of ours left; accelerate's own hooks and forwards exactly as they were."""
    assert_clean(module)
    assert accelerate_forwards(module) == before


@pytest.fixture(scope="module")
def offloaded(lm_dirs, tmp_path_factory):
    """arch -> (LanguageModel, plain reference, tokenizer, accelerate's forwards): both models loaded with the
    same cpu + disk device_map, each with its own offload folder; the LanguageModel loads at its first trace."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"offload_{arch}")
        model = ic.LanguageModel(
            lm_dirs[arch], device_map=DEVICE_MAPS[arch], offload_folder=str(root / "ours")
        )
        hf = AutoModelForCausalLM.from_pretrained(
            lm_dirs[arch], device_map=DEVICE_MAPS[arch], offload_folder=str(root / "reference")
        )
        out[arch] = [model, hf, AutoTokenizer.from_pretrained(lm_dirs[arch]), None]
    return out


def setup(offloaded, arch):
    """The arch's offloaded model (loaded now if no test traced it yet), its reference and tokenizer, and the
    forwards accelerate set on the model when it loaded."""
    entry = offloaded[arch]
    model = entry[0].dispatch()
    if entry[3] is None:
        entry[3] = accelerate_forwards(model._module)
        assert set(entry[3]) == set(accelerate_forwards(entry[1]))  # hooked as the reference is
    return model, entry[1], entry[2], entry[3]


# -- offloaded models ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_model_loads_and_reads(arch, offloaded):
    model, hf, tok, _ = offloaded[arch]
    blocks = model.get(BLOCKS[arch])  # an envoy made before the weights load
    if not model.dispatched:  # lazily: the meta model until the first trace, as without a device_map
        assert all(p.is_meta for p in model._module.parameters())
        with model.scan(PROMPT):
            shape = blocks[1].output.shape
        assert not model.dispatched and shape[-1] == 64
    with model.trace(PROMPT):  # was: NotImplementedError: Cannot copy out of meta tensor; no data!
        h0 = blocks[0].output.save()
        h1 = blocks[1].output.save()
        logits = model.lm_head.output.save()
    module = model._module
    assert module.hf_device_map == DEVICE_MAPS[arch]
    assert next(module.parameters()).is_meta  # the embeddings are offloaded
    assert any(not p.is_meta for p in module.parameters())
    assert model.device == torch.device("cpu")  # where the embeddings run, not the first weight's meta
    assert_close(logits, hooked(hf, tok, PROMPT))
    assert_close(h0, captured(hf, tok, PROMPT, f"{BLOCKS[arch]}.0"))
    assert_close(h1, captured(hf, tok, PROMPT, f"{BLOCKS[arch]}.1"))
    assert h1.device.type == "cpu" and logits.dtype == torch.float32
    assert_only_accelerate(module, setup(offloaded, arch)[3])


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_sets_and_inplace_edits(arch, offloaded):
    model, hf, tok, forwards = setup(offloaded, arch)
    blocks = BLOCKS[arch]
    torch.manual_seed(0)
    steer = torch.randn(64)
    for layer in (0, 1):  # in memory, offloaded to disk
        mlp = f"{blocks}.{layer}.mlp"
        with model.trace(PROMPT):  # a whole-value set
            model.get(mlp).output = model.get(mlp).output * 0.5
            logits = model.lm_head.output.save()
        assert_close(logits, hooked(hf, tok, PROMPT, [(mlp, lambda m, a, out: out * 0.5)]))

        with model.trace(PROMPT):  # in-place setitem and +=, a float32 tensor of the user's
            model.get(f"{blocks}.{layer}").output[:, 2] = 0
            model.get(f"{blocks}.{layer}").output[:, -1] += steer
            logits = model.lm_head.output[:, -1].save()

        def edit(m, a, out):
            out = out.clone()
            out[:, 2] = 0
            out[:, -1] += steer
            return out

        assert_close(logits, hooked(hf, tok, PROMPT, [(f"{blocks}.{layer}", edit)])[:, -1])
    assert_only_accelerate(model._module, forwards)


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_cross_invoke_patching(arch, offloaded):
    model, hf, tok, forwards = setup(offloaded, arch)
    blocks = BLOCKS[arch]
    with model.trace() as tracer:  # prompts of different lengths: left-padded into one batch
        with tracer.invoke(PROMPT):
            clean = model.get(f"{blocks}.0").output[:, -1]
        with tracer.invoke(OTHER):
            model.get(f"{blocks}.1").output[:, -1] = clean
            patched = model.lm_head.output[:, -1].save()
    source = captured(hf, tok, PROMPT, f"{blocks}.0")[:, -1]
    want = hooked(hf, tok, OTHER, [(f"{blocks}.1", edit_last(source))])[:, -1]
    assert_close(patched, want)

    with model.trace() as tracer:  # identical one-row invokes: the shared-prefix path
        rows = []
        for layer in (0, 1):
            with tracer.invoke(PROMPT):
                model.get(f"{blocks}.{layer}").output[:, -1] = 0
                rows.append(model.lm_head.output[:, -1].save())
    for layer, row in enumerate(rows):
        assert_close(row, hooked(hf, tok, PROMPT, [(f"{blocks}.{layer}", edit_last(0.0))])[:, -1])
    assert_only_accelerate(model._module, forwards)


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_token_logits_and_logit_lens(arch, offloaded):
    """``logits[:, -1, a] - logits[:, -1, b]`` (normally two rows of the unembedding's weight, which is on meta
    here: the offloaded unembedding runs instead, on the last position) and an ad hoc call of offloaded modules."""
    model, hf, tok, forwards = setup(offloaded, arch)
    with model.trace(PROMPT):
        diff = (model.lm_head.output[:, -1, 5] - model.lm_head.output[:, -1, 7]).save()
        lens = model.lm_head(model.get(NORM[arch])(model.get(f"{BLOCKS[arch]}.0").output)).save()
    logits = hooked(hf, tok, PROMPT)
    assert_close(diff, logits[:, -1, 5] - logits[:, -1, 7])
    with torch.no_grad():
        h0 = captured(hf, tok, PROMPT, f"{BLOCKS[arch]}.0")
        assert_close(lens, hf.lm_head(hf.get_submodule(NORM[arch])(h0)))
    assert_only_accelerate(model._module, forwards)


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_gradients(arch, offloaded):
    model, hf, tok, forwards = setup(offloaded, arch)
    block = f"{BLOCKS[arch]}.1"  # offloaded
    with model.trace(PROMPT):
        h = model.get(block).output
        grad = h.grad.save()
        model.lm_head.output[:, -1].logsumexp(-1).sum().backward()
    box = {}

    def keep(m, a, out):
        out.retain_grad()
        box["out"] = out

    hooked(hf, tok, PROMPT, [(block, keep)], grad=True)[:, -1].logsumexp(-1).sum().backward()
    assert_close(grad, box["out"].grad)
    assert_only_accelerate(model._module, forwards)


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_generation(arch, offloaded, steer):
    model, hf, tok, forwards = setup(offloaded, arch)
    block = f"{BLOCKS[arch]}.1"
    with model.generate(PROMPT, max_new_tokens=4, min_new_tokens=4, do_sample=False) as tracer:
        logits = ic.list().save()
        with tracer.all():
            model.get(block).output[:, -1] += steer
            logits.append(model.lm_head.output[:, -1])
        out = model.generator.output.save()
    ids, want, _ = generate_with_hooks(hf, tok, PROMPT, 4, steer=steer, block=block)
    assert torch.equal(out, ids)
    assert len(logits) == 4
    for got, ref in zip(logits, want):
        assert_close(got, ref)
    assert_only_accelerate(model._module, forwards)


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_session(arch, offloaded):
    model, hf, tok, forwards = setup(offloaded, arch)
    blocks = BLOCKS[arch]
    with model.session():
        with model.trace(PROMPT):
            clean = model.get(f"{blocks}.1").output[:, -1]
        with model.trace(OTHER):
            model.get(f"{blocks}.1").output[:, -1] = clean
            patched = model.lm_head.output[:, -1].save()
    source = captured(hf, tok, PROMPT, f"{blocks}.1")[:, -1]
    assert_close(patched, hooked(hf, tok, OTHER, [(f"{blocks}.1", edit_last(source))])[:, -1])
    assert_only_accelerate(model._module, forwards)


def test_offloaded_shapes_skip_and_source(offloaded):
    """Fake-tensor shapes of an offloaded model; ``.skip()`` and ``.source`` on accelerate-hooked modules run
    inside accelerate's forward (the offloaded weights load) and leave its forward in place."""
    model, hf, tok, forwards = setup(offloaded, "gpt2")
    with model.scan(PROMPT):
        shape = model.transformer.h[1].output.shape
    n = len(tok(PROMPT)["input_ids"])
    assert tuple(shape) == (1, n, 64)
    with model.trace(PROMPT):
        assert tuple(model.lm_head.output.shape) == (1, n, len(tok))
        model.transformer.h[1].skip(model.transformer.h[0].output)
        linear = model.lm_head.source.F_linear_0.output.save()  # the unembedding's weight is offloaded
        logits = model.lm_head.output.save()
    assert_only_accelerate(model._module, forwards)
    h0 = captured(hf, tok, PROMPT, "transformer.h.0")
    want = hooked(hf, tok, PROMPT, [("transformer.h.1", lambda m, a, out: h0)])
    assert_close(logits, want)
    assert_close(linear, want)


def test_auto_device_map_with_cpu_budget(lm_dirs, tmp_path):
    """``device_map="auto"`` with a CPU budget: accelerate keeps what fits in memory and offloads the rest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"device_map": "auto", "max_memory": {"cpu": "400KB"}}
    model = ic.LanguageModel(lm_dirs["llama"], offload_folder=str(tmp_path / "a"), dispatch=True, **kwargs)
    placed = model._module.hf_device_map
    assert "cpu" in placed.values() and "disk" in placed.values()
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs["llama"], offload_folder=str(tmp_path / "b"), **kwargs)
    assert hf.hf_device_map == placed
    tok = AutoTokenizer.from_pretrained(lm_dirs["llama"])
    with model.trace(PROMPT):
        model.model.layers[1].output[:, -1] = 0
        logits = model.lm_head.output.save()
    assert_close(logits, hooked(hf, tok, PROMPT, [("model.layers.1", edit_last(0.0))]))
    assert_clean(model._module)


@pytest.mark.compiled
def test_offloaded_compile_falls_back_with_reason(offloaded, steer):
    model, hf, tok, forwards = setup(offloaded, "gpt2")
    before = ic.compile_stats()["fallbacks"]
    with model.trace(PROMPT, compile=True):
        model.transformer.h[1].output[:, -1] += steer
        logits = model.lm_head.output[:, -1].save()
    with model.generate(PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False, compile=True) as tracer:
        with tracer.all():
            model.transformer.h[1].output[:, -1] += steer
        out = model.generator.output.save()
    stats = ic.compile_stats()
    assert stats["fallbacks"] == before + 2
    assert all("offloads" in r for r in stats["fallback_reasons"][-2:])

    def add(m, a, out):
        out = out.clone()
        out[:, -1] += steer
        return out

    assert_close(logits, hooked(hf, tok, PROMPT, [("transformer.h.1", add)])[:, -1])
    ids, _, _ = generate_with_hooks(hf, tok, PROMPT, 3, steer=steer, block="transformer.h.1")
    assert torch.equal(out, ids)
    assert_only_accelerate(model._module, forwards)


# -- loading options ---------------------------------------------------------------------------------------------
def test_device_map_auto(lm_dirs, hf_models):
    hf, tok = hf_models["gpt2"]
    for dispatch in (True, False):
        model = ic.LanguageModel(lm_dirs["gpt2"], device_map="auto", dispatch=dispatch)
        assert model.dispatched is dispatch
        with model.trace(PROMPT):
            logits = model.lm_head.output.save()
        assert all(p.device.type == "cpu" for p in model._module.parameters())
        assert_close(logits, hooked(hf, tok, PROMPT))
        assert_clean(model._module)


def test_load_options_reach_from_pretrained(lm_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    options = {
        "device_map": {"": "cpu"},
        "max_memory": {"cpu": "1GB"},
        "offload_folder": str(tmp_path),
        "revision": "main",
        "trust_remote_code": False,
        "low_cpu_mem_usage": True,
    }
    for dispatch in (False, True):
        model = ic.LanguageModel(lm_dirs["gpt2"], torch_dtype=torch.float16, dispatch=dispatch, **options)
        assert not seen if not dispatch else len(seen) == 1  # dispatch=False: the meta model until a trace
        assert {p.dtype for p in model._module.parameters()} == {torch.float16}
        with model.trace(PROMPT):
            h = model.transformer.h[0].output.save()
        assert h.dtype == torch.float16 and model.dispatched
        assert seen[-1] == {**options, "dtype": torch.float16}
        seen.clear()


def test_dtype_auto_and_names(lm_dirs):
    for dtype, want in (
        ("auto", torch.float32),
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ):
        model = ic.LanguageModel(lm_dirs["llama"], dtype=dtype)  # the meta model gets the dtype too
        assert {p.dtype for p in model._module.parameters()} == {want}
        with model.trace(PROMPT):
            h = model.model.layers[0].output.save()
        assert h.dtype == want
        assert {p.dtype for p in model._module.parameters()} == {want}


# -- dtypes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("arch", ARCHS)
def test_low_precision_sets_cast_to_the_site(arch, dtype, lm_dirs):
    """A float32 value set into a bf16/fp16 site is cast to the site's dtype (whole-value sets, setitem, +=);
    saves keep the model's dtype; equal to plain hooks on the same low-precision model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(lm_dirs[arch], dtype=dtype)
    tok = AutoTokenizer.from_pretrained(lm_dirs[arch])
    model = ic.LanguageModel(lm_dirs[arch], dtype=dtype)
    blocks = BLOCKS[arch]
    torch.manual_seed(0)
    steer = torch.randn(64)  # float32
    n = len(tok(PROMPT)["input_ids"])
    whole = torch.randn(1, n, 64)  # float32
    with model.trace(PROMPT):
        model.get(f"{blocks}.0.mlp").output = whole
        model.get(f"{blocks}.1").output[:, 2] = steer
        model.get(f"{blocks}.1").output[:, -1] += steer
        h1 = model.get(f"{blocks}.1").output.save()
        logits = model.lm_head.output.save()
    assert h1.dtype == dtype and logits.dtype == dtype

    def edit(m, a, out):
        out = out.clone()
        out[:, 2] = steer
        out[:, -1] += steer
        return out

    want = hooked(
        hf, tok, PROMPT, [(f"{blocks}.0.mlp", lambda m, a, out: whole.to(dtype)), (f"{blocks}.1", edit)]
    )
    assert_close(logits, want)
    assert_clean(model._module)


def _program(model, arch, steer, compile):
    blocks = BLOCKS[arch]
    with model.trace(PROMPT, compile=compile):
        model.get(f"{blocks}.0").output[:, -1] += steer
        model.get(f"{blocks}.1.mlp").output = model.get(f"{blocks}.1.mlp").output * 0.5
        model.get(f"{blocks}.1").output[:, 2] = steer
        h = model.get(f"{blocks}.0").output.save()
        logits = model.lm_head.output.save()
    return h, logits


@pytest.mark.compiled
@pytest.mark.parametrize(
    "arch, dtype", [("gpt2", torch.bfloat16), ("gpt2", torch.float16), ("llama", torch.bfloat16)]
)
def test_low_precision_compiled_parity(arch, dtype, lm_dirs, steer):
    """Compiled and eager runs of a bf16/fp16 model: the same dtypes, and the same values up to rounding (Inductor
    keeps float32 intermediates where eager rounds after each op): the compiled logits are as close to the float32
    model's as the eager ones, and pick the same tokens."""
    model = ic.LanguageModel(lm_dirs[arch], dtype=dtype)
    before = ic.compile_stats()
    h_e, eager = _program(model, arch, steer, False)
    h_c, compiled = _program(model, arch, steer, True)
    stats = ic.compile_stats()
    assert (
        stats["compiled_calls"] == before["compiled_calls"] + 1 and stats["fallbacks"] == before["fallbacks"]
    )
    assert h_c.dtype == h_e.dtype == compiled.dtype == eager.dtype == dtype
    _, exact = _program(ic.LanguageModel(lm_dirs[arch]), arch, steer, False)
    scale = exact.abs().max()
    eps = torch.finfo(dtype).eps
    err_eager = (eager.float() - exact).abs().max()
    err_compiled = (compiled.float() - exact).abs().max()
    assert err_compiled <= 1.25 * err_eager + eps * scale, (err_compiled, err_eager)
    assert_close(h_c.float(), h_e.float(), rtol=0, atol=4 * eps * h_e.float().abs().max().item())
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.compiled
def test_bf16_compiled_generation(lm_dirs, steer):
    model = ic.LanguageModel(lm_dirs["gpt2"], dtype=torch.bfloat16)
    outs = {}
    for compile in (False, True):
        with model.generate(
            PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False, compile=compile
        ) as tr:
            hidden = ic.list().save()
            with tr.all():
                model.transformer.h[1].output[:, -1] += steer
                hidden.append(model.transformer.h[1].output[:, -1])
            out = model.generator.output.save()
        outs[compile] = (out, hidden)
    (ids_e, hid_e), (ids_c, hid_c) = outs[False], outs[True]
    assert torch.equal(ids_c, ids_e)
    eps = torch.finfo(torch.bfloat16).eps
    for a, b in zip(hid_c, hid_e):
        assert a.dtype == b.dtype == torch.bfloat16
        assert_close(a.float(), b.float(), rtol=0, atol=4 * eps * b.float().abs().max().item())


# -- hub ids without the network ----------------------------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, folder: str, commit: str = COMMIT) -> Path:
    """A Hugging Face cache holding ``folder``'s files as ``repo_id`` at ``commit``, in huggingface_hub's layout:
    ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` (a relative link to its blob, a copy
    where links are not allowed) and ``refs/main`` naming the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(Path(folder).rglob("*")):
        if not file.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        target = snapshot / file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:
            shutil.copyfile(blob, target)
    return cache


@pytest.fixture
def offline_hub(lm_dirs, tmp_path, monkeypatch):
    """The tiny checkpoints as hub ids ``tiny-org/gpt2`` / ``tiny-org/llama`` in a cache under tmp, with the hub
    offline: the environment variables for new processes, and huggingface_hub's constants (read once, at its
    import) for this one."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    for arch, folder in lm_dirs.items():
        hub_cache(cache, f"tiny-org/{arch}", folder)
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_cache_layout(offline_hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(offline_hub)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"tiny-org/gpt2", "tiny-org/llama"}
    (revision,) = repos["tiny-org/gpt2"].revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})


@pytest.mark.parametrize("arch", ARCHS)
def test_hub_id_offline(arch, offline_hub, hf_models):
    from huggingface_hub import is_offline_mode

    assert is_offline_mode()
    hf, tok = hf_models[arch]
    want = hooked(hf, tok, PROMPT)
    for kwargs in ({}, {"dispatch": True}, {"revision": COMMIT}, {"device_map": "auto", "dispatch": True}):
        model = ic.LanguageModel(f"tiny-org/{arch}", **kwargs)
        assert model.dispatched is bool(kwargs.get("dispatch"))
        assert model.tokenizer.get_vocab() == tok.get_vocab()
        with model.trace(PROMPT):
            logits = model.lm_head.output.save()
        assert_close(logits, want)
        assert_clean(model._module)


def test_hub_id_missing_offline(offline_hub):
    with pytest.raises(OSError):
        ic.LanguageModel("tiny-org/absent")
