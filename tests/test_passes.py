"""Each IR pass, shown by the printed graph before and after it, and checked to keep results unchanged."""

from __future__ import annotations

import torch

import intervene_compiler as ic
from intervene_compiler.ir import Graph, Node, Op, Ref, Site, SiteKind, format_graph, verify
from intervene_compiler.passes import eliminate_dead_values, fuse_setitems, truncate_after_last_use


def _steps(tracer) -> dict[str, str]:
    return {name: format_graph(g) for name, g in tracer.steps}


def test_dead_values_drops_unused_arithmetic_and_fresh_list(tiny, x):
    with tiny.trace(x) as tracer:
        h = tiny.layer1.output
        _ = h * 2  # feeds nothing
        scratch = ic.list()
        scratch.append(h)  # mutates a fresh list nobody reads
        total = h.sum().save()
    steps = _steps(tracer)
    assert steps["traced"] == (
        "graph trace invokes=[0:1]:\n"
        "  %0 = site model.layer1.output[i0]  # invoke=0\n"
        "  %1 = call operator.__mul__(%0, 2)  # invoke=0\n"
        "  %2 = call list()  # invoke=0\n"
        "  %3 = method %2.append(%0)  # invoke=0\n"
        "  %4 = method %0.sum()  # invoke=0\n"
        "  %5 = save(%4)  # invoke=0"
    )
    assert steps["dead_values"] == (
        "graph trace invokes=[0:1]:\n"
        "  %0 = site model.layer1.output[i0]  # invoke=0\n"
        "  %4 = method %0.sum()  # invoke=0\n"
        "  %5 = save(%4)  # invoke=0"
    )
    torch.testing.assert_close(total.value, tiny._model.layer1(x).sum())


def test_dead_values_keeps_mutations_of_visible_values(tiny, x):
    with tiny.trace(x) as tracer:
        saved = ic.list().save()
        saved.append(tiny.layer1.output)  # the list is saved: the append is live
        tiny.layer1.output.clone()[:, 0] = 5  # a fresh clone nobody reads: dead
        tiny.layer2.output[:, 0] = 7  # an activation: live
    dead = dict(tracer.steps)["dead_values"]
    ops = [n.op for n in dead.nodes]
    assert ops.count(Op.METHOD) == 1  # the append survives, the clone does not
    assert ops.count(Op.SETITEM) == 1 and dead.nodes[-1].op is Op.SETITEM
    assert len(saved) == 1
    torch.testing.assert_close(saved[0], tiny._model.layer1(x))


def test_setitem_fusion_merges_consecutive_sets_on_one_site(tiny, x):
    with tiny.trace(x) as tracer:
        tiny.layer1.output[:, 0] = 0
        tiny.layer1.output[:, 1] = 1
        out = tiny.output.save()
    steps = _steps(tracer)
    assert (
        "  %1 = setitem(%0, (:, 0), 0)  # invoke=0\n  %2 = setitem(%0, (:, 1), 1)  # invoke=0; after %1"
        in steps["dead_values"]
    )
    assert (
        "  %2 = update model.layer1.output[i0](%0, (((:, 0), 0), ((:, 1), 1)))  # invoke=0"
        in steps["setitem_fusion"]
    )
    assert "setitem" not in steps["setitem_fusion"]
    h = tiny._model.layer1(x)
    h[:, 0] = 0
    h[:, 1] = 1
    torch.testing.assert_close(out.value, tiny._model.layer2(h))


def test_setitem_fusion_skips_sites_with_other_readers(tiny, x):
    with tiny.trace(x) as tracer:
        before = tiny.layer1.output.clone().save()
        tiny.layer1.output[:, 0] = 0
    fused = dict(tracer.steps)["setitem_fusion"]
    assert Op.UPDATE not in {n.op for n in fused.nodes}
    torch.testing.assert_close(before.value, tiny._model.layer1(x))


def test_early_stop_truncation_skips_layers_after_the_last_use(tiny, x):
    calls = []
    handle = tiny._model.layer2.register_forward_hook(lambda *a: calls.append(1))
    try:
        with tiny.trace(x) as tracer:
            h = tiny.layer1.output.save()
    finally:
        handle.remove()
    steps = _steps(tracer)
    assert steps["early_stop"].endswith("  %2 = stop truncate  # after %1")
    assert calls == []  # layer2 never ran
    torch.testing.assert_close(h.value, tiny._model.layer1(x))


def test_early_stop_not_applied_when_output_needed(tiny, x):
    out = tiny.trace(x, trace=False)
    torch.testing.assert_close(out, tiny._model(x))
    with tiny.trace(x) as tracer:
        tiny.output.save()
    assert dict(tracer.steps)["early_stop"].nodes[-1].target == "truncate"  # after the root output: harmless


def test_passes_are_pure_and_report_modification():
    site = Site("layer1", SiteKind.OUTPUT)
    graph = Graph(nodes=(Node(0, Op.SITE, site), Node(1, Op.SAVE, None, (Ref(0),))))
    verify(graph)
    for run_pass in (eliminate_dead_values, fuse_setitems):
        result = run_pass(graph)
        assert result.graph is graph and not result.modified
    result = truncate_after_last_use(graph)
    assert result.modified and len(result.graph.nodes) == 3 and len(graph.nodes) == 2


def test_pass_memo_tells_literals_of_equal_value_apart(tiny, x):
    """The pipeline memoizes by structure: ``+ 1`` and ``+ 1.0`` are equal in Python but not as arguments."""
    dtypes = []
    for c in (1, 1.0, True, 1):
        with tiny.trace(x):
            h = ((tiny.layer1.output > 0).long() + c).save()
        dtypes.append(h.dtype)
    assert dtypes == [torch.int64, torch.float32, torch.int64, torch.int64]


