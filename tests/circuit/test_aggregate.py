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


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_node_accumulator_streams_to_the_list_result_and_takes_sparse(aggregation):
    from feature_circuits.circuit import NodeAccumulator

    g = torch.Generator().manual_seed(0)
    batches = []
    for b in (2, 3, 1):
        e = torch.randn(b, 4, F + 1, generator=g) * (torch.rand(b, 4, F + 1, generator=g) > 0.5)
        batches.append(node_batch({"resid_0": e, "mlp_0": e * 2}, torch.randn(b, generator=g)))
    whole = aggregate_nodes(batches, aggregation)
    acc = NodeAccumulator(aggregation)
    for bt in batches:
        # sparse COO effects (the sparse feature path) sum to the same numbers as dense ones
        bt.effects = {s: t.to_sparse() for s, t in bt.effects.items()}
        acc.add(bt)
    got = acc.result()
    assert acc.num_examples == whole.num_examples == 6
    assert got.total_effect == pytest.approx(whole.total_effect)
    for site, t in whole.effects.items():
        assert not got.effects[site].is_sparse
        torch.testing.assert_close(got.effects[site], t, rtol=1e-6, atol=1e-6)
    # the accumulator holds one sum per site, no per-example tensor
    assert all(v.shape == whole.effects[s].shape for s, v in acc._totals.items())
    with pytest.raises(CircuitError, match="no batches"):
        NodeAccumulator(aggregation).result()


def test_edge_accumulator_streams_to_the_list_result():
    from feature_circuits.circuit import EdgeAccumulator

    t1 = _edge(2, 2, 2, {(0, 1, 0, 0, 2): 1.0, (1, 1, 0, 1, 2): 3.0, (1, 0, F, 0, F): -2.0})
    t2 = _edge(1, 2, 2, {(0, 1, 0, 0, 2): 5.0, (0, 0, 1, 1, 1): 4.0})
    batches = [
        EdgeEffects(method=Method.ATP, edges={("resid_0", "resid_1"): t1}),
        EdgeEffects(method=Method.ATP, edges={("resid_0", "resid_1"): t2.to_dense()}),
    ]
    for aggregation in ("sum", "none"):
        whole = aggregate_edges(batches, aggregation)
        acc = EdgeAccumulator(aggregation)
        for bt in batches:
            acc.add(bt)
        got = acc.result()
        assert acc.num_examples == 3
        assert set(got) == set(whole)
        for k, v in whole.items():
            torch.testing.assert_close(got[k].to_dense(), v.to_dense())
    assert EdgeAccumulator("sum").result() == {}
