"""The threshold sweep: faithfulness 1 / 0 at the ends, circuits from circuit.json models, dense
effects (effects file, AggregatedNodes), the neuron baseline, per-position means, the metric."""

from __future__ import annotations

import json
import math

import pytest
import torch

from feature_circuits.circuit import AggregatedNodes, Circuit, Node, save_effects
from feature_circuits.data import make_batches
from feature_circuits.dictionaries import load_dictionaries
from feature_circuits.errors import ConfigError, EvaluationError
from feature_circuits.evaluation import (
    VARIANTS,
    SiteMask,
    Variant,
    ablated_metric,
    circuit_effects,
    compute_means,
    default_free_layers,
    eval_json,
)
from feature_circuits.evaluation import evaluate_circuit as _evaluate_circuit
from feature_circuits.metrics import MetricName
from feature_circuits.types import Aggregation, Method


def evaluate_circuit(*args, **kw):
    """The threshold sweep alone (``scores=False``) unless a test asks: these tests check the sweep;
    the integrated scores, intervals and baseline have theirs (test_scores.py, test_ablation_kinds.py)."""
    return _evaluate_circuit(*args, **{"scores": False, **kw})


def _node(site, pos, feat, eff):
    if feat is None:
        return Node.error_node(site, eff, position=pos)
    return Node.feature_node(site, feat, eff, position=pos)


def _circuit(aggregation, nodes, node_threshold=0.0, **fields):
    """A stored circuit of ``nodes`` ([(site, position, feature or None, effect)])."""
    base = {
        "model": "m",
        "saes": "s",
        "method": Method.RELP,
        "dataset": "d",
        "split": "train",
        "num_examples": 10,
        "edge_threshold": 0.01,
        "total_effect": 1.0,
        "edges": (),
    }
    return Circuit(
        **{**base, **fields},
        aggregation=Aggregation(aggregation),
        node_threshold=node_threshold,
        nodes=tuple(_node(*n) for n in nodes),
    )


def _dense(loaded, aes, effect=1.0, positions=None):
    """Every node of the model at ``effect``: (F+1,) per site, or (positions, F+1)."""
    shape = () if positions is None else (positions,)
    return {s.name: torch.full((*shape, aes[s.name].dict_size + 1), effect) for s in loaded.sites}


def test_full_model_is_1_empty_is_0(neox, aes, eval_pairs, hand_metric):
    agg = AggregatedNodes(
        aggregation=Aggregation.SUM, effects=_dense(neox, aes), num_examples=6, total_effect=1.0
    )
    res = evaluate_circuit(neox, aes, agg, eval_pairs(6), thresholds=[0.5, 2.0], batch_size=6)
    assert default_free_layers(neox.n_layers) == 0 and res.free_layers == 0
    for name in VARIANTS:
        v = res.variants[name]
        assert v.faithfulness[0] == 1.0 and v.completeness[0] == 0.0, name  # exactly, by construction
        assert v.faithfulness[1] == 0.0 and v.completeness[1] == 1.0, name
    # counts exclude the free embed site; every non-free node is in the full circuit
    assert res.n_nodes == (6 * 65, 0) and res.n_nodes_total == 6 * 65
    # m(M) is the plain model (metric logit_diff: logit(patch) - logit(clean)); m(empty) really ablates
    std = res.standard
    assert res.metric is MetricName.LOGIT_DIFF
    assert std.m_full == pytest.approx(
        hand_metric(neox, aes, make_batches(eval_pairs(6), neox.tokenizer, 6), {}, {}), abs=1e-6
    )
    assert abs(std.m_full - std.m_empty) > 1e-3
    d = eval_json(res)
    variants = d["variants"]
    assert isinstance(variants, dict) and set(variants) == {v.value for v in VARIANTS}
    assert d["faithfulness"] == [1.0, 0.0]
    json.dumps(d)


