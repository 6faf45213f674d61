"""Ablation kinds (zero, patch, resample) against hand-hooked forwards on the tiny model; the sweep
with each kind, its integrated scores, intervals and random baseline; mean ablation unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from feature_circuits.circuit import AggregatedNodes, Circuit, Node
from feature_circuits.data import make_batches
from feature_circuits.dictionaries import encode_with_error
from feature_circuits.errors import ConfigError, EvaluationError
from feature_circuits.evaluation import (
    AblationKind,
    FromInputs,
    eval_json,
    evaluate_circuit,
    parse_ablation,
    plot_html,
    resample_inputs,
    summary_table,
    zero_values,
)
from feature_circuits.evaluation.ablation import ablated_metric, ablated_metric_values, ablated_metrics
from feature_circuits.evaluation.masks import keep_masks
from feature_circuits.model.sites import get_submodule
from feature_circuits.pipeline import EvaluateConfig
from feature_circuits.types import Aggregation, Method


def _ablate(sites, s, nodes):
    """Keep masks that keep everything but ``nodes`` ([(site, position, feature or None)])."""
    sel = {x.name: torch.zeros(s, 65, dtype=torch.bool) for x in sites}
    for site, pos, feat in nodes:
        sel[site][pos, 64 if feat is None else feat] = True
    return keep_masks(sel, sites, complement=True)


def _hand_from_inputs(loaded, aes, batches, sources, ablate):
    """Plain torch hooks: per batch a plain forward on ``sources[i]`` records each ablated site's
    features and error; in the clean forward the listed nodes take those values. The metric by
    hand: logit(patch answer) - logit(clean answer) at the last position, mean over examples."""
    by_name = {s.name: s for s in loaded.sites}
    total, n = 0.0, 0
    for batch, src in zip(batches, sources, strict=True):
        recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for name in ablate:
            site = by_name[name]

            def record(_m, _i, out, site=site, recorded=recorded):
                x = out[0] if site.output_is_tuple else out
                recorded[site.name] = encode_with_error(aes[site.name], x)

            handles.append(get_submodule(loaded.hf_model, site.module_path).register_forward_hook(record))
        with torch.no_grad():
            loaded.hf_model(src)
        for h in handles:
            h.remove()
        handles = []
        for name, nodes in ablate.items():
            site = by_name[name]

            def hook(_m, _i, out, site=site, nodes=nodes, recorded=recorded):
                x = out[0] if site.output_is_tuple else out
                f, err = encode_with_error(aes[site.name], x)
                sf, se = recorded[site.name]
                for pos, feat in nodes:
                    if feat is None:
                        err[:, pos, :] = se[:, pos, :]
                    else:
                        f[:, pos, feat] = sf[:, pos, feat]
                new = aes[site.name].decode(f) + err
                return (new, *out[1:]) if site.output_is_tuple else new

            handles.append(get_submodule(loaded.hf_model, site.module_path).register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = loaded.hf_model(batch.clean).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        m = logits.gather(1, batch.patch_answer[:, None]) - logits.gather(1, batch.clean_answer[:, None])
        total += float(m.double().sum())
        n += len(batch)
    return total / n


def test_zero_ablation_sets_the_node_to_zero(neox, aes, batches, hand_metric):
    s = batches[0].seq_len
    nodes = [("mlp_1", s - 1, 3), ("mlp_1", s - 1, 17), ("attn_1", s - 2, None)]
    masks = _ablate(neox.sites, s, nodes)
    got = ablated_metric(neox, aes, batches, zero_values(neox.sites, neox.device, neox.dtype), masks)
    zeros = {n: (torch.zeros(1, 64), torch.zeros(1, aes[n].activation_dim)) for n in ("mlp_1", "attn_1")}
    want = hand_metric(
        neox, aes, batches, zeros, {"mlp_1": [(s - 1, 3), (s - 1, 17)], "attn_1": [(s - 2, None)]}
    )
    plain = hand_metric(neox, aes, batches, zeros, {})
    assert got == pytest.approx(want, abs=1e-5) and abs(want - plain) > 1e-4


def test_patch_ablation_takes_the_patch_value(neox, aes, batches):
    s = batches[0].seq_len
    nodes = [("resid_0", s - 1, None), ("mlp_1", s - 1, 5), ("mlp_1", 1, 9)]
    masks = _ablate(neox.sites, s, nodes)
    patch = FromInputs(tuple(b.patch for b in batches), AblationKind.PATCH)
    got = ablated_metric(neox, aes, batches, patch, masks)
    ablate = {"resid_0": [(s - 1, None)], "mlp_1": [(s - 1, 5), (1, 9)]}
    want = _hand_from_inputs(neox, aes, batches, [b.patch for b in batches], ablate)
    plain = _hand_from_inputs(neox, aes, batches, [b.patch for b in batches], {})
    assert got == pytest.approx(want, abs=1e-5) and abs(want - plain) > 1e-4
    # patching every node of every site (the embedding too) is the forward on the patch input
    sel = {x.name: torch.ones(1, 65, dtype=torch.bool) for x in neox.sites}
    everything = keep_masks(sel, neox.sites, complement=True)
    logits = torch.cat([neox.hf_model(b.patch).logits[:, -1] for b in batches]).detach()
    pa = torch.cat([b.patch_answer for b in batches])[:, None]
    ca = torch.cat([b.clean_answer for b in batches])[:, None]
    on_patch = float((logits.gather(1, pa) - logits.gather(1, ca)).double().mean())
    assert ablated_metric(neox, aes, batches, patch, everything) == pytest.approx(on_patch, abs=1e-4)


def test_resample_sources_are_other_examples_of_the_same_length(neox, eval_pairs):
    pairs = eval_pairs(10)
    pairs[3] = pairs[3].__class__(
        clean_prefix="the w1 w2 w3 and w4 w5",
        patch_prefix="a w1 w2 w3 and w4 w6",
        clean_answer=" is",
        patch_answer=" are",
    )
    batches = make_batches(pairs, neox.tokenizer, 4)
    lengths = sorted({b.seq_len for b in batches})
    assert len(lengths) == 2
    a, b, c = resample_inputs(batches, 0), resample_inputs(batches, 0), resample_inputs(batches, 1)
    assert a.kind is AblationKind.RESAMPLE
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.inputs, c.inputs, strict=True))
    for batch, src in zip(batches, a.inputs, strict=True):
        assert src.shape == batch.clean.shape
        pool = torch.cat([x.clean for x in batches if x.seq_len == batch.seq_len])
        for row, s_row in zip(batch.clean, src, strict=True):
            assert any(torch.equal(s_row, p) for p in pool)  # a clean input of that length
            if len(pool) > 1:
                assert not torch.equal(s_row, row)  # never its own
    # a cyclic permutation: every clean input of a length is some example's source exactly once
    srcs = torch.cat([s for x, s in zip(batches, a.inputs, strict=True) if x.seq_len == lengths[0]])
    cleans = torch.cat([x.clean for x in batches if x.seq_len == lengths[0]])
    assert sorted(map(tuple, srcs.tolist())) == sorted(map(tuple, cleans.tolist()))


def test_resample_ablation_matches_hand_forward(neox, aes, batches):
    s = batches[0].seq_len
    masks = _ablate(neox.sites, s, [("attn_1", s - 1, None), ("resid_1", s - 1, 2)])
    res = resample_inputs(batches, 7)
    got = ablated_metric(neox, aes, batches, res, masks)
    want = _hand_from_inputs(
        neox, aes, batches, list(res.inputs), {"attn_1": [(s - 1, None)], "resid_1": [(s - 1, 2)]}
    )
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(EvaluationError, match="source inputs for"):
        ablated_metric(neox, aes, batches, FromInputs(res.inputs[:1]), masks)


def test_per_example_values_average_to_the_metric(neox, aes, batches):
    s = batches[0].seq_len
    configs = [_ablate(neox.sites, s, [("mlp_1", s - 1, k)]) for k in (1, 2, 3)]
    means = zero_values(neox.sites, neox.device, neox.dtype)
    vals = ablated_metric_values(neox, aes, batches, means, configs, stack=2)
    assert vals.per_example.shape == (3, sum(len(b) for b in batches))
    assert vals.mean == ablated_metrics(neox, aes, batches, means, configs, stack=2)
    assert vals.per_example.mean(1) == pytest.approx(vals.mean, abs=1e-9)


def _agg(neox, aes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eff = {s.name: torch.rand(aes[s.name].dict_size + 1, generator=gen) for s in neox.sites}
    return AggregatedNodes(aggregation=Aggregation.SUM, effects=eff, num_examples=6, total_effect=1.0)


def test_sweep_with_each_kind_scores_and_baseline(neox, aes, eval_pairs, tmp_path):
    agg, pairs = _agg(neox, aes), eval_pairs(8)
    kw = {
        "thresholds": [0.5, 0.9],
        "batch_size": 4,
        "variants": ["all_errors_ablated"],
        "auc_sizes": (1, 10, 100),  # a small grid keeps the test fast
        "fractions": (0.1, 0.5, 1.0),
    }
    plain = evaluate_circuit(neox, aes, agg, pairs, bootstrap=0, baseline_draws=0, **kw)
    mean = evaluate_circuit(neox, aes, agg, pairs, bootstrap=30, baseline_draws=3, **kw)
    # the grid, the baseline and the bootstrap do not change the sweep (they run in forwards of their own)
    assert mean.faithfulness == plain.faithfulness and mean.completeness == plain.completeness
    assert plain.intervals is None and plain.baseline is None and plain.scores is not None
    assert mean.scores == plain.scores
    grid = mean.grid
    assert grid is not None and grid.n_total == 6 * 65 and grid.sizes == (1, 10, 39, 100, 195, 390)
    f = mean.standard.grid_faithfulness
    assert f[-1] == 1.0 and len(f) == len(grid.sizes)
    assert mean.scores is not None and 0 < mean.scores.cpr < 1 and mean.scores.cmd > 0
    iv = mean.intervals
    assert iv is not None and iv.draws == 30 and len(iv.faithfulness) == 2
    lo, hi = iv.scores["cpr"]
    assert lo <= hi and iv.grid_faithfulness[-1] == (1.0, 1.0)
    b = mean.baseline
    assert b is not None and b.draws == 3 and len(b.grid_faithfulness_mean) == len(grid.sizes)
    assert b.grid_faithfulness_mean[-1] == 1.0 and b.grid_faithfulness_std[-1] == 0.0
    again = evaluate_circuit(neox, aes, agg, pairs, bootstrap=30, baseline_draws=3, **kw)
    assert again.intervals == iv and again.baseline == b  # seeded
    other = evaluate_circuit(neox, aes, agg, pairs, bootstrap=30, baseline_draws=3, seed=1, **kw)
    assert other.intervals != iv and other.baseline != b
    d = json.loads(json.dumps(eval_json(mean), allow_nan=False))  # plain JSON (no NaN)
    assert d["version"] == 2 and d["ablation"] == "mean" and set(d["scores"]) == {"auc", "cpr", "cmd"}
    assert d["intervals"]["cpr"] == list(iv.scores["cpr"]) and d["baseline"]["draws"] == 3
    assert set(d["baseline"]["scores"]["auc"]) == {"mean", "std"} and d["grid"]["n_nodes"] == list(grid.sizes)
    table = summary_table("c", mean)
    assert "integrated scores" in table and "random:" in table and "mean ablation" in table
    html = plot_html([("c", mean), ("p", plain)], tmp_path / "eval.html").read_text()
    assert (
        "Integrated scores" in html
        and "c: random baseline" in html
        and "Integrated scores (hollow" in html
        and "c (all_errors_ablated): scores" in html
    )
    results = {}
    for kind in AblationKind:
        r = evaluate_circuit(neox, aes, agg, pairs, bootstrap=0, baseline_draws=0, ablation=kind.value, **kw)
        assert r.ablation is kind and eval_json(r)["ablation"] == kind.value
        v = r.standard
        assert v.faithfulness[-1] != v.faithfulness[0] or v.m_full != v.m_empty
        results[kind] = v
    assert results[AblationKind.MEAN] == plain.standard
    m_empty = {k: round(v.m_empty, 6) for k, v in results.items()}
    assert len(set(m_empty.values())) == 4, m_empty  # each kind ablates to something else
    assert len({round(v.m_full, 6) for v in results.values()}) == 1  # nothing ablated: the plain model


def test_ablation_errors(neox, aes, eval_pairs):
    bads: list[dict[str, Any]] = [{"ablation": "noise"}, {"bootstrap": -1}, {"baseline_draws": -2}]
    for bad in bads:
        with pytest.raises(ConfigError, match=r"--ablation|--bootstrap|--baseline-draws"):
            EvaluateConfig(circuits=("c.json",), **bad)
    assert EvaluateConfig(circuits=("c.json",), ablation="resample").ablation == "resample"
    with pytest.raises(EvaluationError, match="unknown ablation 'noise'; choose from mean, zero"):
        parse_ablation("noise")
    agg = _agg(neox, aes)
    with pytest.raises(EvaluationError, match="means= is for mean ablation"):
        evaluate_circuit(neox, aes, agg, eval_pairs(4), means={}, ablation="zero")
    with pytest.raises(EvaluationError, match="bootstrap and baseline_draws must be >= 0"):
        evaluate_circuit(neox, aes, agg, eval_pairs(4), bootstrap=-1)


def test_stored_circuit_without_effects_caps_the_grid(neox, aes, eval_pairs):
    nodes = (
        Node.feature_node("mlp_1", 3, 0.9),
        Node.feature_node("resid_1", 7, -0.5),
        Node.error_node("attn_1", 0.2),
    )
    circ = Circuit(
        model="m",
        saes="s",
        method=Method.RELP,
        dataset="d",
        split="train",
        num_examples=4,
        edge_threshold=0.01,
        total_effect=1.0,
        edges=(),
        aggregation=Aggregation.SUM,
        node_threshold=0.1,
        nodes=nodes,
    )
    res = evaluate_circuit(
        neox, aes, circ, eval_pairs(4), thresholds=[0.05], variants=["all_errors_ablated"], bootstrap=20
    )
    grid = res.grid
    assert grid is not None and grid.n_ranked == 3 and grid.sizes == (0, 1, 2, 3)
    assert grid.capped == (False, False, False, True)  # larger sizes keep the 3 stored nodes
    stored = res.standard.stored
    assert stored is not None and res.standard.grid_faithfulness[-1] == stored.faithfulness
    d = json.loads(json.dumps(eval_json(res), allow_nan=False))
    assert d["grid"]["capped"] == [False, False, False, True] and d["grid"]["n_ranked"] == 3
    assert "circuit_faithfulness" in d["intervals"]
    assert "only the 3 stored nodes are ranked" in summary_table("c", res)
