"""Aggregation of per-batch node and edge effects into one effect per node and per edge
(docs/algorithms.md, "Aggregation and the circuit graph").

    agg_nodes = aggregate_nodes(per_batch_node_effects, "sum")     # AggregatedNodes
    agg_edges = aggregate_edges(per_batch_edge_effects, "sum")     # {(up, down): sparse tensor}

The accumulators are the streaming form of the same two functions: :class:`NodeAccumulator` and
:class:`EdgeAccumulator` take one batch at a time (``.add(batch)``) and hold only per-site float64
sums (never a per-example tensor), so ``.result()`` after adding every batch equals
``aggregate_nodes`` / ``aggregate_edges`` on the list (they are implemented on the accumulators).
Node effects may be dense (b, s, F+1) tensors or sparse COO tensors of that shape (the sparse
feature path, :mod:`feature_circuits.attribution.forward`); both sum to the same dense (F+1,).

Aggregation ``sum``: node effects summed over positions, then averaged over examples -> (F+1,) per
site; edges summed over both position axes and averaged over examples -> (F_down+1, F_up+1).
Aggregation ``none``: averaged over examples keeping positions -> (s, F+1) per site and
(s_down, F_down+1, s_up, F_up+1) per edge (all examples must have the same length). Batches
combine as an example-weighted mean: the sum over every example, divided by the number of
examples (not the mean of the batch means). The error node is the last index of each per-site
axis (:func:`feature_circuits.types.error_index`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from feature_circuits.errors import CircuitError
from feature_circuits.types import LOGIT_ID, Aggregation

if TYPE_CHECKING:
    from feature_circuits.attribution.results import EdgeEffects, NodeEffects

__all__ = [
    "AggregatedNodes",
    "EdgeAccumulator",
    "NodeAccumulator",
    "aggregate_edges",
    "aggregate_nodes",
    "as_aggregation",
]


def as_aggregation(aggregation: Aggregation | str) -> Aggregation:
    """``aggregation`` as the enum; :class:`CircuitError` naming the choices otherwise."""
    try:
        return Aggregation(aggregation)
    except ValueError:
        raise CircuitError(
            f"unknown aggregation {aggregation!r}; choose one of {[a.value for a in Aggregation]}"
        ) from None


@dataclass(frozen=True, kw_only=True)
class AggregatedNodes:
    """Aggregated node effects: ``effects[site]`` is (F+1,) under ``sum`` or (s, F+1) under ``none``
    (error node last). ``total_effect`` is the mean of m(patch) - m(clean) over the examples."""

    aggregation: Aggregation
    effects: dict[str, Tensor]
    num_examples: int
    total_effect: float
    timing_s: dict[str, float] = field(default_factory=dict)


def _check_lengths(seq_lens: Iterable[int], what: str) -> None:
    lens = sorted(set(seq_lens))
    if len(lens) > 1:
        raise CircuitError(
            f"aggregation 'none' keeps positions and needs examples of equal length, but the {what} have "
            f"lengths {lens}; use aggregation 'sum' or a dataset whose examples all have one length"
        )


def _sum_node_effects(eff: Tensor, agg: Aggregation) -> Tensor:
    """Float64 sum of one site's (b, s, F+1) effects over examples (and positions under ``sum``),
    dense or sparse COO input; a dense (F+1,) or (s, F+1) result on the input's device."""
    if eff.is_sparse:
        t = eff.detach().coalesce()
        idx, vals = t.indices(), t.values().to(torch.float64)
        if agg is Aggregation.SUM:
            out = torch.zeros(t.shape[2], dtype=torch.float64, device=vals.device)
            return out.index_add_(0, idx[2], vals)
        s, width = t.shape[1], t.shape[2]
        out = torch.zeros(s * width, dtype=torch.float64, device=vals.device)
        return out.index_add_(0, idx[1] * width + idx[2], vals).reshape(s, width)
    part = eff.detach().to(torch.float64)
    return part.sum(dim=(0, 1)) if agg is Aggregation.SUM else part.sum(dim=0)


