"""Aggregation math, thresholding, the logit sink, circuit.json round trip and schema errors,
networkx and GraphML export (hand-built NodeEffects / EdgeEffects, no model)."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch

from feature_circuits.attribution.results import EdgeEffects
from feature_circuits.circuit.graph import (
    LOGIT_ID,
    SCHEMA_PATH,
    CircuitError,
    aggregate_edges,
    aggregate_nodes,
    circuit_to_dict,
    export_graphml,
    load_circuit,
    load_effects,
    node_id,
    save_circuit,
    save_effects,
    to_networkx,
    validate_circuit_dict,
)
from feature_circuits.types import Method
from tests.helpers import F, _edge, node_batch, small_circuit


def test_aggregate_sum_example_weighted():
    # batch 1: 2 examples of length 2; batch 2: 1 example of length 3
    e1 = torch.arange(2 * 2 * (F + 1), dtype=torch.float32).reshape(2, 2, F + 1)
    e2 = torch.ones(1, 3, F + 1) * 10
    agg = aggregate_nodes(
        [
            node_batch({"resid_0": e1}, torch.tensor([1.0, 2.0])),
            node_batch({"resid_0": e2}, torch.tensor([6.0])),
        ],
        "sum",
    )
    expect = (e1.sum(dim=(0, 1)) + e2.sum(dim=(0, 1))) / 3
    assert agg.num_examples == 3
    torch.testing.assert_close(agg.effects["resid_0"], expect)
    assert agg.total_effect == pytest.approx(3.0)  # (1+2+6)/3, not the mean of batch means (2.25)
    assert agg.timing_s == {"nodes": 2.0}


def test_aggregate_none_keeps_positions_and_requires_equal_length():
    e1 = torch.randn(2, 4, F + 1)
    e2 = torch.randn(3, 4, F + 1)
    agg = aggregate_nodes([node_batch({"mlp_0": e1}), node_batch({"mlp_0": e2})], "none")
    torch.testing.assert_close(agg.effects["mlp_0"], torch.cat([e1, e2]).mean(0))
    assert agg.effects["mlp_0"].shape == (4, F + 1)
    with pytest.raises(CircuitError, match="equal length"):
        aggregate_nodes([node_batch({"mlp_0": e1}), node_batch({"mlp_0": torch.randn(1, 5, F + 1)})], "none")
    with pytest.raises(CircuitError, match="unknown aggregation"):
        aggregate_nodes([node_batch({"mlp_0": e1})], "mean")


def test_aggregate_edges_sum_and_none():
    t1 = _edge(2, 2, 2, {(0, 1, 0, 0, 2): 1.0, (1, 1, 0, 1, 2): 3.0, (1, 0, F, 0, F): -2.0})
    t2 = _edge(1, 2, 2, {(0, 1, 0, 0, 2): 5.0})
    logit = torch.zeros(2, 2, F + 1)
    batches = [
        EdgeEffects(method=Method.ATP, edges={("resid_0", "resid_1"): t1, ("resid_1", LOGIT_ID): logit}),
        EdgeEffects(method=Method.ATP, edges={("resid_0", "resid_1"): t2}),
    ]
    s = aggregate_edges(batches, "sum")
    assert set(s) == {("resid_0", "resid_1")}
    dense = s[("resid_0", "resid_1")].to_dense()
    assert dense.shape == (F + 1, F + 1)
    assert dense[0, 2].item() == pytest.approx((1 + 3 + 5) / 3)
    assert dense[F, F].item() == pytest.approx(-2 / 3)
    n = aggregate_edges(batches, "none")[("resid_0", "resid_1")].to_dense()
    assert n.shape == (2, F + 1, 2, F + 1)
    assert n[1, 0, 0, 2].item() == pytest.approx((1 + 5) / 3)
    assert n[1, 0, 1, 2].item() == pytest.approx(3 / 3)
    # dense input works too
    d = aggregate_edges(
        [EdgeEffects(method=Method.ATP, edges={("resid_0", "resid_1"): t1.to_dense()})], "sum"
    )
    assert d[("resid_0", "resid_1")].to_dense()[0, 2].item() == pytest.approx(2.0)
    with pytest.raises(CircuitError, match="equal length"):
        aggregate_edges(
            [
                EdgeEffects(method=Method.ATP, edges={("a", "b"): t1}),
                EdgeEffects(method=Method.ATP, edges={("a", "b"): _edge(1, 3, 3, {(0, 0, 0, 0, 0): 1.0})}),
            ],
            "none",
        )


def test_thresholding_and_logit_sink_sum():
    c = small_circuit("sum")
    ids = [n.id for n in c.nodes]
    assert ids == ["embed/0", "resid_0/1", "resid_0/err", "resid_1/0", "resid_1/2"]
    err = next(n for n in c.nodes if n.id == "resid_0/err")
    assert (
        err.is_error
        and err.feature is None
        and err.position is None
        and err.kind == "resid"
        and err.layer == 0
    )
    emb = c.nodes[0]
    assert emb.kind == "embed" and emb.layer == -1 and emb.feature == 0
    edges = {(e.source, e.target): e.weight for e in c.edges}
    # embed/0 -> resid_0/1 kept (0.3); -> resid_0/err below edge threshold (0.05); -> resid_0/2 not a kept node
    assert edges[("embed/0", "resid_0/1")] == pytest.approx(0.3)
    assert ("embed/0", "resid_0/err") not in edges
    assert ("embed/0", "resid_0/2") not in edges
    assert edges[("resid_0/1", "resid_1/0")] == pytest.approx(-0.4)
    assert edges[("resid_0/err", "resid_1/2")] == pytest.approx(0.2)
    # logit sink: fed by the last resid's kept nodes, weight = node effect
    assert edges[("resid_1/0", LOGIT_ID)] == pytest.approx(1.5)
    assert edges[("resid_1/2", LOGIT_ID)] == pytest.approx(-0.8)
    assert len(edges) == 5
    assert c.total_effect == pytest.approx(2.5) and c.num_examples == 1 and c.n_layers == 2
    assert "resid_1" in c.summary()


def test_thresholding_none_positions():
    c = small_circuit("none")
    ids = [n.id for n in c.nodes]
    assert ids == ["embed@0/0", "resid_0@1/1", "resid_0@1/err", "resid_1@1/0", "resid_1@1/2"]
    assert all(n.position is not None for n in c.nodes)
    edges = {(e.source, e.target) for e in c.edges}
    assert ("embed@0/0", "resid_0@1/1") in edges
    assert ("resid_0@1/1", "resid_1@1/0") in edges
    assert ("resid_0@0/1", "resid_1@1/0") not in edges  # upstream node at position 0 was not kept
    assert ("resid_1@1/0", LOGIT_ID) in edges
    assert c.tokens == ("The", " keys")


def test_node_id():
    assert node_id("resid_3", 123) == "resid_3/123"
    assert node_id("resid_3", 123, 4) == "resid_3@4/123"
    assert node_id("resid_3", None) == "resid_3/err"


def test_json_round_trip(tmp_path):
    for agg in ("sum", "none"):
        c = small_circuit(agg)
        p = save_circuit(c, tmp_path / agg / "circuit.json")
        back = load_circuit(p)
        assert back == c
        d = json.loads(p.read_text())
        assert d["schema_version"] == 1
        assert list(d)[:14] == [
            "schema_version",
            "model",
            "saes",
            "method",
            "dataset",
            "split",
            "num_examples",
            "aggregation",
            "node_threshold",
            "edge_threshold",
            "total_effect",
            "nodes",
            "edges",
            "timing_s",
        ]
        assert set(d["nodes"][0]) == {
            "id",
            "site",
            "kind",
            "layer",
            "position",
            "feature",
            "is_error",
            "effect",
        }
        err = next(n for n in d["nodes"] if n["is_error"])
        assert err["feature"] is None
        if agg == "sum":
            assert all(n["position"] is None for n in d["nodes"])
    # the JSON Schema file itself is valid JSON and lists the required keys
    schema = json.loads(SCHEMA_PATH.read_text())
    assert "nodes" in schema["required"]


def test_effects_file_round_trip(tmp_path):
    import dataclasses

    for agg in ("sum", "none"):
        c = small_circuit(agg)
        eff = {
            "embed": torch.randn((F + 1,) if agg == "sum" else (2, F + 1)).double(),
            "resid_0": torch.zeros((F + 1,) if agg == "sum" else (2, F + 1)),
        }
        p = save_effects(eff, tmp_path / agg / "effects.safetensors", agg)
        back = load_effects(p, agg)
        assert set(back) == set(eff) and all(back[k].dtype == torch.float32 for k in back)
        assert all(torch.equal(back[k], eff[k].float()) for k in eff)
        c = dataclasses.replace(c, effects_file="effects.safetensors")
        cp = save_circuit(c, tmp_path / agg / "circuit.json")
        assert json.loads(cp.read_text())["effects_file"] == "effects.safetensors"
        assert load_circuit(cp) == c
    assert "effects_file" not in circuit_to_dict(small_circuit())  # optional
    with pytest.raises(CircuitError, match="aggregation 'sum'"):
        load_effects(tmp_path / "sum" / "effects.safetensors", "none")
    with pytest.raises(CircuitError, match="expected 1 dims"):
        save_effects({"embed": torch.zeros(2, 3)}, tmp_path / "x.safetensors", "sum")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CircuitError, match="not found") as info:
        load_effects(missing)
    assert str(missing) in str(info.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CircuitError, match="not a readable safetensors") as info:
        load_effects(bad)
    assert str(bad) in str(info.value)


def test_jsonschema_package_agrees_if_installed(tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed; the hand check is used")
    d = circuit_to_dict(small_circuit("none"))
    jsonschema.validate(d, json.loads(SCHEMA_PATH.read_text()))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=99), "unsupported schema_version 99"),
        (lambda d: d.pop("schema_version"), "missing 'schema_version'"),
        (lambda d: d.pop("nodes"), "missing key 'nodes'"),
        (lambda d: d.update(method="magic"), r"\$.method: 'magic' is not one of"),
        (lambda d: d["nodes"][0].update(effect="big"), r"\$.nodes\[0\].effect: expected number"),
        (lambda d: d["nodes"][0].pop("site"), r"\$.nodes\[0\]: missing key 'site'"),
        (lambda d: d.update(extra=1), "unexpected key 'extra'"),
        (lambda d: d["edges"][0].update(source="nope/1"), "unknown node 'nope/1'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "duplicate node id"),
        (lambda d: d["nodes"][0].update(feature=None), "is_error must be true exactly when feature is null"),
        (lambda d: d["nodes"][0].update(position=3), "position must be null"),
        (lambda d: d.update(effects_file=3), r"\$.effects_file: expected string"),
    ],
)
def test_schema_errors(tmp_path, mutate, message):
    d = circuit_to_dict(small_circuit("sum"))
    mutate(d)
    p = tmp_path / "circuit.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitError, match=message) as info:
        load_circuit(p)
    assert str(p) in str(info.value)


def test_load_errors(tmp_path):
    with pytest.raises(CircuitError, match="not found"):
        load_circuit(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CircuitError, match="not valid JSON"):
        load_circuit(tmp_path / "bad.json")
    with pytest.raises(CircuitError, match="expected a JSON object"):
        validate_circuit_dict([1, 2])


def test_networkx_attributes():
    c = small_circuit("sum")
    g = to_networkx(c)
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == len(c.nodes) + 1
    assert g.number_of_edges() == len(c.edges)
    assert g.nodes["resid_0/err"] == {
        "site": "resid_0",
        "kind": "resid",
        "layer": 0,
        "position": None,
        "feature": None,
        "is_error": True,
        "effect": pytest.approx(0.7),
    }
    assert g.nodes[LOGIT_ID]["kind"] == "logit" and g.nodes[LOGIT_ID]["layer"] == 2
    assert g.edges["resid_1/0", LOGIT_ID]["weight"] == pytest.approx(1.5)
    assert g.graph["method"] == "relp" and g.graph["num_examples"] == 1
    assert nx.is_directed_acyclic_graph(g)


def test_graphml_export(tmp_path):
    for agg in ("sum", "none"):
        c = small_circuit(agg)
        p = export_graphml(c, tmp_path / f"{agg}.graphml")
        g = nx.read_graphml(p)
        assert g.number_of_nodes() == len(c.nodes) + 1
        assert g.number_of_edges() == len(c.edges)
        err = g.nodes["resid_0/err" if agg == "sum" else "resid_0@1/err"]
        assert err["feature"] == -1 and err["is_error"] is True
        assert g.graph["model"] == "tiny <b>model</b>"