@pytest.mark.parametrize("agg, pos", [("sum", None), ("none", 4)])
def test_sweep_from_stored_circuit(neox, aes, eval_pairs, agg, pos):
    nodes = [
        ("resid_1", pos, None, 0.9),
        ("mlp_1", pos, 3, -0.2),
        ("attn_0", pos, 7, 0.05),
        ("embed", pos, 1, 0.5),
    ]
    circ = _circuit(agg, nodes, node_threshold=0.01)
    kw = {"thresholds": [0.001, 0.1, 0.3, 1.0], "batch_size": 6, "variants": ["all_errors_ablated"]}
    res = evaluate_circuit(neox, aes, circ, eval_pairs(6), **kw)
    assert res.n_nodes == (3, 2, 1, 0)  # embed is free: never counted
    assert res.below_discovery_threshold == (True, False, False, False) and not res.all_nodes
    assert res.aggregation is Aggregation(agg) and res.meta["method"] == "relp"
    assert all(math.isfinite(x) for x in res.faithfulness + res.completeness)
    assert res.faithfulness[-1] == 0.0 and res.completeness[-1] == 1.0
    # several mask configurations stacked in one forward == one forward per configuration
    one = evaluate_circuit(neox, aes, circ, eval_pairs(6), **kw, stack=1)
    assert one.faithfulness == pytest.approx(res.faithfulness, abs=1e-5)
    assert one.completeness == pytest.approx(res.completeness, abs=1e-5)
    # the same nodes as dense effects (zero elsewhere) sweep to the same numbers, bit for bit
    dense = {s.name: torch.zeros((65,) if pos is None else (5, 65), dtype=torch.float64) for s in neox.sites}
    for site, p, feat, eff in nodes:
        dense[site][(64 if feat is None else feat) if p is None else (p, 64 if feat is None else feat)] = eff
    agg_nodes = AggregatedNodes(aggregation=Aggregation(agg), effects=dense, num_examples=6, total_effect=1.0)
    again = evaluate_circuit(neox, aes, agg_nodes, eval_pairs(6), **kw)
    assert again.standard == res.standard and again.all_nodes


def test_sweep_input_errors(neox, aes, eval_pairs):
    with pytest.raises(EvaluationError, match="position out of range"):
        evaluate_circuit(neox, aes, _circuit("none", [("mlp_1", 40, 1, 1.0)]), eval_pairs(), thresholds=[0.1])
    with pytest.raises(EvaluationError, match="position-aligned over 3 tokens"):
        circ = _circuit("none", [("mlp_1", 1, 1, 1.0)], tokens=("a", "b", "c"))
        evaluate_circuit(neox, aes, circ, eval_pairs(), thresholds=[0.1])
    with pytest.raises(EvaluationError, match="unknown site"):
        evaluate_circuit(
            neox, aes, _circuit("sum", [("mlp_9", None, 1, 1.0)]), eval_pairs(), thresholds=[0.1]
        )
    with pytest.raises(EvaluationError, match="out of range for a dictionary of size 64"):
        evaluate_circuit(
            neox, aes, _circuit("sum", [("mlp_1", None, 64, 1.0)]), eval_pairs(), thresholds=[0.1]
        )
    with pytest.raises(EvaluationError, match="unknown variant"):
        evaluate_circuit(neox, aes, _circuit("sum", []), eval_pairs(), variants=["bogus"])
    with pytest.raises(EvaluationError, match="finite and >= 0"):
        evaluate_circuit(neox, aes, _circuit("sum", []), eval_pairs(), thresholds=[-1.0])
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate_circuit(neox, aes, _circuit("sum", []), eval_pairs(), metric="bogus")
    wrong = {**_dense(neox, aes), "mlp_1": torch.ones(33)}
    with pytest.raises(EvaluationError, match="32 features at site mlp_1, the dictionary has 64"):
        evaluate_circuit(
            neox,
            aes,
            AggregatedNodes(aggregation=Aggregation.SUM, effects=wrong, num_examples=1, total_effect=0.0),
            eval_pairs(),
            thresholds=[0.1],
        )


