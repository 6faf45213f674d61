"""Attribution patching, atp (docs/algorithms.md, "Methods").

IE(node) ~= (node(patch) - node(clean)) . dm/d(node) at clean: the first-order estimate of the
exact patching effect, from one clean forward with every dictionary spliced in as gradient leaves,
one backward, and one patch forward. :func:`gradient_node_effects` is that computation with an
optional set of LRP rules in force during the clean forward; relevance patching
(:mod:`.relp`) is the same computation with the rules on. On the sparse feature path
(:func:`~feature_circuits.attribution.forward.use_sparse`) the clean forward carries one d-wide
gradient leaf per site and the feature gradients are decoder-row gathers (docs/algorithms.md,
"Sparse feature path").
"""

from __future__ import annotations

import time

import torch

from feature_circuits.attribution.forward import (
    SparseDecoder,
    collect_activations,
    patch_states,
    site_output_grads,
    sparse_site_states,
    spliced_clean_forward,
    use_sparse,
    zero_last_resid_logits,
)
from feature_circuits.attribution.registry import (
    AtpOptions,
    MethodOptions,
    MethodSpec,
    NodeRequest,
    options_as,
    register,
)
from feature_circuits.attribution.results import NodeEffects, SiteState, State
from feature_circuits.types import LRPConfig, Method

__all__ = ["atp_node_effects", "gradient_node_effects"]


def gradient_node_effects(req: NodeRequest, *, lrp: LRPConfig | None, method: Method) -> NodeEffects:
    """delta . g per node, with g the gradient of the metric at clean (with ``lrp`` rules in force
    during the forward: their propagation coefficients)."""
    t0 = time.perf_counter()
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    if use_sparse(dictionaries, site_list, req.feature_path):
        return _sparse_gradient_node_effects(req, lrp=lrp, method=method, t0=t0)
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
    return NodeEffects.from_gradients(
        method,
        clean=clean,
        grads=grads,
        deltas=deltas,
        metric_clean=metric_clean,
        metric_patch=metric_patch,
        t0=t0,
    )


def _sparse_gradient_node_effects(
    req: NodeRequest, *, lrp: LRPConfig | None, method: Method, t0: float
) -> NodeEffects:
    """:func:`gradient_node_effects` on the sparse feature path: one clean forward with a d-wide
    gradient leaf per site, one patch forward, then per site (one at a time) the dense encoder on
    both activations, the union of their active features, and the gathered feature gradients."""
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    acts, g_out, metric_clean = site_output_grads(
        loaded, batch.clean, site_list, lambda logits: metric(logits, batch), lrp
    )
    if req.counterfactual:
        acts_p, logits_p = collect_activations(loaded, batch.patch, site_list)
    else:
        acts_p, logits_p = {}, zero_last_resid_logits(loaded, batch.clean)
    with torch.no_grad():
        metric_patch = metric(logits_p, batch).detach()
    clean: dict[str, State] = {}
    grads: dict[str, State] = {}
    deltas: dict[str, State] = {}
    for s in site_list:
        ae = dictionaries[s.name]
        x = acts.pop(s.name)
        c, p, gs = sparse_site_states(
            ae, x, acts_p.pop(s.name, None), SparseDecoder.of(ae, x), grad=g_out.pop(s.name)
        )
        assert gs is not None  # a gradient was given
        clean[s.name], grads[s.name], deltas[s.name] = c, gs, p - c
    return NodeEffects.from_gradients(
        method,
        clean=clean,
        grads=grads,
        deltas=deltas,
        metric_clean=metric_clean,
        metric_patch=metric_patch,
        t0=t0,
    )


def atp_node_effects(req: NodeRequest, options: MethodOptions) -> NodeEffects:
    """atp node effects of one batch (plain gradients: every LRP rule off)."""
    options_as(AtpOptions, options, Method.ATP)
    return gradient_node_effects(req, lrp=None, method=Method.ATP)


SPEC = register(MethodSpec(method=Method.ATP, options=AtpOptions, node_effects=atp_node_effects))
