"""Node and edge attribution (spec sections 3 and 4).

loaded, dicts = load_for_attribution("embedded", "embedded")
nodes = node_effects(loaded, dicts, batch, Method.RELP)
edges = edge_effects(loaded, dicts, batch, nodes, node_threshold=0.1, method=Method.RELP)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from feature_circuits.attribution.forward import (
    Metric,
    SubBatch,
    default_metric,
    logit_diff_metric,
    neg_answer_logit_metric,
)
from feature_circuits.attribution.results import EdgeEffects, NodeEffects, SiteState
from feature_circuits.model.lrp import LRPController, get_lrp_controller, install_lrp
from feature_circuits.types import LRPConfig, Method


def load_for_attribution(
    model: str | os.PathLike | None = None,
    saes: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
):
    """Load a model with the LRP rules installed (all off) and its dictionaries: ``(loaded, dicts)``."""
    from feature_circuits.dictionaries.marks import load_dictionaries
    from feature_circuits.model.loading import load_model

    loaded = load_model(model, device=device, dtype=dtype, before_wrap=install_lrp)
    dicts = load_dictionaries(loaded.sites, saes, device=loaded.device, dtype=loaded.dtype)
    return loaded, dicts


def node_effects(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    batch: Any,
    method: Method | str,
    *,
    metric: Metric | None = None,
    steps: int = 10,
    lrp: LRPConfig | None = None,
    counterfactual: bool = True,
    sites: list[str] | None = None,
    max_nodes: int | None = None,
    chunk_size: int = 128,
) -> NodeEffects:
    """Node effects (b, s, F+1) per site of one batch.

    ``metric(logits (b,s,V), batch) -> (b,)``; default logit(patch answer) - logit(clean answer) at
    the last position, or -logit(clean answer) when ``counterfactual=False`` (zero-ablation mode: the
    patch state is zero features and zero error). ``steps``: IG steps. ``lrp``: relp rules (default
    ``LRPConfig()``). ``sites``: restrict to these site names. ``max_nodes`` / ``chunk_size``: exact only.
    """
    method = Method(method)
    metric = default_metric(counterfactual) if metric is None else metric
    if method is Method.EXACT:
        from feature_circuits.attribution.exact import exact_node_effects

        return exact_node_effects(
            loaded,
            dictionaries,
            batch,
            metric=metric,
            counterfactual=counterfactual,
            sites=sites,
            max_nodes=max_nodes,
            chunk_size=chunk_size,
        )
    if method is Method.ATP:
        from feature_circuits.attribution.atp import atp_node_effects

        return atp_node_effects(
            loaded, dictionaries, batch, metric=metric, counterfactual=counterfactual, sites=sites
        )
    if method is Method.RELP:
        from feature_circuits.attribution.atp import relp_node_effects

        return relp_node_effects(
            loaded, dictionaries, batch, metric=metric, lrp=lrp, counterfactual=counterfactual, sites=sites
        )
    if method is Method.IG:
        from feature_circuits.attribution.ig import ig_node_effects

        return ig_node_effects(
            loaded,
            dictionaries,
            batch,
            metric=metric,
            steps=steps,
            counterfactual=counterfactual,
            sites=sites,
        )
    raise ValueError(f"unknown method {method!r}")


def edge_effects(*args, **kwargs) -> EdgeEffects:
    """See :func:`feature_circuits.attribution.edges.edge_effects`."""
    from feature_circuits.attribution.edges import edge_effects as _edge_effects

    return _edge_effects(*args, **kwargs)


__all__ = [
    "EdgeEffects",
    "LRPConfig",
    "LRPController",
    "Method",
    "Metric",
    "NodeEffects",
    "SiteState",
    "SubBatch",
    "default_metric",
    "edge_effects",
    "get_lrp_controller",
    "install_lrp",
    "load_for_attribution",
    "logit_diff_metric",
    "neg_answer_logit_metric",
    "node_effects",
]
