"""Integrated gradients node effects (Marks et al.), spec section 3.

Per site separately (other sites not spliced): z_a = (1-a) clean + a patch for the features AND the
error, a = k/steps, k = 0..steps-1; the clean input runs with the site output set to
decode(z.f) + z.err; IE = mean_a(dm/dz) . delta. The steps are stacked along the batch dimension
(``max_rows`` rows per forward).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from feature_circuits.attribution.forward import (
    Metric,
    attribution_sites,
    collect_states,
    patch_states,
    select,
)
from feature_circuits.attribution.results import NodeEffects, SiteState
from feature_circuits.dictionaries.marks import splice_patched
from feature_circuits.model.sites import get_activation, set_activation
from feature_circuits.types import Method


def ig_node_effects(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    batch: Any,
    *,
    metric: Metric,
    steps: int = 10,
    counterfactual: bool = True,
    sites: list[str] | None = None,
    max_rows: int = 512,
) -> NodeEffects:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    site_list = attribution_sites(loaded, dictionaries, sites)
    clean, clean_logits = collect_states(loaded, dictionaries, batch.clean, site_list)
    with torch.no_grad():
        metric_clean = metric(clean_logits, batch).detach()
    patch, metric_patch = patch_states(loaded, dictionaries, batch, site_list, clean, metric, counterfactual)
    b = batch.clean.shape[0]
    lm = loaded.lm
    steps_per_chunk = max(1, max_rows // max(b, 1))
    grads, deltas, effects = {}, {}, {}
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
            sub = select(batch, idx)
            saved: dict[str, Any] = {}
            with lm.trace(sub.clean.to(loaded.device)):
                get_activation(lm, s)
                set_activation(lm, s, splice_patched(ae, zf, zerr))
                saved["logits"] = lm.output.logits.save()
            m = metric(saved["logits"], sub)
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
        metric_clean=metric_clean,
        metric_patch=metric_patch,
        timing_s={"total": time.perf_counter() - t0},
    )