def _hf_last_logits(folder: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF model's last-position logits for each prompt on its own: (prompt 0's row, prompt 1's (1, V))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return (
            hf(**tok(prompts[0], return_tensors="pt")).logits[0, -1],
            hf(**tok(prompts[1], return_tensors="pt")).logits[:, -1],
        )


def test_last_position_narrows_the_unembedding(lm_dirs):
    """Logits read only at the last position: lm_head runs on the last position alone, same values."""
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    prompts = ["The Eiffel Tower is in", "Hello"]
    with lm.trace() as tracer:
        with tracer.invoke(prompts[0]):
            logits = lm.lm_head.output
            diff = (logits[0, -1, 5] - logits[0, -1, 7]).save()
        with tracer.invoke(prompts[1]):
            last = lm.lm_head.output[:, -1].save()
    after = _steps(tracer)["last_position"]
    assert after.endswith(
        "  %8 = site model.lm_head.input\n"
        "  %9 = call intervene_compiler.passes.last_position.keep_last_position(%8)\n"
        "  %10 = set model.lm_head.input(%9, resize=True)"
    )
    ref0, ref1 = _hf_last_logits(lm_dirs["gpt2"], prompts)
    torch.testing.assert_close(diff.value, ref0[5] - ref0[7])
    torch.testing.assert_close(last.value, ref1)


def test_last_position_picks_vocabulary_columns(lm_dirs):
    """Readers picking fixed tokens at the last position (the patching metric): the unembedding never runs; each
    reader applies the picked weight rows to the last position of its input. Values equal the HF model's."""
    lm = ic.LanguageModel(lm_dirs["gpt2"]).dispatch()
    prompts = ["The Eiffel Tower is in", "Hello"]
    ran = []
    handle = lm._module.lm_head.register_forward_hook(lambda mod, args, out: ran.append(out.shape))
    try:
        with lm.trace() as tracer:
            with tracer.invoke(prompts[0]):
                logits = lm.lm_head.output
                diff = (logits[0, -1, 5] - logits[0, -1, 7]).save()
            with tracer.invoke(prompts[1]):
                pair = lm.lm_head.output[:, -1, [3, 4]].save()
    finally:
        handle.remove()
    after = _steps(tracer)["last_position"]
    assert "call unembed_columns(%0, (0, -1, 5))" in after and "lm_head.output" not in after
    assert ran == []  # early stop ends the forward at the unembedding's input
    ref0, ref1 = _hf_last_logits(lm_dirs["gpt2"], prompts)
    torch.testing.assert_close(diff.value, ref0[5] - ref0[7])
    torch.testing.assert_close(pair.value, ref1[:, [3, 4]])
    assert diff.value.shape == () and pair.value.shape == (1, 2)

    with lm.trace(prompts[1]):
        as_tuple = lm.lm_head.output[:, -1, (3, 4)].save()  # a tuple of tokens indexes like a list
    torch.testing.assert_close(as_tuple.value, ref1[:, [3, 4]])


def test_picked_columns_of_a_linear_subclass_run_the_module():
    """A Linear subclass (a quantized head stores its weight packed) is called on the last position, then
    indexed: its own forward decides the values."""
    from intervene_compiler.testing import tiny_gpt2

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    module = tiny_gpt2()
    head = Doubled(32, 128, bias=False)
    head.weight = module.lm_head.weight
    module.lm_head = head
    model = ic.NNsight(module)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with model.trace(ids) as tracer:
        logits = model.lm_head.output
        diff = (logits[:, -1, 5] - logits[:, -1, 7]).save()
        pair = logits[0, -1, [3, 4]].save()
    assert "unembed_columns" in _steps(tracer)["last_position"]
    with torch.no_grad():
        ref = module(ids).logits[:, -1]
    torch.testing.assert_close(diff.value, ref[:, 5] - ref[:, 7])
    torch.testing.assert_close(pair.value, ref[0, [3, 4]])


def test_picked_columns_do_not_keep_the_model_alive():
    """The pass memo and the optimized graph hold the model by weak reference only."""
    import gc
    import weakref

    from intervene_compiler.testing import tiny_gpt2

    module = tiny_gpt2()
    model = ic.NNsight(module)
    with model.trace(torch.randint(0, 128, (1, 4))) as tracer:
        d = (model.lm_head.output[0, -1, 5] - model.lm_head.output[0, -1, 7]).save()
    assert "unembed_columns" in _steps(tracer)["last_position"] and d.value.shape == ()
    refs = weakref.ref(module), weakref.ref(model)
    del module, model, tracer, d
    gc.collect()
    assert refs[0]() is None and refs[1]() is None


def test_last_position_not_applied_when_other_positions_are_read(lm_dirs, tiny, x):
    lm = ic.LanguageModel(lm_dirs["gpt2"])
    with lm.trace("The Eiffel Tower is in") as tracer:
        lm.lm_head.output[:, -2].save()  # another position
    assert "keep_last_position" not in _steps(tracer)["last_position"]
    with lm.trace("The Eiffel Tower is in") as tracer:
        lm.lm_head.output[:, -1].save()
        lm.output.logits.save()  # the model's own output, all positions
    assert "keep_last_position" not in _steps(tracer)["last_position"]
    with tiny.trace(x) as tracer:  # a plain module: its order is unknown, so never narrowed
        tiny.layer2.output[:, -1].save()
    assert "keep_last_position" not in _steps(tracer)["last_position"]
