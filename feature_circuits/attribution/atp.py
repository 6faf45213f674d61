"""Attribution patching (atp) and relevance patching (relp), spec section 3.

atp: IE ~= delta . dm/d(node) at clean; relp: the same with the LRP rules active during the clean
forward (so the backward returns propagation coefficients). 2 forwards + 1 backward.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from feature_circuits.attribution.forward import (
    Metric,
    attribution_sites,
    patch_states,
    spliced_clean_forward,
)
from feature_circuits.attribution.results import NodeEffects, SiteState
from feature_circuits.types import LRPConfig, Method


def gradient_node_effects(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    batch: Any,
    *,
    metric: Metric,
    lrp: LRPConfig | None,
    method: Method,
    counterfactual: bool = True,
    sites: list[str] | None = None,
) -> NodeEffects:
    t0 = time.perf_counter()
    site_list = attribution_sites(loaded, dictionaries, sites)
    leaves, logits = spliced_clean_forward(loaded, dictionaries, batch.clean, site_list, lrp=lrp)
    m = metric(logits, batch)
    flat = [t for s in site_list for t in leaves[s.name]]
    grads_flat = torch.autograd.grad(m.sum(), flat, allow_unused=True)
    clean, grads = {}, {}
    for i, s in enumerate(site_list):
        f, err = leaves[s.name]
        gf, gerr = grads_flat[2 * i], grads_flat[2 * i + 1]
        clean[s.name] = SiteState(f.detach(), err.detach())
        grads[s.name] = SiteState(
            torch.zeros_like(f) if gf is None else gf.detach(),
            torch.zeros_like(err) if gerr is None else gerr.detach(),
        )
    metric_clean = m.detach()
    patch, metric_patch = patch_states(loaded, dictionaries, batch, site_list, clean, metric, counterfactual)
    deltas = {k: patch[k] - clean[k] for k in clean}
    effects = {k: grads[k].node_product(deltas[k]) for k in clean}
    return NodeEffects(
        method=method,
        effects=effects,
        deltas=deltas,
        grads=grads,
        clean=clean,
        metric_clean=metric_clean,
        metric_patch=metric_patch,
        timing_s={"total": time.perf_counter() - t0},
    )


def atp_node_effects(
    loaded,
    dictionaries,
    batch,
    *,
    metric: Metric,
    counterfactual: bool = True,
    sites: list[str] | None = None,
) -> NodeEffects:
    return gradient_node_effects(
        loaded,
        dictionaries,
        batch,
        metric=metric,
        lrp=None,
        method=Method.ATP,
        counterfactual=counterfactual,
        sites=sites,
    )


def relp_node_effects(
    loaded,
    dictionaries,
    batch,
    *,
    metric: Metric,
    lrp: LRPConfig | None = None,
    counterfactual: bool = True,
    sites: list[str] | None = None,
) -> NodeEffects:
    """relp with ``lrp`` rules (default ``LRPConfig()``: LN + Identity + Half, AH off)."""
    return gradient_node_effects(
        loaded,
        dictionaries,
        batch,
        metric=metric,
        lrp=LRPConfig() if lrp is None else lrp,
        method=Method.RELP,
        counterfactual=counterfactual,
        sites=sites,
    )
