"""Attribution patching, atp (docs/algorithms.md, "Methods").

IE(node) ~= (node(patch) - node(clean)) . dm/d(node) at clean: the first-order estimate of the
exact patching effect, from one clean forward with every dictionary spliced in as gradient leaves,
one backward, and one patch forward. :func:`gradient_node_effects` is that computation with an
optional set of LRP rules in force during the clean forward; relevance patching
(:mod:`.relp`) is the same computation with the rules on.
"""

from __future__ import annotations

import time

import torch

from feature_circuits.attribution.forward import patch_states, spliced_clean_forward
from feature_circuits.attribution.registry import (
    AtpOptions,
    MethodOptions,
    MethodSpec,
    NodeRequest,
    options_as,
    register,
)
from feature_circuits.attribution.results import NodeEffects, SiteState
from feature_circuits.types import LRPConfig, Method

__all__ = ["atp_node_effects", "gradient_node_effects"]


def gradient_node_effects(req: NodeRequest, *, lrp: LRPConfig | None, method: Method) -> NodeEffects:
    """delta . g per node, with g the gradient of the metric at clean (with ``lrp`` rules in force
    during the forward: their propagation coefficients)."""
    t0 = time.perf_counter()
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    leaves, logits = spliced_clean_forward(loaded, dictionaries, batch.clean, site_list, lrp=lrp)
    m = metric(logits, batch)
    flat = [t for s in site_list for t in leaves[s.name]]
    grads_flat = torch.autograd.grad(m.sum(), flat, allow_unused=True)
    clean: dict[str, SiteState] = {}
    grads: dict[str, SiteState] = {}
    for i, s in enumerate(site_list):
        f, err = leaves[s.name]
        gf, gerr = grads_flat[2 * i], grads_flat[2 * i + 1]
        clean[s.name] = SiteState(f.detach(), err.detach())
        grads[s.name] = SiteState(
            torch.zeros_like(f) if gf is None else gf.detach(),
            torch.zeros_like(err) if gerr is None else gerr.detach(),
        )
    metric_clean = m.detach()
    patch, metric_patch = patch_states(
        loaded, dictionaries, batch, site_list, clean, metric, req.counterfactual
    )
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


def atp_node_effects(req: NodeRequest, options: MethodOptions) -> NodeEffects:
    """atp node effects of one batch (plain gradients: every LRP rule off)."""
    options_as(AtpOptions, options, Method.ATP)
    return gradient_node_effects(req, lrp=None, method=Method.ATP)


SPEC = register(MethodSpec(method=Method.ATP, options=AtpOptions, node_effects=atp_node_effects))
