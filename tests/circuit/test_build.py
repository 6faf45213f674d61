"""Thresholding into a circuit: kept nodes and edges, node order, the logit sink, the recorded
metric (the small hand-built circuit of tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.circuit import LOGIT_ID, AggregatedNodes, CircuitError, build_circuit
from feature_circuits.metrics import MetricName
from feature_circuits.types import Aggregation, Method, SiteKind
from tests.helpers import small_circuit


def test_thresholding_and_logit_sink_sum():
    c = small_circuit("sum")
    ids = [n.id for n in c.nodes]
    assert ids == ["embed/0", "resid_0/1", "resid_0/err", "resid_1/0", "resid_1/2"]
    err = next(n for n in c.nodes if n.id == "resid_0/err")
    assert (
        err.is_error
        and err.feature is None
        and err.position is None
        and err.kind is SiteKind.RESID
        and err.layer == 0
    )
    emb = c.nodes[0]
    assert emb.kind is SiteKind.EMBED and emb.layer == -1 and emb.feature == 0
    edges = {(e.source, e.target): e.weight for e in c.edges}
    # embed/0 -> resid_0/1 kept (0.3); -> resid_0/err below edge threshold (0.05);
    # -> resid_0/2 not a kept node
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


def _build(nodes: AggregatedNodes, method: str = "atp", metric: str = "logit_diff"):
    return build_circuit(
        nodes,
        None,
        node_threshold=0.1,
        edge_threshold=0.1,
        model="m",
        saes="s",
        method=method,
        metric=metric,
        dataset="d",
        split="train",
    )


def test_circuit_records_method_and_metric():
    c = small_circuit("sum")
    assert c.method is Method.RELP and c.aggregation is Aggregation.SUM
    assert c.metric is MetricName.LOGIT_DIFF  # the default
    nodes = AggregatedNodes(
        aggregation=Aggregation.SUM,
        effects={"resid_0": torch.tensor([0.0, 2.0, -0.5])},
        num_examples=1,
        total_effect=1.0,
    )
    c = _build(nodes, metric="answer_logit")
    assert c.metric is MetricName.ANSWER_LOGIT and c.method is Method.ATP
    assert [n.id for n in c.nodes] == ["resid_0/1", "resid_0/err"]  # --nodes-only: only the logit edges
    assert [(e.source, e.target) for e in c.edges] == [("resid_0/1", LOGIT_ID), ("resid_0/err", LOGIT_ID)]
    with pytest.raises(CircuitError, match="'magic' is not a valid Method"):
        _build(nodes, method="magic")
    with pytest.raises(CircuitError, match="'mystery' is not a valid MetricName"):
        _build(nodes, metric="mystery")
    bad = AggregatedNodes(
        aggregation=Aggregation.SUM, effects={"layer3": torch.zeros(3)}, num_examples=1, total_effect=0.0
    )
    with pytest.raises(CircuitError, match="not a site name: 'layer3'"):
        _build(bad)
