"""Typed results shared by every attribution method (docs/algorithms.md, "Methods" and
"Edge effects").

Node indexing at a site with F features follows :func:`feature_circuits.types.error_index`: flat
index ``0..F-1`` are features, index ``F`` is the site's error node. Tensors keep the batch (b) and
position (s) axes; aggregation is done later (:mod:`feature_circuits.circuit.aggregate`).

A site's state is dense (:class:`SiteState`, features (b, s, F)) or sparse
(:class:`SparseSiteState`, features kept only where they are active in the clean or the patch
input of an (example, position), in a flat (row, feature) layout): the sparse feature path of
:mod:`feature_circuits.attribution.forward`. Both expose ``f`` (dense features, materialised on
demand for a sparse state), ``err``, ``shape`` and ``node_product``; :meth:`NodeEffects.dense`
turns a sparse result into a dense one for readers that want plain tensors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from feature_circuits.types import Method

__all__ = [
    "EdgeEffects",
    "NodeEffects",
    "SiteState",
    "SparseSiteState",
    "State",
    "dense_effects",
    "effect_values",
    "row_offsets",
]


@dataclass(frozen=True)
class SiteState:
    """Features ``f`` (b, s, F) and error ``err`` (b, s, d) of one site (or a delta / gradient of them)."""

    f: Tensor
    err: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """(b, s, F) of the features."""
        b, s, n = self.f.shape
        return int(b), int(s), int(n)

    @property
    def n_features(self) -> int:
        return int(self.f.shape[-1])

    def __sub__(self, other: State) -> SiteState:
        return SiteState(self.f - other.f, self.err - other.err)

    def detach(self) -> SiteState:
        return SiteState(self.f.detach(), self.err.detach())

    def dense(self) -> SiteState:
        return self

    def node_product(self, other: State) -> Tensor:
        """(b, s, F+1): elementwise product for features, dot product over d for the error node."""
        return torch.cat([self.f * other.f, (self.err * other.err).sum(-1, keepdim=True)], dim=-1)


@dataclass(frozen=True)
class SparseSiteState:
    """A site's state with sparse features in a flat (row, feature) layout: slot ``i`` is feature
    ``col[i]`` of row ``row[i] = e * s + p`` (example ``e``, position ``p``) with value
    ``values[i]``; rows ascend and, within a row, features ascend (the order of ``nonzero`` on a
    (b*s, F) mask, i.e. a CSR matrix). ``err`` (b, s, d) is dense, ``n_features`` is F.

    Every state of one site in one batch (clean, patch, delta, gradient) shares one ``row`` /
    ``col``: the features active in the clean or the patch input of that row, so arithmetic is
    slot by slot. Nothing is padded: memory is O(active slots + b s d).
    """

    row: Tensor
    col: Tensor
    values: Tensor
    err: Tensor
    n_features: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(b, s, F) of the (dense) features."""
        b, s, _ = self.err.shape
        return int(b), int(s), int(self.n_features)

    @property
    def n_rows(self) -> int:
        """b * s."""
        b, s, _ = self.shape
        return b * s

    @property
    def crow(self) -> Tensor:
        """(b*s + 1,) CSR row offsets: row ``r``'s slots are ``crow[r]:crow[r+1]``."""
        return row_offsets(self.row, self.n_rows)

    @property
    def f(self) -> Tensor:
        """The dense (b, s, F) features (materialised: O(b s F) memory; for readers only)."""
        b, s, n = self.shape
        out = torch.zeros(b * s, n, dtype=self.values.dtype, device=self.values.device)
        return out.index_put_((self.row, self.col), self.values).view(b, s, n)

    def _check_same_index(self, other: State) -> SparseSiteState:
        if not isinstance(other, SparseSiteState):
            raise TypeError("a sparse site state combines only with a sparse one of the same site")
        same = (other.row is self.row or torch.equal(other.row, self.row)) and (
            other.col is self.col or torch.equal(other.col, self.col)
        )
        if not same:
            raise ValueError("sparse site states of one site must share one feature index")
        return other

    def with_values(self, values: Tensor, err: Tensor) -> SparseSiteState:
        """A state on the same slots with other ``values`` (n,) and ``err`` (b, s, d)."""
        return SparseSiteState(self.row, self.col, values, err, self.n_features)

    def __sub__(self, other: State) -> SparseSiteState:
        other = self._check_same_index(other)
        return self.with_values(self.values - other.values, self.err - other.err)

    def detach(self) -> SparseSiteState:
        return self.with_values(self.values.detach(), self.err.detach())

    def dense(self) -> SiteState:
        return SiteState(self.f, self.err)

    def values_at(self, e: Tensor, p: Tensor, j: Tensor) -> Tensor:
        """Feature values at nodes (e[i], p[i], j[i]) (0 where feature j is not a slot of the row)."""
        _, s, n = self.shape
        if self.col.numel() == 0:
            return torch.zeros(e.shape[0], dtype=self.values.dtype, device=self.values.device)
        keys = self.row * n + self.col  # strictly increasing: rows ascend, features ascend in a row
        want = (e * s + p) * n + j
        at = torch.searchsorted(keys, want).clamp(max=keys.shape[0] - 1)
        hit = keys[at] == want
        return torch.where(hit, self.values[at], torch.zeros_like(self.values[at]))

    def node_product(self, other: State) -> Tensor:
        """Sparse COO (b, s, F+1), coalesced: slotwise product for features (every slot is an
        entry), dot product over d for the error node (index F, one entry per row)."""
        other = self._check_same_index(other)
        b, s, n = self.shape
        feat = self.values * other.values
        err = (self.err * other.err).sum(-1).reshape(-1)
        rows = torch.arange(b * s, device=err.device)
        idx = torch.cat(
            [
                torch.stack([self.row // s, self.row % s, self.col]),
                torch.stack([rows // s, rows % s, torch.full_like(rows, n)]),
            ],
            1,
        )
        vals = torch.cat([feat, err])
        return torch.sparse_coo_tensor(idx, vals, (b, s, n + 1), check_invariants=False).coalesce()


def row_offsets(row: Tensor, n_rows: int) -> Tensor:
    """(n_rows + 1,) CSR offsets of a sorted flat ``row`` index (slots of row r: [out[r], out[r+1]))."""
    counts = torch.bincount(row, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


#: A site's state on either feature path.
State = SiteState | SparseSiteState


def dense_effects(t: Tensor) -> Tensor:
    """A node-effect tensor (b, s, F+1) as a dense tensor (sparse COO input is densified)."""
    return t.to_dense() if t.is_sparse else t


def effect_values(t: Tensor) -> Tensor:
    """The stored values of a node-effect tensor, 1-D: every entry of a dense tensor, the explicit
    entries of a sparse COO one (the others are exactly 0). For thresholds and counts of
    ``|effect| > threshold`` (threshold >= 0) without densifying."""
    return t.coalesce().values() if t.is_sparse else t.reshape(-1)


@dataclass(kw_only=True)
class NodeEffects:
    """Per-site node effects of one batch.

    ``effects[site]``: (b, s, F+1) indirect effect estimates (error node last): dense, or a
    coalesced sparse COO tensor on the sparse feature path (entries: the features active in the
    clean or the patch input of each row, and every error node).
    ``deltas[site]``: patch minus clean state (for no-counterfactual mode: minus clean).
    ``grads[site]``: dm/d(state) at clean (atp), IG-averaged (ig), LRP propagation coefficient (relp);
    None for exact.
    ``clean[site]``: clean state.
    ``metric_clean`` / ``metric_patch``: (b,) metric on clean / patch inputs;
    ``total_effect`` = patch - clean.
    """

    method: Method
    effects: dict[str, Tensor]
    deltas: Mapping[str, State]
    grads: Mapping[str, State] | None
    clean: Mapping[str, State]
    metric_clean: Tensor
    metric_patch: Tensor
    timing_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_gradients(
        cls,
        method: Method,
        *,
        clean: Mapping[str, State],
        grads: Mapping[str, State],
        deltas: Mapping[str, State],
        metric_clean: Tensor,
        metric_patch: Tensor,
        t0: float,
    ) -> NodeEffects:
        """A gradient method's result: every site's effect is ``grads[site] . deltas[site]`` (node
        by node, :meth:`SiteState.node_product`); ``timing_s["total"]`` counts from ``t0``
        (``time.perf_counter()``)."""
        return cls(
            method=method,
            effects={k: grads[k].node_product(deltas[k]) for k in clean},
            deltas=deltas,
            grads=grads,
            clean=clean,
            metric_clean=metric_clean,
            metric_patch=metric_patch,
            timing_s={"total": time.perf_counter() - t0},
        )

    @property
    def total_effect(self) -> Tensor:
        return self.metric_patch - self.metric_clean

    @property
    def is_sparse(self) -> bool:
        """True when any site is on the sparse feature path."""
        return any(t.is_sparse for t in self.effects.values()) or any(
            isinstance(v, SparseSiteState) for v in self.clean.values()
        )

    def dense(self) -> NodeEffects:
        """The same result with every tensor dense (itself when it is dense already)."""
        if not self.is_sparse:
            return self
        return NodeEffects(
            method=self.method,
            effects={k: dense_effects(v) for k, v in self.effects.items()},
            deltas={k: v.dense() for k, v in self.deltas.items()},
            grads=None if self.grads is None else {k: v.dense() for k, v in self.grads.items()},
            clean={k: v.dense() for k, v in self.clean.items()},
            metric_clean=self.metric_clean,
            metric_patch=self.metric_patch,
            timing_s=dict(self.timing_s),
        )


@dataclass(kw_only=True)
class EdgeEffects:
    """Edge effects of one batch between direct-path site pairs.

    ``edges[(up, down)]``: a sparse COO tensor of shape (b, s_down, F_down+1, s_up, F_up+1): the
    effect of upstream node (s_up, k) on downstream node (s_down, j) in each example, for the
    downstream nodes selected by the node threshold. ``edges[(last_resid, LOGIT_ID)]``: (b, s, F+1),
    the node effect of the last residual site (dense, or sparse COO on the sparse feature path).
    """

    method: Method
    edges: dict[tuple[str, str], Tensor]
    timing_s: dict[str, float] = field(default_factory=dict)
