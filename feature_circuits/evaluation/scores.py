"""Integrated scores of a circuit on a fixed grid of sizes, bootstrap intervals, the random baseline.

Definitions (docs/algorithms.md, "Integrated scores"):

* **Grid** (:class:`Grid`). The circuit of size ``k`` is the ``k`` nodes of largest ``|effect|``
  outside the free layers (ties broken by site order, then position, then index). Two fixed lists
  of sizes are read: :data:`AUC_SIZES`, log-spaced node counts 1, 2, 5, ..., 1000 (a size above the
  number of ablatable nodes ``N`` is clamped to ``N``, the full model), and :data:`MIB_FRACTIONS`,
  the fractions of ``N`` that the MIB benchmark uses, ``k = int(p * N)`` (truncated, as MIB does).
  When only the stored nodes are known (no effects file) a size above their number is clamped to
  it and flagged (:attr:`Grid.capped`).
* **auc** (:func:`normalised_auc`): the trapezoidal area under faithfulness against
  ``log10(size)`` over :data:`AUC_SIZES`, divided by ``log10(1000) - log10(1) = 3``: a circuit of
  faithfulness 1 at every size scores 1, one that reaches 1 only with the full model less.
* **cpr** (:func:`cpr`): MIB's circuit performance ratio, the trapezoidal area under faithfulness
  against the fraction ``p`` over :data:`MIB_FRACTIONS` (from 0.001 to 1; higher is better, at most
  0.999 when faithfulness is 1 everywhere).
* **cmd** (:func:`cmd`): MIB's circuit-model difference, the trapezoidal area of ``|1 - f|`` over the
  same fractions (lower is better; 0 when faithfulness is 1 everywhere).
* **Bootstrap** (:func:`bootstrap_counts`, :func:`percentile_interval`): ``R`` resamples of the
  evaluation examples with replacement (a seeded multinomial draw of counts); every mean metric
  value is recomputed from the per-example values of the forwards already run (no new forward),
  then faithfulness and the scores; the interval is the 2.5th-97.5th percentile of the resamples.
* **Random baseline** (:func:`random_selection`): for each size of the grid, a circuit with the same
  number of nodes at every site as the circuit of that size, drawn uniformly among the site's nodes
  (error node included) with a seeded generator; several draws give a mean and a spread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.masks import is_free
from feature_circuits.types import Site

__all__ = [
    "AUC_SIZES",
    "MIB_FRACTIONS",
    "Baseline",
    "Grid",
    "Intervals",
    "Scores",
    "bootstrap_counts",
    "cmd",
    "cpr",
    "normalised_auc",
    "percentile_interval",
    "random_selection",
    "ranked_selections",
    "resampled_means",
    "site_counts",
]

#: Node counts of the normalised AUC: log-spaced (1-2-5 per decade) from 1 to 1000.
AUC_SIZES: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
#: Fractions of the ablatable nodes at which MIB reads its curves (its evaluate_area_under_curve).
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True, kw_only=True)
class Scores:
    """The integrated scores of one faithfulness curve (``nan`` where faithfulness is undefined)."""

    auc: float
    cpr: float
    cmd: float

    def as_dict(self) -> dict[str, float]:
        return {"auc": self.auc, "cpr": self.cpr, "cmd": self.cmd}


@dataclass(frozen=True, kw_only=True)
class Grid:
    """The fixed sizes the scores are read at, for a circuit of ``n_total`` ablatable nodes of which
    ``n_ranked`` can be ranked (``n_total`` with every node's effect, the stored nodes outside the
    free layers otherwise)."""

    n_total: int
    n_ranked: int
    auc_sizes: tuple[int, ...] = AUC_SIZES
    fractions: tuple[float, ...] = MIB_FRACTIONS

    def __post_init__(self) -> None:
        if (
            len(self.auc_sizes) < 2
            or any(s < 1 for s in self.auc_sizes)
            or list(self.auc_sizes) != sorted(set(self.auc_sizes))
        ):
            raise EvaluationError(
                f"AUC sizes must be >= 2 increasing counts >= 1, got {list(self.auc_sizes)}"
            )
        if (
            len(self.fractions) < 2
            or any(not 0 < p <= 1 for p in self.fractions)
            or list(self.fractions) != sorted(set(self.fractions))
        ):
            raise EvaluationError(
                f"MIB fractions must be >= 2 increasing values in (0, 1], got {list(self.fractions)}"
            )

    def _clamp(self, k: int) -> int:
        return min(k, self.n_total, self.n_ranked)

    @property
    def auc_k(self) -> tuple[int, ...]:
        """The node count of each AUC size (clamped to the nodes there are)."""
        return tuple(self._clamp(s) for s in self.auc_sizes)

    @property
    def mib_k(self) -> tuple[int, ...]:
        """The node count of each MIB fraction, ``int(p * n_total)`` (clamped to the ranked nodes)."""
        return tuple(self._clamp(int(p * self.n_total)) for p in self.fractions)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every distinct node count of the grid, ascending."""
        return tuple(sorted(set(self.auc_k) | set(self.mib_k)))

    @property
    def capped(self) -> tuple[bool, ...]:
        """Per :attr:`sizes`: whether some requested count there was above the ranked nodes (only the
        stored nodes are known, so the circuit stops growing)."""
        over = {
            self._clamp(k)
            for k in [
                *(min(s, self.n_total) for s in self.auc_sizes),
                *(int(p * self.n_total) for p in self.fractions),
            ]
            if k > self.n_ranked
        }
        return tuple(k in over for k in self.sizes)

    def scores(self, faith_at: Mapping[int, np.ndarray | float]) -> Scores:
        """The scores from the faithfulness at every node count of :attr:`sizes` (floats)."""
        auc, c, d = self.score_arrays({k: np.asarray(v, dtype=np.float64) for k, v in faith_at.items()})
        return Scores(auc=float(auc), cpr=float(c), cmd=float(d))

    def score_arrays(self, faith_at: Mapping[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """auc, cpr, cmd for arrays of faithfulness (e.g. one entry per bootstrap resample)."""
        try:
            fa = np.stack([np.asarray(faith_at[k], dtype=np.float64) for k in self.auc_k], axis=-1)
            fm = np.stack([np.asarray(faith_at[k], dtype=np.float64) for k in self.mib_k], axis=-1)
        except KeyError as err:
            raise EvaluationError(f"no faithfulness for grid size {err.args[0]}") from None
        return normalised_auc(self.auc_sizes, fa), cpr(self.fractions, fm), cmd(self.fractions, fm)


#: A ``(lo, hi)`` interval (``nan`` where undefined).
Interval = tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class Intervals:
    """Percentile bootstrap intervals over examples (``draws`` resamples, ``seed``, central
    ``level``): of the scores (``{"auc", "cpr", "cmd"}``), of faithfulness and completeness at every
    threshold of the sweep, of faithfulness at every grid size, and of the stored circuit's
    faithfulness and completeness (``{"faithfulness", "completeness"}``; None without one)."""

    level: float
    draws: int
    seed: int
    scores: Mapping[str, Interval]
    faithfulness: tuple[Interval, ...]
    completeness: tuple[Interval, ...]
    grid_faithfulness: tuple[Interval, ...]
    stored: Mapping[str, Interval] | None = None


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """The random-circuit baseline of one variant: ``draws`` random circuits per grid size with the
    circuit's node count at every site (generator seeded with ``seed``); faithfulness per grid size
    (mean and standard deviation over the draws, ``ddof=1``; 0 for one draw) and the scores of
    every draw with their mean and standard deviation."""

    variant: str
    draws: int
    seed: int
    grid_faithfulness_mean: tuple[float, ...]
    grid_faithfulness_std: tuple[float, ...]
    draw_scores: tuple[Scores, ...]

    def _stat(self, std: bool) -> Scores:
        arr = np.array([[d.auc, d.cpr, d.cmd] for d in self.draw_scores], dtype=np.float64)
        if not std:
            return Scores(
                auc=float(arr[:, 0].mean()), cpr=float(arr[:, 1].mean()), cmd=float(arr[:, 2].mean())
            )
        v = arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(3)
        return Scores(auc=float(v[0]), cpr=float(v[1]), cmd=float(v[2]))

    @property
    def scores_mean(self) -> Scores:
        return self._stat(False)

    @property
    def scores_std(self) -> Scores:
        return self._stat(True)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoidal area of ``y`` (..., n) over ``x`` (n,), as MIB sums it (pairwise, in order)."""
    dx = np.diff(x)
    return ((y[..., 1:] + y[..., :-1]) / 2 * dx).sum(-1)


def normalised_auc(sizes: Sequence[int], faithfulness: np.ndarray) -> np.ndarray:
    """Area under faithfulness (last axis) against ``log10(size)``, divided by the log10 range of
    ``sizes``: 1 for a curve at 1 everywhere."""
    x = np.log10(np.asarray(sizes, dtype=np.float64))
    return _trapezoid(x, np.asarray(faithfulness, dtype=np.float64)) / (x[-1] - x[0])


def cpr(fractions: Sequence[float], faithfulness: np.ndarray) -> np.ndarray:
    """MIB's CPR: area under faithfulness (last axis) against the fraction of nodes."""
    return _trapezoid(np.asarray(fractions, dtype=np.float64), np.asarray(faithfulness, dtype=np.float64))


def cmd(fractions: Sequence[float], faithfulness: np.ndarray) -> np.ndarray:
    """MIB's CMD: area between faithfulness (last axis) and 1 against the fraction of nodes."""
    f = np.asarray(faithfulness, dtype=np.float64)
    return _trapezoid(np.asarray(fractions, dtype=np.float64), np.abs(1.0 - f))


# --------------------------------------------------------------------------------------------------
# Circuits of a given size


def _ranked_sites(dense: Mapping[str, Tensor], sites: Sequence[Site], free_layers: int) -> list[Site]:
    return [s for s in sites if not is_free(s, free_layers) and s.name in dense]


def ranked_selections(
    dense: Mapping[str, Tensor],
    sites: Sequence[Site],
    free_layers: int,
    sizes: Sequence[int],
    *,
    ranked_only: Mapping[str, Tensor] | None = None,
) -> dict[int, dict[str, Tensor]]:
    """Per size ``k`` the selection of the ``k`` nodes of largest ``|effect|`` outside the free
    layers (``{site: (P, F + 1) bool}``, every site present; free sites select nothing). Ties keep
    site order, then position, then index. ``ranked_only`` restricts the ranking to those nodes
    (the stored ones, when no effects file gives every node's effect)."""
    ranked = _ranked_sites(dense, sites, free_layers)
    flat = [dense[s.name].abs().reshape(-1).double() for s in ranked]
    allowed = (
        None
        if ranked_only is None
        else torch.cat([ranked_only[s.name].reshape(-1) for s in ranked])
        if ranked
        else torch.zeros(0, dtype=torch.bool)
    )
    values = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    order = torch.sort(values, descending=True, stable=True).indices
    if allowed is not None:
        order = order[allowed[order]]
    out: dict[int, dict[str, Tensor]] = {}
    for k in sizes:
        if k < 0:
            raise EvaluationError(f"circuit size must be >= 0, got {k}")
        if k > order.numel():
            raise EvaluationError(f"circuit size {k} above the {order.numel()} nodes that can be ranked")
        chosen = torch.zeros(values.numel(), dtype=torch.bool)
        chosen[order[:k]] = True
        sel: dict[str, Tensor] = {}
        start = 0
        for s in ranked:
            n = dense[s.name].numel()
            sel[s.name] = chosen[start : start + n].view(dense[s.name].shape)
            start += n
        for s in sites:
            if s.name not in sel and s.name in dense:
                sel[s.name] = torch.zeros_like(dense[s.name], dtype=torch.bool)
        out[int(k)] = sel
    return out


def site_counts(selection: Mapping[str, Tensor], sites: Sequence[Site], free_layers: int) -> dict[str, int]:
    """Selected nodes per site outside the free layers."""
    return {s.name: int(selection[s.name].sum()) for s in sites if not is_free(s, free_layers)}


def random_selection(
    like: Mapping[str, Tensor],
    sites: Sequence[Site],
    free_layers: int,
    counts: Mapping[str, int],
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """A random selection with ``counts[site]`` nodes at each site outside the free layers, drawn
    uniformly without replacement among the site's ``P * (F + 1)`` nodes (error nodes included);
    ``like`` gives each site's ``(P, F + 1)`` shape. Free sites select nothing."""
    out: dict[str, Tensor] = {}
    for s in sites:
        shape = like[s.name].shape
        sel = torch.zeros(shape.numel(), dtype=torch.bool)
        if not is_free(s, free_layers):
            c = int(counts.get(s.name, 0))
            if not 0 <= c <= sel.numel():
                raise EvaluationError(f"random circuit: {c} nodes asked at site {s.name} of {sel.numel()}")
            sel[torch.randperm(sel.numel(), generator=generator)[:c]] = True
        out[s.name] = sel.view(shape)
    return out


# --------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_counts(n_examples: int, draws: int, seed: int) -> np.ndarray:
    """``(draws, n_examples)`` counts: how often each example is in each resample (with replacement,
    ``n_examples`` per resample), from a seeded generator."""
    if n_examples < 1 or draws < 1:
        raise EvaluationError(f"bootstrap needs examples and draws, got {n_examples} and {draws}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=draws).astype(np.float64)


def resampled_means(per_example: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row of ``per_example`` ``(c, n)`` its mean in every resample of ``counts`` ``(R, n)``:
    ``(c, R)``."""
    return per_example @ counts.T / counts.sum(1)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> np.ndarray:
    """The central ``level`` percentile interval of ``samples`` along the last axis, ignoring NaN
    (all-NaN gives NaN): ``(..., 2)``."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    s = np.asarray(samples, dtype=np.float64)
    out = np.full((*s.shape[:-1], 2), np.nan)
    ok = ~np.all(np.isnan(s), axis=-1)
    if ok.any():
        out[ok] = np.stack([np.nanpercentile(s[ok], lo, axis=-1), np.nanpercentile(s[ok], hi, axis=-1)], -1)
    return out
