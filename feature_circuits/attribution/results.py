"""Typed results shared by every attribution method (docs/algorithms.md, "Methods" and
"Edge effects").

Node indexing at a site with F features follows :func:`feature_circuits.types.error_index`: flat
index ``0..F-1`` are features, index ``F`` is the site's error node. Tensors keep the batch (b) and
position (s) axes; aggregation is done later (:mod:`feature_circuits.circuit.aggregate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from feature_circuits.types import Method


@dataclass(frozen=True)
class SiteState:
    """Features ``f`` (b, s, F) and error ``err`` (b, s, d) of one site (or a delta / gradient of them)."""

    f: Tensor
    err: Tensor

    def __sub__(self, other: SiteState) -> SiteState:
        return SiteState(self.f - other.f, self.err - other.err)

    def detach(self) -> SiteState:
        return SiteState(self.f.detach(), self.err.detach())

    def node_product(self, other: SiteState) -> Tensor:
        """(b, s, F+1): elementwise product for features, dot product over d for the error node."""
        return torch.cat([self.f * other.f, (self.err * other.err).sum(-1, keepdim=True)], dim=-1)


@dataclass(kw_only=True)
class NodeEffects:
    """Per-site node effects of one batch.

    ``effects[site]``: (b, s, F+1) indirect effect estimates (error node last).
    ``deltas[site]``: patch minus clean state (for no-counterfactual mode: minus clean).
    ``grads[site]``: dm/d(state) at clean (atp), IG-averaged (ig), LRP propagation coefficient (relp);
    None for exact.
    ``clean[site]``: clean state.
    ``metric_clean`` / ``metric_patch``: (b,) metric on clean / patch inputs;
    ``total_effect`` = patch - clean.
    """

    method: Method
    effects: dict[str, Tensor]
    deltas: dict[str, SiteState]
    grads: dict[str, SiteState] | None
    clean: dict[str, SiteState]
    metric_clean: Tensor
    metric_patch: Tensor
    timing_s: dict[str, float] = field(default_factory=dict)

    @property
    def total_effect(self) -> Tensor:
        return self.metric_patch - self.metric_clean


@dataclass(kw_only=True)
class EdgeEffects:
    """Edge effects of one batch between direct-path site pairs.

    ``edges[(up, down)]``: a sparse COO tensor of shape (b, s_down, F_down+1, s_up, F_up+1): the
    effect of upstream node (s_up, k) on downstream node (s_down, j) in each example, for the
    downstream nodes selected by the node threshold. ``edges[(last_resid, LOGIT_ID)]``: dense
    (b, s, F+1), the node effect of the last residual site.
    """

    method: Method
    edges: dict[tuple[str, str], Tensor]
    timing_s: dict[str, float] = field(default_factory=dict)
