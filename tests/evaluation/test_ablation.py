"""Means over the patch inputs, and ablated forwards against a hand-hooked reference."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.dictionaries import encode_with_error
from feature_circuits.evaluation.ablation import ablated_metric, ablated_metrics, compute_means
from feature_circuits.evaluation.masks import SiteMask, keep_masks
from feature_circuits.metrics import answer_logit
from feature_circuits.model.sites import get_activation, save, site_by_name


def test_means_are_over_patch_inputs(neox, aes, batches):
    means = compute_means(neox, aes, batches, per_position=True)
    pooled = compute_means(neox, aes, batches, per_position=False)
    patch = torch.cat([b.patch for b in batches])
    clean = torch.cat([b.clean for b in batches])
    for which, ids in (("patch", patch), ("clean", clean)):
        with torch.no_grad():
            hs = neox.hf_model(ids, output_hidden_states=True).hidden_states
        f, err = encode_with_error(aes["resid_0"], hs[1])
        close = torch.allclose(means["resid_0"].f, f.mean(0), atol=1e-5) and torch.allclose(
            means["resid_0"].err, err.mean(0), atol=1e-5
        )
        assert close == (which == "patch")
        if which == "patch":
            assert torch.allclose(pooled["resid_0"][0][0], f.mean((0, 1)), atol=1e-5)
            assert torch.allclose(pooled["resid_0"][1][0], err.mean((0, 1)), atol=1e-5)
            assert pooled["resid_0"].f.shape == (1, 64) and means["resid_0"].f.shape == (ids.shape[1], 64)


def _active_feature(neox, aes, batches, means, site, pos):
    """A feature at ``site``/``pos`` whose clean value is far from its mean (a non-trivial ablation)."""
    acts = {}
    with neox.lm.trace(batches[0].clean):
        acts["x"] = save(get_activation(neox.lm, site_by_name(list(neox.sites), site)))
    f, _ = encode_with_error(aes[site], acts["x"])
    return int((f[:, pos] - means[site][0][pos]).abs().mean(0).argmax())


def _ablate(sites, s, nodes):
    """Keep masks that keep everything but ``nodes`` ([(site, position, feature or None)])."""
    sel = {x.name: torch.zeros(s, 65, dtype=torch.bool) for x in sites}
    for site, pos, feat in nodes:
        sel[site][pos, 64 if feat is None else feat] = True
    return keep_masks(sel, sites, complement=True)


def test_single_node_ablation_matches_hand_forward(neox, aes, batches, hand_metric):
    means = compute_means(neox, aes, batches, per_position=True)
    s = batches[0].seq_len
    k = _active_feature(neox, aes, batches, means, "mlp_1", s - 1)
    masks = _ablate(neox.sites, s, [("mlp_1", s - 1, k)])
    assert [n for n, m in masks.items() if m is not None] == ["mlp_1"]
    got = ablated_metric(neox, aes, batches, means, masks)
    want = hand_metric(neox, aes, batches, means, {"mlp_1": [(s - 1, k)]})
    plain = hand_metric(neox, aes, batches, means, {})
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(got - plain) > 1e-5  # the ablation did something
    # another metric, by hand too
    got = ablated_metric(neox, aes, batches, means, masks, metric=answer_logit)
    assert got == pytest.approx(
        hand_metric(neox, aes, batches, means, {"mlp_1": [(s - 1, k)]}, metric="answer_logit"), abs=1e-5
    )


def test_ablations_compose_in_forward_order(neox, aes, batches, hand_metric):
    means = compute_means(neox, aes, batches, per_position=True)
    s = batches[0].seq_len
    k0 = _active_feature(neox, aes, batches, means, "resid_0", 1)
    k1 = _active_feature(neox, aes, batches, means, "mlp_1", s - 1)
    masks = _ablate(neox.sites, s, [("resid_0", 1, k0), ("resid_0", 2, None), ("mlp_1", s - 1, k1)])
    got = ablated_metric(neox, aes, batches, means, masks)
    ablate = {"resid_0": [(1, k0), (2, None)], "mlp_1": [(s - 1, k1)]}
    cap_ablated, cap_clean = {}, {}
    want = hand_metric(neox, aes, batches, means, ablate, capture=cap_ablated)
    hand_metric(neox, aes, batches, means, {"mlp_1": []}, capture=cap_clean)
    assert got == pytest.approx(want, abs=1e-5)
    # the early ablation changed what mlp_1 sees, hence its features (so mlp_1's f is computed from
    # the already-ablated activation)
    f_abl, _ = encode_with_error(aes["mlp_1"], cap_ablated["mlp_1"][0])
    f_cln, _ = encode_with_error(aes["mlp_1"], cap_clean["mlp_1"][0])
    assert (f_abl - f_cln)[:, 2:].abs().max() > 1e-4
    assert torch.allclose(f_abl[:, :1], f_cln[:, :1], atol=1e-6)  # causal: position 0 untouched
    # both ablations matter
    only_late = hand_metric(neox, aes, batches, means, {"mlp_1": [(s - 1, k1)]})
    assert abs(got - only_late) > 1e-5


def test_stacked_configurations_match_one_forward_each(neox, aes, batches):
    """Several mask configurations in one forward (the batch repeated) == one forward each."""
    means = compute_means(neox, aes, batches, per_position=True)
    s = batches[0].seq_len
    empty = {
        x.name: SiteMask(f=torch.zeros(s, 64, dtype=torch.bool), err=torch.zeros(s, 1, dtype=torch.bool))
        for x in neox.sites
        if x.name != "embed"
    }
    configs = [empty, _ablate(neox.sites, s, [("mlp_1", s - 1, 5)]), {}, _ablate(neox.sites, s, [])]
    stacked = ablated_metrics(neox, aes, batches, means, configs, stack=3)
    single = [ablated_metric(neox, aes, batches, means, c) for c in configs]
    assert stacked == pytest.approx(single, abs=1e-5)
    assert all(m is None for m in configs[3].values())  # the complement of nothing keeps every site
    assert single[2] == single[3]  # nothing ablated: the plain forward both times
