"""Aggregation math: example-weighted means over batches, ``sum`` vs ``none``, sparse and dense edge
input (hand-built NodeEffects / EdgeEffects, no model)."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.attribution.results import EdgeEffects
from feature_circuits.circuit import LOGIT_ID, CircuitError, aggregate_edges, aggregate_nodes
from feature_circuits.types import Method
from tests.helpers import F, _edge, node_batch


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
