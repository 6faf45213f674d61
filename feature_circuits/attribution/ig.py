"""Integrated gradients node effects (Marks et al.; docs/algorithms.md, "Methods").

Per site separately (other sites not spliced): z_a = (1-a) clean + a patch for the features AND the
error, a = k/steps, k = 0..steps-1; the clean input runs with the site output set to
decode(z.f) + z.err; IE = mean_a(dm/dz) . delta. The steps are stacked along the batch dimension
(``max_rows`` rows per forward).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from feature_circuits.attribution.forward import clean_and_patch
from feature_circuits.attribution.registry import (
    IGOptions,
    MethodOptions,
    MethodSpec,
    NodeRequest,
    options_as,
    register,
)
from feature_circuits.attribution.results import NodeEffects, SiteState
from feature_circuits.dictionaries import splice_patched
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import Method

__all__ = ["ig_node_effects"]


def ig_node_effects(req: NodeRequest, options: MethodOptions) -> NodeEffects:
    """IG node effects of one batch with ``options.steps`` steps, ``options.max_rows`` rows per
    forward."""
    opts = options_as(IGOptions, options, Method.IG)
    steps = opts.steps
    t0 = time.perf_counter()
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    run = clean_and_patch(loaded, dictionaries, batch, site_list, metric, req.counterfactual)
    clean, patch = run.clean, run.patch
    b = batch.clean.shape[0]
    lm = loaded.lm
    steps_per_chunk = max(1, opts.max_rows // max(b, 1))
    grads: dict[str, SiteState] = {}
    deltas: dict[str, SiteState] = {}
    effects: dict[str, Tensor] = {}
    for s in site_list:
        ae = dictionaries[s.name]
        c, p = clean[s.name], patch[s.name]
        gf_sum = torch.zeros_like(c.f)
        gerr_sum = torch.zeros_like(c.err)
        for k0 in range(0, steps, steps_per_chunk):
            ks = list(range(k0, min(steps, k0 + steps_per_chunk)))
            n = len(ks)
            alpha = torch.tensor([k / steps for k in ks], dtype=c.f.dtype, device=c.f.device).view(n, 1, 1, 1)
            zf = ((1 - alpha) * c.f + alpha * p.f).reshape(n * b, *c.f.shape[1:]).requires_grad_(True)
            zerr = ((1 - alpha) * c.err + alpha * p.err).reshape(n * b, *c.err.shape[1:]).requires_grad_(True)
            idx = torch.arange(b).repeat(n)
            sub = batch.select(idx)
            with lm.trace(sub.clean.to(loaded.device)):
                get_activation(lm, s)
                set_activation(lm, s, splice_patched(ae, zf, zerr))
                logits = save(lm.output.logits)
            m = metric(logits, sub)
            gf, gerr = torch.autograd.grad(m.sum(), [zf, zerr], allow_unused=True)
            if gf is not None:
                gf_sum += gf.view(n, *c.f.shape).sum(0)
            if gerr is not None:
                gerr_sum += gerr.view(n, *c.err.shape).sum(0)
        grads[s.name] = SiteState(gf_sum / steps, gerr_sum / steps)
        deltas[s.name] = p - c
        effects[s.name] = grads[s.name].node_product(deltas[s.name])
    return NodeEffects(
        method=Method.IG,
        effects=effects,
        deltas=deltas,
        grads=grads,
        clean=clean,
        metric_clean=run.metric_clean,
        metric_patch=run.metric_patch,
        timing_s={"total": time.perf_counter() - t0},
    )


SPEC = register(MethodSpec(method=Method.IG, options=IGOptions, node_effects=ig_node_effects))
