"""Exact node effects by activation patching (docs/algorithms.md, "Methods"): ground truth.

IE(node) = m(clean | do(node <- node(patch))) - m(clean). A patched node changes the site output by
delta = decode(f with f_i <- f_i(patch)) - decode(f) for a feature, and by err(patch) - err(clean) for
the error node; downstream sites are not spliced (an SAE with its error node is the identity), so the
patched forward runs the clean input with x_site + delta at the node's position. One row per node;
``chunk_size`` single-node patches are stacked along the batch dimension of one forward. Only nodes
with a nonzero delta are run (the others have IE exactly 0).
"""

from __future__ import annotations

import math
import time

import torch

from feature_circuits.attribution.forward import clean_and_patch
from feature_circuits.attribution.registry import (
    ExactOptions,
    MethodOptions,
    MethodSpec,
    NodeRequest,
    options_as,
    register,
)
from feature_circuits.attribution.results import NodeEffects, SiteState
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import Method

__all__ = ["exact_node_effects"]


def exact_node_effects(req: NodeRequest, options: MethodOptions) -> NodeEffects:
    """Exact node effects of one batch. ``options.max_nodes``: per site, patch at most this many
    feature nodes (largest |delta| first; every error node is always patched); the skipped features
    get NaN. ``options.chunk_size``: single-node patches per forward."""
    opts = options_as(ExactOptions, options, Method.EXACT)
    max_nodes, chunk_size = opts.max_nodes, opts.chunk_size
    t0 = time.perf_counter()
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    run = clean_and_patch(loaded, dictionaries, batch, site_list, metric, req.counterfactual)
    clean, patch, metric_clean = run.clean, run.patch, run.metric_clean
    lm = loaded.lm
    effects: dict[str, torch.Tensor] = {}
    deltas: dict[str, SiteState] = {}
    n_forwards = 0
    for s in site_list:
        ae = dictionaries[s.name]
        c, p = clean[s.name], patch[s.name]
        delta = p - c
        deltas[s.name] = delta
        b, seq, n_feat = c.f.shape
        eff = torch.zeros(b, seq, n_feat + 1, dtype=c.f.dtype, device=c.f.device)
        feat_nodes = (delta.f != 0).nonzero()  # (N, 3): example, position, feature
        if max_nodes is not None and feat_nodes.shape[0] > max_nodes:
            mag = delta.f[feat_nodes[:, 0], feat_nodes[:, 1], feat_nodes[:, 2]].abs()
            keep = torch.argsort(-mag, stable=True)[:max_nodes]
            skipped = torch.ones(feat_nodes.shape[0], dtype=torch.bool, device=mag.device)
            skipped[keep] = False
            sk = feat_nodes[skipped]
            eff[sk[:, 0], sk[:, 1], sk[:, 2]] = math.nan
            feat_nodes = feat_nodes[keep.sort().values]
        err_nodes = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(seq), indexing="ij"), -1).view(
            -1, 2
        )
        err_nodes = torch.cat(
            [err_nodes.to(feat_nodes.device), torch.full((b * seq, 1), n_feat, device=feat_nodes.device)], 1
        )
        nodes = torch.cat([feat_nodes, err_nodes], 0)
        for start in range(0, nodes.shape[0], chunk_size):
            chunk = nodes[start : start + chunk_size]
            e, pos, j = chunk[:, 0], chunk[:, 1], chunk[:, 2]
            with torch.no_grad():
                vec = torch.zeros(chunk.shape[0], c.err.shape[-1], dtype=c.err.dtype, device=c.err.device)
                is_f = j < n_feat
                if is_f.any():
                    fe, fp, fj = e[is_f], pos[is_f], j[is_f]
                    f0 = c.f[fe, fp].clone()
                    f1 = f0.clone()
                    r = torch.arange(f1.shape[0], device=f1.device)
                    f1[r, fj] = p.f[fe, fp, fj]
                    vec[is_f] = ae.decode(f1) - ae.decode(f0)
                ie = ~is_f
                if ie.any():
                    vec[ie] = delta.err[e[ie], pos[ie]]
                add = torch.zeros(
                    chunk.shape[0], seq, c.err.shape[-1], dtype=c.err.dtype, device=c.err.device
                )
                add[torch.arange(chunk.shape[0], device=add.device), pos] = vec
            sub = batch.select(e.cpu())
            with lm.trace(sub.clean.to(loaded.device)):
                x = get_activation(lm, s)
                set_activation(lm, s, x + add)
                logits = save(lm.output.logits)
            n_forwards += 1
            with torch.no_grad():
                m = metric(logits.detach(), sub)
            eff[e, pos, j] = (m - metric_clean[e.to(metric_clean.device)]).to(eff.dtype)
        effects[s.name] = eff
    return NodeEffects(
        method=Method.EXACT,
        effects=effects,
        deltas=deltas,
        grads=None,
        clean=clean,
        metric_clean=metric_clean,
        metric_patch=run.metric_patch,
        timing_s={"total": time.perf_counter() - t0, "forwards": float(n_forwards)},
    )


SPEC = register(
    MethodSpec(
        method=Method.EXACT, options=ExactOptions, node_effects=exact_node_effects, has_gradients=False
    )
)