class NodeAccumulator:
    """Streaming :func:`aggregate_nodes`: ``add`` one batch's :class:`NodeEffects` at a time, then
    ``result()``. Holds one float64 (F+1,) (``sum``) or (s, F+1) (``none``) sum per site, the example
    count, the summed total effect and the summed timings -- nothing per example."""

    def __init__(self, aggregation: Aggregation | str = Aggregation.SUM) -> None:
        self.aggregation = as_aggregation(aggregation)
        self._sites: list[str] | None = None
        self._totals: dict[str, Tensor] = {}
        self._n = 0
        self._total_effect = 0.0
        self._timing: dict[str, float] = {}
        self._batches = 0
        self._seq_lens: set[int] = set()

    @property
    def num_examples(self) -> int:
        return self._n

    def add(self, batch: NodeEffects) -> None:
        """Add one batch (each ``effects[site]`` of shape (b, s, F+1), dense or sparse COO)."""
        i, agg = self._batches, self.aggregation
        if self._sites is None:
            self._sites = list(batch.effects)
        elif list(batch.effects) != self._sites:
            raise CircuitError(f"batch {i} has sites {list(batch.effects)}, batch 0 has {self._sites}")
        if agg is Aggregation.NONE and batch.effects:
            self._seq_lens.add(int(next(iter(batch.effects.values())).shape[1]))
            _check_lengths(self._seq_lens, "batches")
        bsz = None
        parts: dict[str, Tensor] = {}
        for site, eff in batch.effects.items():
            if eff.dim() != 3:
                raise CircuitError(
                    f"batch {i}, site {site}: expected effects of shape (b, s, F+1), got {tuple(eff.shape)}"
                )
            bsz = eff.shape[0] if bsz is None else bsz
            if eff.shape[0] != bsz:
                raise CircuitError(f"batch {i}: sites disagree on the batch size")
            part = _sum_node_effects(eff, agg).cpu()
            if site in self._totals and self._totals[site].shape != part.shape:
                raise CircuitError(
                    f"batch {i}, site {site}: shape {tuple(part.shape)} != {tuple(self._totals[site].shape)}"
                )
            parts[site] = part
        for site, part in parts.items():
            self._totals[site] = self._totals[site] + part if site in self._totals else part
        self._n += int(bsz or 0)
        self._total_effect += float(batch.total_effect.detach().to(torch.float64).sum())
        for k, v in batch.timing_s.items():
            self._timing[k] = self._timing.get(k, 0.0) + float(v)
        self._batches += 1

    def merge(self, other: NodeAccumulator) -> None:
        """Add ``other``'s sums into this one (data-parallel ranks: :mod:`feature_circuits.distributed`)."""
        if other.aggregation is not self.aggregation:
            raise CircuitError(
                f"cannot merge aggregation {other.aggregation.value} into {self.aggregation.value}"
            )
        if other._batches == 0:
            return
        if self._sites is None:
            self._sites = list(other._sites or [])
        elif other._sites is not None and other._sites != self._sites:
            raise CircuitError(f"cannot merge sites {other._sites} into {self._sites}")
        for site, part in other._totals.items():
            self._totals[site] = self._totals[site] + part if site in self._totals else part.clone()
        self._n += other._n
        self._total_effect += other._total_effect
        for k, v in other._timing.items():
            self._timing[k] = self._timing.get(k, 0.0) + v
        self._batches += other._batches
        self._seq_lens |= other._seq_lens
        if self.aggregation is Aggregation.NONE:
            _check_lengths(self._seq_lens, "batches")

    def result(self) -> AggregatedNodes:
        """The example-weighted mean per site (as :func:`aggregate_nodes` returns it)."""
        if self._batches == 0:
            raise CircuitError("no batches to aggregate")
        if self._n == 0:
            raise CircuitError("no examples to aggregate")
        n = self._n
        return AggregatedNodes(
            aggregation=self.aggregation,
            effects={s: (t / n).to(torch.float32) for s, t in self._totals.items()},
            num_examples=n,
            total_effect=self._total_effect / n,
            timing_s=dict(self._timing),
        )


def aggregate_nodes(
    batches: Sequence[NodeEffects], aggregation: Aggregation | str = Aggregation.SUM
) -> AggregatedNodes:
    """Combine per-batch node effects (each ``effects[site]`` of shape (b, s, F+1), dense or sparse
    COO) into one example-weighted mean per site (see the module docstring for the two
    aggregations); :class:`NodeAccumulator` over the list."""
    acc = NodeAccumulator(aggregation)
    if not batches:
        raise CircuitError("no batches to aggregate")
    if acc.aggregation is Aggregation.NONE:
        _check_lengths((next(iter(b.effects.values())).shape[1] for b in batches), "batches")
    for b in batches:
        acc.add(b)
    return acc.result()


