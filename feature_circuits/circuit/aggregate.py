"""Aggregation of per-batch node and edge effects into one effect per node and per edge
(docs/algorithms.md, "Aggregation and the circuit graph").

    agg_nodes = aggregate_nodes(per_batch_node_effects, "sum")     # AggregatedNodes
    agg_edges = aggregate_edges(per_batch_edge_effects, "sum")     # {(up, down): sparse tensor}

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

__all__ = ["AggregatedNodes", "aggregate_edges", "aggregate_nodes", "as_aggregation"]


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


def aggregate_nodes(
    batches: Sequence[NodeEffects], aggregation: Aggregation | str = Aggregation.SUM
) -> AggregatedNodes:
    """Combine per-batch node effects (each ``effects[site]`` of shape (b, s, F+1)) into one
    example-weighted mean per site (see the module docstring for the two aggregations)."""
    agg = as_aggregation(aggregation)
    if not batches:
        raise CircuitError("no batches to aggregate")
    sites = list(batches[0].effects)
    if agg is Aggregation.NONE:
        _check_lengths((next(iter(b.effects.values())).shape[1] for b in batches), "batches")
    totals: dict[str, Tensor] = {}
    n = 0
    total_effect = 0.0
    timing: dict[str, float] = {}
    for i, b in enumerate(batches):
        if list(b.effects) != sites:
            raise CircuitError(f"batch {i} has sites {list(b.effects)}, batch 0 has {sites}")
        bsz = None
        for site, eff in b.effects.items():
            if eff.dim() != 3:
                raise CircuitError(
                    f"batch {i}, site {site}: expected effects of shape (b, s, F+1), got {tuple(eff.shape)}"
                )
            bsz = eff.shape[0] if bsz is None else bsz
            if eff.shape[0] != bsz:
                raise CircuitError(f"batch {i}: sites disagree on the batch size")
            part = eff.detach().to(torch.float64)
            part = part.sum(dim=(0, 1)) if agg is Aggregation.SUM else part.sum(dim=0)
            if site in totals and totals[site].shape != part.shape:
                raise CircuitError(
                    f"batch {i}, site {site}: shape {tuple(part.shape)} != {tuple(totals[site].shape)}"
                )
            totals[site] = totals[site] + part.cpu() if site in totals else part.cpu()
        n += int(bsz or 0)
        total_effect += float(b.total_effect.detach().to(torch.float64).sum())
        for k, v in b.timing_s.items():
            timing[k] = timing.get(k, 0.0) + float(v)
    if n == 0:
        raise CircuitError("no examples to aggregate")
    return AggregatedNodes(
        aggregation=agg,
        effects={s: (t / n).to(torch.float32) for s, t in totals.items()},
        num_examples=n,
        total_effect=total_effect / n,
        timing_s=timing,
    )


def aggregate_edges(
    batches: Sequence[EdgeEffects], aggregation: Aggregation | str = Aggregation.SUM
) -> dict[tuple[str, str], Tensor]:
    """Combine per-batch edge effects into an example-weighted mean per site pair.

    Input ``edges[(up, down)]``: (b, s_down, F_down+1, s_up, F_up+1), sparse or dense. Output:
    a coalesced sparse tensor (F_down+1, F_up+1) under ``sum`` (both position axes summed), or
    (s_down, F_down+1, s_up, F_up+1) under ``none``; entry [j, k] is the edge k -> j. The logit
    entries (``(last_resid, "logit")``) are skipped: the sink's edges come from the node effects.
    """
    agg = as_aggregation(aggregation)
    if not batches:
        raise CircuitError("no batches to aggregate")
    totals: dict[tuple[str, str], Tensor] = {}
    n_examples = 0
    for i, b in enumerate(batches):
        bsz = None
        for key, t in b.edges.items():
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
            t = (t if t.is_sparse else t.to_sparse()).cpu()
            t = t.coalesce() if not t.is_coalesced() else t
            keep = [2, 4] if agg is Aggregation.SUM else [1, 2, 3, 4]  # axes that survive the sum
            # summing over axes = dropping those index rows and coalescing (duplicates add up)
            part = torch.sparse_coo_tensor(
                t.indices()[keep],
                t.values().to(torch.float64),
                tuple(t.shape[a] for a in keep),
                check_invariants=False,
            ).coalesce()
            if key in totals:
                if totals[key].shape != part.shape:
                    what = "lengths differ" if agg is Aggregation.NONE else "shapes differ"
                    raise CircuitError(
                        f"batch {i}, edge {key}: shape {tuple(part.shape)} != {tuple(totals[key].shape)} "
                        f"({what}; aggregation 'none' needs examples of equal length)"
                    )
                totals[key] = totals[key] + part
            else:
                totals[key] = part
        n_examples += int(bsz or 0)
    if n_examples == 0:
        return {}
    return {k: (v / n_examples).coalesce().to(torch.float32) for k, v in totals.items()}
