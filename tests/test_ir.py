"""The IR as data: printing, verifying, serializing without pickle, structural keys, nested graphs."""

from __future__ import annotations

import json

import pytest
import torch

import intervene_compiler as ic
from intervene_compiler.errors import IRVerificationError, SerializationError
from intervene_compiler.execute import execute
from intervene_compiler.ir import (
    Graph,
    InvokeRows,
    Node,
    Op,
    ParamRef,
    Ref,
    Site,
    SiteKind,
    dumps,
    format_graph,
    from_data,
    loads,
    structure_key,
    to_data,
    verify,
)


def _patch_graph(tiny, x, value: float, position: int):
    with tiny.trace(x) as tracer:
        tiny.layer1.output[:, position] = torch.full((1,), value)
        out = tiny.output.save()
    return tracer.graph, out


def test_serialized_graph_round_trips_and_reruns(tiny, x):
    graph, out = _patch_graph(tiny, x, 3.0, 2)
    payload = dumps(graph)
    assert b"pickle" not in payload and not payload.startswith(
        b"\x80"
    )  # JSON header + safetensors, no pickle
    again = loads(payload)
    assert format_graph(again) == format_graph(graph)
    assert structure_key(again) == structure_key(graph)
    result = execute(again, [((x,), {})], tiny._target())  # the seam a remote backend serves
    torch.testing.assert_close(result.values[next(iter(result.values))], out.value)


def test_to_data_is_json_with_tensors_apart(tiny, x):
    graph, _ = _patch_graph(tiny, x, 3.0, 2)
    data, tensors = to_data(graph)
    text = json.dumps(data)  # plain JSON: no objects
    assert len(tensors) == 1 and torch.equal(tensors[0], torch.full((1,), 3.0))
    assert format_graph(from_data(json.loads(text), tensors)) == format_graph(graph)


def test_structure_key_abstracts_runtime_values(tiny, x):
    g1, _ = _patch_graph(tiny, x, 3.0, 2)
    g2, _ = _patch_graph(tiny, x, -7.0, 2)
    g3, _ = _patch_graph(tiny, x, 3.0, 4)
    assert structure_key(g1) == structure_key(g2)  # only the patched tensor's value differs
    assert structure_key(g1) != structure_key(
        g3
    )  # a different literal index is a different structure (for now)
    with tiny.trace(x) as tracer:
        tiny.layer2.output.save()
    assert structure_key(tracer.graph) != structure_key(g1)


def test_local_callables_cannot_be_serialized(tiny, x):
    with tiny.trace(x) as tracer:
        ic.apply(lambda t: t * 2, tiny.layer1.output).save()
    with pytest.raises(SerializationError, match="no importable name"):
        dumps(tracer.graph)
    structure_key(tracer.graph)  # hashing still works for local runs


def test_printer_is_deterministic_and_hides_addresses(tiny, x):
    texts = {format_graph(_patch_graph(tiny, x, 3.0, 2)[0]) for _ in range(3)}
    assert len(texts) == 1
    text = texts.pop()
    assert "0x" not in text and "$p0:float32[1]" in text


def _site(path="layer1", kind=SiteKind.OUTPUT):
    return Site(path, kind)


@pytest.mark.parametrize(
    "nodes, params, message",
    [
        ((Node(1, Op.SITE, _site()), Node(1, Op.SAVE, None, (Ref(1),))), (), "not greater"),
        ((Node(0, Op.SAVE, None, (Ref(5),)),), (), "not an earlier node"),
        (
            (Node(0, Op.SITE, _site()), Node(1, Op.SAVE, None, (Ref(0),), guards=((0, True),))),
            (),
            "not a cond",
        ),
        ((Node(0, Op.SAVE, None, (ParamRef(3),)),), (torch.ones(1),), "refers to param 3"),
        ((Node(0, Op.SETITEM, None, (1, 2)),), (), "has 2 args, expected 3"),
        ((Node(0, Op.SITE, "layer1"),), (), "no Site target"),
        ((Node(0, Op.METHOD, 3, (1,)),), (), "string target"),
        ((Node(0, Op.STOP, "sometimes"),), (), "unknown stop kind"),
    ],
)
def test_verifier_rejects_broken_graphs(nodes, params, message):
    with pytest.raises(IRVerificationError, match=message):
        verify(Graph(nodes=nodes, params=params))


def test_verifier_rejects_update_of_a_value_read_elsewhere():
    nodes = (
        Node(0, Op.SITE, _site()),
        Node(1, Op.UPDATE, _site(), (Ref(0), ((0, 1.0),))),
        Node(2, Op.SAVE, None, (Ref(0),)),
    )
    with pytest.raises(IRVerificationError, match="also read by %2"):
        verify(Graph(nodes=nodes))


def test_nested_graphs_verify_and_serialize():
    inner = Graph(
        nodes=(Node(3, Op.CALL, torch.add, (Ref(0), 1)), Node(4, Op.SAVE, None, (Ref(3),))),
        kind="trace",
    )
    outer = Graph(
        nodes=(
            Node(0, Op.CALL, torch.zeros, (2,)),
            Node(1, Op.COND, None, (True,)),
            Node(2, Op.LOG, None, (Ref(0),), guards=((1, True),), body=(inner,)),
        ),
        kind="session",
        invokes=(InvokeRows(0, 1),),
    )
    verify(outer)  # the inner graph may read %0 of the enclosing graph
    again = loads(dumps(outer))
    assert format_graph(again) == format_graph(outer)
    assert "graph trace" in format_graph(outer) and "if %1" in format_graph(outer)
    bad = Graph(
        nodes=(
            Node(0, Op.CALL, torch.zeros, (2,)),
            Node(1, Op.LOG, None, (), body=(Graph(nodes=(Node(2, Op.SAVE, None, (Ref(9),)),)),)),
        )
    )
    with pytest.raises(IRVerificationError, match="%9"):
        verify(bad)