def test_from_aggregated_effects(neox, aes, eval_pairs):
    eff = {s.name: torch.zeros(65) for s in neox.sites}
    eff["mlp_1"][3], eff["resid_1"][64] = 0.5, -2.0
    agg = AggregatedNodes(aggregation=Aggregation.SUM, effects=eff, num_examples=6, total_effect=1.0)
    res = evaluate_circuit(neox, aes, agg, eval_pairs(6), batch_size=6, variants=["all_errors_ablated"])
    # default thresholds: logspace(-4, 0, 15) extended past the largest |effect| (2.0)
    assert res.thresholds[:15] == pytest.approx(torch.logspace(-4, 0, 15, dtype=torch.float64).tolist())
    assert res.thresholds[-2] <= 2.0 < res.thresholds[-1]
    assert res.n_nodes[0] == 2 and res.n_nodes[-1] == 0 and res.n_nodes[14] == 1  # at 1.0: resid_1/err
    assert res.all_nodes and res.discovery_node_threshold is None and not any(res.below_discovery_threshold)
    with pytest.raises(EvaluationError, match="AggregatedNodes"):
        evaluate_circuit(neox, aes, eff, eval_pairs(6))  # type: ignore[arg-type]  # a bare mapping


def test_neuron_baseline(neox, eval_pairs):
    neurons = load_dictionaries(neox.sites, "neurons")
    batches = make_batches(eval_pairs(6), neox.tokenizer, 6)
    means = compute_means(neox, neurons, batches, per_position=True)  # aligned examples: per position
    assert all(float(e.abs().max()) == 0.0 for _, e in means.values())  # identity: error is zero
    # the whole model at effect 1, plus resid_1's neurons at smaller effects
    eff = _dense(neox, neurons)
    eff["resid_1"] = torch.tensor([0.5 / (i + 1) for i in range(32)] + [0.0])
    agg = AggregatedNodes(aggregation=Aggregation.SUM, effects=eff, num_examples=6, total_effect=1.0)
    res = evaluate_circuit(neox, neurons, agg, batches, thresholds=[0.0, 0.9, 2.0], means=means)
    std = res.standard
    assert std.faithfulness[-1] == 0.0 and std.completeness[-1] == 1.0
    assert std.faithfulness[0] == pytest.approx(1.0, abs=1e-5)  # every neuron kept (error is zero anyway)
    assert std.completeness[0] == pytest.approx(0.0, abs=1e-5)
    assert abs(std.faithfulness[1] - 1.0) > 1e-4  # resid_1 neurons ablated to their means
    for v in VARIANTS:  # zero error: the error variants coincide
        assert res.variants[v].faithfulness == pytest.approx(std.faithfulness, abs=1e-6)


