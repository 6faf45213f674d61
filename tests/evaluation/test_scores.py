"""Integrated scores against hand computations, the grid, top-k and random selections, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.scores import (
    AUC_SIZES,
    MIB_FRACTIONS,
    Grid,
    bootstrap_counts,
    cmd,
    cpr,
    normalised_auc,
    percentile_interval,
    random_selection,
    ranked_selections,
    resampled_means,
    site_counts,
)
from feature_circuits.types import Site, SiteKind


def test_scores_match_a_hand_computation():
    grid = Grid(n_total=2000, n_ranked=2000, auc_sizes=(1, 10, 100), fractions=(0.001, 0.01, 0.1, 1.0))
    assert grid.auc_k == (1, 10, 100) and grid.mib_k == (2, 20, 200, 2000)
    assert grid.sizes == (1, 2, 10, 20, 100, 200, 2000) and not any(grid.capped)
    f = {1: 0.1, 10: 0.5, 100: 0.9, 2: -0.2, 20: 0.6, 200: 1.2, 2000: 1.0}
    s = grid.scores(f)
    # auc: trapezoids over log10(size) = 0, 1, 2, divided by the log range 2
    assert s.auc == pytest.approx(((0.1 + 0.5) / 2 + (0.5 + 0.9) / 2) / 2)
    # cpr / cmd: MIB's trapezoids over the fractions; cmd takes |1 - f| (f above 1 counts too)
    assert s.cpr == pytest.approx(0.009 * (-0.2 + 0.6) / 2 + 0.09 * (0.6 + 1.2) / 2 + 0.9 * (1.2 + 1.0) / 2)
    assert s.cmd == pytest.approx(0.009 * (1.2 + 0.4) / 2 + 0.09 * (0.4 + 0.2) / 2 + 0.9 * (0.2 + 0.0) / 2)
    # the array form gives the same per resample
    auc, c, d = grid.score_arrays({k: np.array([v, 1.0]) for k, v in f.items()})
    assert auc[0] == pytest.approx(s.auc) and c[0] == pytest.approx(s.cpr) and d[0] == pytest.approx(s.cmd)
    assert auc[1] == pytest.approx(1.0) and c[1] == pytest.approx(0.999) and d[1] == pytest.approx(0.0)


def test_score_functions_and_ideal_curves():
    ones = np.ones(len(MIB_FRACTIONS))
    assert cpr(MIB_FRACTIONS, ones) == pytest.approx(0.999) and cmd(MIB_FRACTIONS, ones) == 0.0
    assert normalised_auc(AUC_SIZES, np.ones(len(AUC_SIZES))) == pytest.approx(1.0)
    step = np.array([0.0] * 5 + [1.0] * 5)  # 0 up to 20 nodes, 1 from 50: half a trapezoid at the jump
    x = np.log10(AUC_SIZES)
    want = ((x[5] - x[4]) / 2 + (x[9] - x[5])) / 3
    assert normalised_auc(AUC_SIZES, step) == pytest.approx(want)
    assert math.isnan(float(cpr((0.1, 1.0), np.array([float("nan"), 1.0]))))


def test_grid_clamps_and_flags():
    small = Grid(n_total=50, n_ranked=50)
    assert small.auc_k == (1, 2, 5, 10, 20, 50, 50, 50, 50, 50)  # above N: the full model
    assert small.mib_k == (0, 0, 0, 0, 1, 2, 5, 10, 25, 50)  # int(p * N), as MIB truncates
    assert small.sizes == (0, 1, 2, 5, 10, 20, 25, 50) and not any(small.capped)
    stored = Grid(n_total=50, n_ranked=8)  # only 8 stored nodes are known
    assert stored.sizes == (0, 1, 2, 5, 8) and stored.capped == (False, False, False, False, True)
    with pytest.raises(EvaluationError, match="AUC sizes"):
        Grid(n_total=5, n_ranked=5, auc_sizes=(10, 1))
    with pytest.raises(EvaluationError, match="MIB fractions"):
        Grid(n_total=5, n_ranked=5, fractions=(0.0, 1.0))
    with pytest.raises(EvaluationError, match="no faithfulness for grid size 2"):
        small.scores({1: 0.0})


def _sites():
    return [
        Site(kind=SiteKind.EMBED, layer=-1, module_path="e"),
        Site(kind=SiteKind.RESID, layer=0, module_path="r0"),
        Site(kind=SiteKind.RESID, layer=1, module_path="r1"),
    ]


def test_ranked_selections_take_the_largest_effects_outside_the_free_layers():
    sites = _sites()
    dense = {
        "embed": torch.tensor([[9.0, 9.0, 9.0]]),  # free: never selected
        "resid_0": torch.tensor([[0.5, -3.0, 0.5]]),
        "resid_1": torch.tensor([[2.0, 0.5, -0.1]]),
    }
    sel = ranked_selections(dense, sites, 0, [0, 1, 2, 3, 6], ranked_only=None)
    assert all(not s.any() for s in sel[0].values())
    for k in (1, 2, 3, 6):
        assert not sel[k]["embed"].any()
    ranked = ranked_selections(dense, sites[1:], 0, [1, 2, 3])
    assert ranked[1]["resid_0"].tolist() == [[False, True, False]]
    assert ranked[2]["resid_1"].tolist() == [[True, False, False]]
    # the tie at 0.5: site order, then index
    assert ranked[3]["resid_0"].tolist() == [[True, True, False]] and ranked[3]["resid_1"].sum() == 1
    with_free = ranked_selections(dense, sites, 1, [2])  # layer 0 free as well
    assert with_free[2]["resid_1"].tolist() == [[True, True, False]] and not with_free[2]["resid_0"].any()
    only = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in dense.items()}
    only["resid_1"][0, 2] = True
    assert ranked_selections(dense, sites, 0, [1], ranked_only=only)[1]["resid_1"].tolist() == [
        [False, False, True]
    ]
    with pytest.raises(EvaluationError, match="above the 1 nodes"):
        ranked_selections(dense, sites, 0, [2], ranked_only=only)


def test_random_selection_keeps_per_site_counts_and_is_seeded():
    sites = _sites()
    like = {"embed": torch.zeros(1, 5), "resid_0": torch.zeros(3, 7), "resid_1": torch.zeros(1, 40)}
    counts = {"resid_0": 4, "resid_1": 11}
    a = random_selection(like, sites, 0, counts, torch.Generator().manual_seed(3))
    b = random_selection(like, sites, 0, counts, torch.Generator().manual_seed(3))
    c = random_selection(like, sites, 0, counts, torch.Generator().manual_seed(4))
    assert site_counts(a, sites, 0) == counts and not a["embed"].any()
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    assert a["resid_0"].shape == (3, 7) and a["resid_0"].dtype == torch.bool
    with pytest.raises(EvaluationError, match="41 nodes asked at site resid_1"):
        random_selection(like, sites, 0, {"resid_1": 41}, torch.Generator())


def test_bootstrap_is_seeded_and_resamples_examples():
    a, b, c = bootstrap_counts(7, 50, 0), bootstrap_counts(7, 50, 0), bootstrap_counts(7, 50, 1)
    assert a.shape == (50, 7) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a.sum(1) == 7).all() and (a >= 0).all() and np.all(a == np.round(a))
    per = np.arange(14, dtype=np.float64).reshape(2, 7)
    means = resampled_means(per, a)
    assert means.shape == (2, 50)
    assert means[:, 0] == pytest.approx((per * a[0]).sum(1) / 7)
    assert resampled_means(per, np.ones((1, 7)))[:, 0] == pytest.approx(per.mean(1))
    iv = percentile_interval(np.arange(101, dtype=np.float64)[None])
    assert iv[0] == pytest.approx([2.5, 97.5])
    assert np.isnan(percentile_interval(np.full((1, 3), np.nan))).all()
    with pytest.raises(EvaluationError):
        bootstrap_counts(0, 5, 0)
