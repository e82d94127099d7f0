"""Each IR pass, shown by the printed graph before and after it, and checked to keep results unchanged."""

from __future__ import annotations

import torch

import intervene_compiler as ic
from intervene_compiler.ir import Graph, Node, Op, Ref, Site, SiteKind, format_graph, verify
from passes import eliminate_dead_values, fuse_setitems, truncate_after_last_use


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