def test_sweep_over_effects_file(neox, aes, eval_pairs, tmp_path):
    """A circuit with an effects file: the sweep covers every node (more than the stored ones at low
    thresholds, no below-discovery flag), faithfulness 1 / completeness 0 with everything kept and
    0 / 1 with nothing; a missing, corrupt or mismatched effects file is an error naming it."""
    gen = torch.Generator().manual_seed(0)
    # every node has a nonzero effect in (0.001, 0.5]; two stored nodes above the discovery threshold 0.6
    eff = {s.name: 0.001 + 0.499 * torch.rand(aes[s.name].dict_size + 1, generator=gen) for s in neox.sites}
    eff["resid_1"][-1], eff["mlp_1"][3] = 0.9, -0.7
    save_effects(eff, tmp_path / "effects.safetensors", "sum")
    stored = [("resid_1", None, None, 0.9), ("mlp_1", None, 3, float(torch.tensor(-0.7)))]
    circ = _circuit("sum", stored, node_threshold=0.6, effects_file="effects.safetensors")
    path = tmp_path / "circuit.json"
    dense = circuit_effects(circ, path)
    assert dense is not None and set(dense) == set(eff)
    kw = {"thresholds": [0, 0.25, 0.6, 1], "batch_size": 6, "variants": ["all_errors_ablated"]}
    res = evaluate_circuit(neox, aes, circ, eval_pairs(12)[6:], effects=dense, **kw)
    ablatable = sum(aes[s.name].dict_size + 1 for s in neox.sites if s.name != "embed")
    assert res.n_nodes[0] == ablatable > 2  # every node (embed is free), not just the 2 stored
    assert 2 < res.n_nodes[1] < ablatable and res.n_nodes[2:] == (2, 0)
    assert res.below_discovery_threshold == (False,) * 4 and res.all_nodes
    assert eval_json(res)["sweep_nodes"] == "all"
    assert res.faithfulness[0] == 1.0 and res.completeness[0] == 0.0
    assert res.faithfulness[-1] == 0.0 and res.completeness[-1] == 1.0
    # without the effects: only the stored nodes, flagged below the discovery threshold
    res = evaluate_circuit(neox, aes, circ, eval_pairs(12)[6:], **kw)
    assert res.n_nodes == (2, 2, 2, 0) and res.below_discovery_threshold == (True, True, True, False)
    assert eval_json(res)["sweep_nodes"] == "stored"
    assert circuit_effects(circ.model_copy(update={"effects_file": None}), path) is None
    # effects that disagree with the stored nodes are refused, passed in or read from the file
    with pytest.raises(EvaluationError, match="from another run"):
        evaluate_circuit(neox, aes, circ, eval_pairs(6), effects={**eff, "mlp_1": -eff["mlp_1"]}, **kw)
    target = tmp_path / "effects.safetensors"
    for damage, msg in (
        (lambda p: p.unlink(), "not found"),
        (lambda p: p.write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda p: save_effects({**eff, "mlp_1": -eff["mlp_1"]}, p, "sum"), "from another run"),
    ):
        damage(target)
        with pytest.raises(EvaluationError, match=msg) as info:
            circuit_effects(circ, path)
        assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_sum_circuit_on_aligned_data_uses_per_position_means(neox, aes, eval_pairs):
    """Means per position whenever positions are aligned, for 'sum' circuits too."""
    pairs = eval_pairs(6)
    batches = make_batches(pairs, neox.tokenizer, 6)
    circ = _circuit("sum", [("resid_1", None, None, 0.4), ("mlp_1", None, 3, 0.02)])
    res = evaluate_circuit(neox, aes, circ, pairs, thresholds=[0.01, 0.1], batch_size=6)
    assert res.means_per_position and eval_json(res)["means"] == "per position"
    per_pos = compute_means(neox, aes, batches, per_position=True)
    again = evaluate_circuit(neox, aes, circ, pairs, thresholds=[0.01, 0.1], batch_size=6, means=per_pos)
    assert again.standard.m_circuit == res.standard.m_circuit
    # the empty circuit ablated with per-position means is m(empty) by hand; pooled means give another value
    empty = {
        s.name: SiteMask(f=torch.zeros(1, 64, dtype=torch.bool), err=torch.zeros(1, 1, dtype=torch.bool))
        for s in neox.sites
        if s.layer >= default_free_layers(neox.n_layers)
    }
    by_hand = ablated_metric(neox, aes, batches, per_pos, empty)
    assert res.standard.m_empty == pytest.approx(by_hand, abs=1e-6)
    pooled = compute_means(neox, aes, batches, per_position=False)
    assert abs(ablated_metric(neox, aes, batches, pooled, empty) - by_hand) > 1e-6
    with pytest.raises(EvaluationError, match="position"):
        evaluate_circuit(neox, aes, circ, pairs, thresholds=[0.01], batch_size=6, means=pooled)


def test_metric_defaults_to_the_circuits(neox, aes, eval_pairs):
    """The circuit's recorded metric is the default (``metric=`` overrides it); eval.json names it."""
    nodes = [("resid_1", None, None, 0.4), ("mlp_1", None, 3, 0.02), ("attn_1", None, 5, 0.2)]
    kw = {"thresholds": [0.01, 0.1, 0.3], "batch_size": 6, "variants": [Variant.ALL_ERRORS_ABLATED]}
    diff = evaluate_circuit(neox, aes, _circuit("sum", nodes), eval_pairs(6), **kw)
    logit = evaluate_circuit(
        neox, aes, _circuit("sum", nodes, metric=MetricName.ANSWER_LOGIT), eval_pairs(6), **kw
    )
    assert diff.metric is MetricName.LOGIT_DIFF and logit.metric is MetricName.ANSWER_LOGIT
    assert eval_json(logit)["metric"] == "answer_logit"
    assert logit.standard.m_full != diff.standard.m_full
    forced = evaluate_circuit(neox, aes, _circuit("sum", nodes), eval_pairs(6), metric="answer_logit", **kw)
    assert forced.standard == logit.standard