class EdgeAccumulator:
    """Streaming :func:`aggregate_edges`: ``add`` one batch's :class:`EdgeEffects` at a time, then
    ``result()``. Holds one coalesced sparse float64 sum per site pair ((F_down+1, F_up+1) under
    ``sum``) and the example count -- nothing per example."""

    def __init__(self, aggregation: Aggregation | str = Aggregation.SUM) -> None:
        self.aggregation = as_aggregation(aggregation)
        self._totals: dict[tuple[str, str], Tensor] = {}
        self._n = 0
        self._batches = 0

    @property
    def num_examples(self) -> int:
        return self._n

    def add(self, batch: EdgeEffects) -> None:
        """Add one batch (``edges[(up, down)]`` of shape (b, s_down, F_down+1, s_up, F_up+1))."""
        i, agg = self._batches, self.aggregation
        bsz = None
        parts: dict[tuple[str, str], Tensor] = {}
        for key, t in batch.edges.items():
            if key[1] == LOGIT_ID:
                bsz = t.shape[0] if bsz is None else bsz
                continue
            if t.dim() != 5:
                raise CircuitError(
                    f"batch {i}, edge {key}: expected 5 dims (b, s_down, F_down+1, s_up, F_up+1), "
                    f"got {tuple(t.shape)}"
                )
            bsz = t.shape[0] if bsz is None else bsz
            if t.shape[0] != bsz:
                raise CircuitError(f"batch {i}: edge tensors disagree on the batch size")
            t = (t if t.is_sparse else t.to_sparse()).detach().cpu()
            t = t.coalesce() if not t.is_coalesced() else t
            keep = [2, 4] if agg is Aggregation.SUM else [1, 2, 3, 4]  # axes that survive the sum
            # summing over axes = dropping those index rows and coalescing (duplicates add up)
            part = torch.sparse_coo_tensor(
                t.indices()[keep],
                t.values().to(torch.float64),
                tuple(t.shape[a] for a in keep),
                check_invariants=False,
            ).coalesce()
            if key in self._totals and self._totals[key].shape != part.shape:
                what = "lengths differ" if agg is Aggregation.NONE else "shapes differ"
                raise CircuitError(
                    f"batch {i}, edge {key}: shape {tuple(part.shape)} != {tuple(self._totals[key].shape)} "
                    f"({what}; aggregation 'none' needs examples of equal length)"
                )
            parts[key] = part
        for key, part in parts.items():
            self._totals[key] = (self._totals[key] + part).coalesce() if key in self._totals else part
        self._n += int(bsz or 0)
        self._batches += 1

    def merge(self, other: EdgeAccumulator) -> None:
        """Add ``other``'s sums into this one (data-parallel ranks: :mod:`feature_circuits.distributed`)."""
        if other.aggregation is not self.aggregation:
            raise CircuitError(
                f"cannot merge aggregation {other.aggregation.value} into {self.aggregation.value}"
            )
        for key, part in other._totals.items():
            self._totals[key] = (self._totals[key] + part).coalesce() if key in self._totals else part.clone()
        self._n += other._n
        self._batches += other._batches

    def result(self) -> dict[tuple[str, str], Tensor]:
        """The example-weighted mean per site pair (as :func:`aggregate_edges` returns it); ``{}``
        when no examples were added."""
        if self._n == 0:
            return {}
        n = self._n
        return {k: (v / n).coalesce().to(torch.float32) for k, v in self._totals.items()}


def aggregate_edges(
    batches: Sequence[EdgeEffects], aggregation: Aggregation | str = Aggregation.SUM
) -> dict[tuple[str, str], Tensor]:
    """Combine per-batch edge effects into an example-weighted mean per site pair;
    :class:`EdgeAccumulator` over the list.

    Input ``edges[(up, down)]``: (b, s_down, F_down+1, s_up, F_up+1), sparse or dense. Output:
    a coalesced sparse tensor (F_down+1, F_up+1) under ``sum`` (both position axes summed), or
    (s_down, F_down+1, s_up, F_up+1) under ``none``; entry [j, k] is the edge k -> j. The logit
    entries (``(last_resid, "logit")``) are skipped: the sink's edges come from the node effects.
    """
    acc = EdgeAccumulator(aggregation)
    if not batches:
        raise CircuitError("no batches to aggregate")
    for b in batches:
        acc.add(b)
    return acc.result()
