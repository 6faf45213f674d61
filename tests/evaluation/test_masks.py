"""Keep masks from node selections: positions, the error variants, free layers, node counts."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.masks import (
    VARIANTS,
    SiteMask,
    Variant,
    default_free_layers,
    keep_masks,
    node_count,
    parse_variant,
    select,
)


def _selection(sites, n_positions, chosen, n_features=64):
    """Selection tensors ``(P, F + 1)`` with the given ``(site, position or None, feature or None)``
    set (position None: every position; feature None: the error node)."""
    sel = {s.name: torch.zeros(n_positions, n_features + 1, dtype=torch.bool) for s in sites}
    for site, pos, feat in chosen:
        sel[site][slice(None) if pos is None else pos, n_features if feat is None else feat] = True
    return sel


def _kept(masks: dict[str, SiteMask | None], site: str) -> SiteMask:
    mask = masks[site]
    assert mask is not None, f"{site}: every node kept"
    return mask


def test_keep_masks_positions_variants_and_free_layers(neox):
    sel = _selection(neox.sites, 1, [("mlp_1", None, 3), ("attn_1", None, None)])
    m = keep_masks(sel, neox.sites)
    assert m["embed"] is None  # free: always kept
    mlp = _kept(m, "mlp_1")
    assert mlp.f.shape == (1, 64) and mlp.f[0, 3] and mlp.f.sum() == 1
    assert _kept(m, "attn_1").err.all() and not _kept(m, "resid_1").err.any()
    m = keep_masks(sel, neox.sites, variant="resid_errors_kept")
    assert _kept(m, "resid_1").err.all() and not _kept(m, "mlp_1").err.any()
    m = keep_masks(sel, neox.sites, variant=Variant.NO_ERRORS_ABLATED)
    assert all(v is None or v.err.all() for v in m.values())
    assert not sel["resid_1"][:, -1].any()  # the selection itself is not modified by the forced keeps
    pos = _selection(neox.sites, 4, [("mlp_1", 2, 3)])
    m = keep_masks(pos, neox.sites)
    assert _kept(m, "mlp_1").f[:, 3].tolist() == [False, False, True, False]
    c = keep_masks(pos, neox.sites, complement=True, free_layers=1)
    assert c["attn_0"] is None and c["resid_1"] is None and _kept(c, "mlp_1").f.sum() == 4 * 64 - 1
    with pytest.raises(EvaluationError, match="unknown variant"):
        keep_masks(pos, neox.sites, variant="bogus")
    with pytest.raises(EvaluationError, match="no node selection for site 'mlp_1'"):
        keep_masks({k: v for k, v in pos.items() if k != "mlp_1"}, neox.sites)


def test_select_and_node_count(neox):
    eff = {s.name: torch.zeros(1, 65, dtype=torch.float64) for s in neox.sites}
    eff["embed"][0, 1] = 0.5  # free: never counted
    eff["mlp_1"][0, 3], eff["resid_1"][0, 64], eff["attn_0"][0, 7] = -0.2, 0.9, 0.05
    counts = [node_count(select(eff, t), neox.sites, free_layers=0) for t in (0.001, 0.1, 0.3, 0.9, 1.0)]
    assert counts == [3, 2, 1, 0, 0]  # |effect| > t, strictly
    assert node_count(select(eff, 0.001), neox.sites, free_layers=1) == 2  # attn_0 free too


def test_variants_and_free_layers_defaults():
    assert [v.value for v in VARIANTS] == ["all_errors_ablated", "resid_errors_kept", "no_errors_ablated"]
    assert parse_variant("resid_errors_kept") is Variant.RESID_ERRORS_KEPT
    assert [default_free_layers(n) for n in (2, 4, 6)] == [0, 1, 2]
    with pytest.raises(EvaluationError, match="boolean"):
        SiteMask(f=torch.zeros(1, 3), err=torch.zeros(1, 1, dtype=torch.bool))
    with pytest.raises(EvaluationError, match=r"\(P, F\) and \(P, 1\)"):
        SiteMask(f=torch.zeros(2, 3, dtype=torch.bool), err=torch.zeros(1, 1, dtype=torch.bool))
