"""Integrated gradients node effects (Marks et al.; docs/algorithms.md, "Methods").

Per site separately (other sites not spliced): z_a = (1-a) clean + a patch for the features AND the
error, a = k/steps, k = 0..steps-1; the clean input runs with the site output set to
decode(z.f) + z.err; IE = mean_a(dm/dz) . delta. The steps are stacked along the batch dimension
(``max_rows`` rows per forward). On the sparse feature path (docs/algorithms.md, "Sparse feature
path") z is kept at the features active in the clean or the patch input, the site output is their
sparse decode plus z.err, and the feature gradients are decoder rows times the (step-summed)
gradient of the site output.
"""

from __future__ import annotations

import time

import torch

from feature_circuits.attribution.forward import (
    SparseDecoder,
    clean_and_patch,
    collect_activations,
    sparse_site_states,
    use_sparse,
    zero_last_resid_logits,
)
from feature_circuits.attribution.registry import (
    IGOptions,
    MethodOptions,
    MethodSpec,
    NodeRequest,
    options_as,
    register,
)
from feature_circuits.attribution.results import NodeEffects, SiteState, State
from feature_circuits.dictionaries import splice_patched
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.progress import progress_bar
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
    if use_sparse(dictionaries, site_list, req.feature_path):
        return _sparse_ig(req, steps=steps, max_rows=opts.max_rows, t0=t0, progress=opts.progress)
    run = clean_and_patch(loaded, dictionaries, batch, site_list, metric, req.counterfactual)
    clean, patch = run.clean, run.patch
    b = batch.clean.shape[0]
    lm = loaded.lm
    steps_per_chunk = max(1, opts.max_rows // max(b, 1))
    grads: dict[str, State] = {}
    deltas: dict[str, State] = {}
    n_chunks = len(site_list) * len(range(0, steps, steps_per_chunk))
    bar = progress_bar(total=n_chunks, desc="ig", unit="fwd", enabled=opts.progress)
    for s in site_list:
        ae = dictionaries[s.name]
        c, p = clean[s.name], patch[s.name]
        assert isinstance(c, SiteState) and isinstance(p, SiteState)
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
            bar.update(1)
        grads[s.name], deltas[s.name] = SiteState(gf_sum / steps, gerr_sum / steps), p - c
    bar.close()
    return NodeEffects.from_gradients(
        Method.IG,
        clean=clean,
        grads=grads,
        deltas=deltas,
        metric_clean=run.metric_clean,
        metric_patch=run.metric_patch,
        t0=t0,
    )


def _sparse_ig(
    req: NodeRequest, *, steps: int, max_rows: int, t0: float, progress: bool | None = None
) -> NodeEffects:
    """:func:`ig_node_effects` on the sparse feature path (same interpolation, same numbers)."""
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    acts, logits_c = collect_activations(loaded, batch.clean, site_list)
    if req.counterfactual:
        acts_p, logits_p = collect_activations(loaded, batch.patch, site_list)
    else:
        acts_p, logits_p = {}, zero_last_resid_logits(loaded, batch.clean)
    with torch.no_grad():
        metric_clean = metric(logits_c, batch).detach()
        metric_patch = metric(logits_p, batch).detach()
    b = batch.clean.shape[0]
    lm = loaded.lm
    steps_per_chunk = max(1, max_rows // max(b, 1))
    clean: dict[str, State] = {}
    grads: dict[str, State] = {}
    deltas: dict[str, State] = {}
    n_chunks = len(site_list) * len(range(0, steps, steps_per_chunk))
    bar = progress_bar(total=n_chunks, desc="ig", unit="fwd", enabled=progress)
    for s in site_list:
        ae = dictionaries[s.name]
        x = acts.pop(s.name)
        dec = SparseDecoder.of(ae, x)
        c, p, _ = sparse_site_states(ae, x, acts_p.pop(s.name, None), dec)
        g_sum = torch.zeros_like(c.err)
        n_rows = c.n_rows
        for k0 in range(0, steps, steps_per_chunk):
            ks = list(range(k0, min(steps, k0 + steps_per_chunk)))
            n = len(ks)
            alpha = torch.tensor([k / steps for k in ks], dtype=c.values.dtype, device=c.values.device)
            zv = (1 - alpha.view(n, 1)) * c.values + alpha.view(n, 1) * p.values  # (n, slots)
            a4 = alpha.view(n, 1, 1, 1)
            zerr = ((1 - a4) * c.err + a4 * p.err).reshape(n * b, *c.err.shape[1:])
            with torch.no_grad():  # step k's rows follow step k-1's: (n*b, s, d)
                offs = torch.arange(n, device=c.row.device).view(n, 1) * n_rows
                base = dec.decode((c.row + offs).reshape(-1), c.col.repeat(n), zv.reshape(-1), n * n_rows)
                base = base.view(n * b, *c.err.shape[1:]).to(zerr.dtype)
            zerr = zerr.requires_grad_(True)
            sub = batch.select(torch.arange(b).repeat(n))
            with lm.trace(sub.clean.to(loaded.device)):
                get_activation(lm, s)
                set_activation(lm, s, base + zerr)
                logits = save(lm.output.logits)
            m = metric(logits, sub)
            (g,) = torch.autograd.grad(m.sum(), [zerr], allow_unused=True)
            if g is not None:
                g_sum += g.view(n, *c.err.shape).sum(0)
            bar.update(1)
        g_out = g_sum / steps  # d m / d(site output) averaged over the steps = the error gradient
        with torch.no_grad():
            gv = dec.dot(c.crow, c.col, g_out.reshape(n_rows, -1)).to(c.values.dtype)
        clean[s.name], grads[s.name], deltas[s.name] = c, c.with_values(gv, g_out), p - c
    bar.close()
    return NodeEffects.from_gradients(
        Method.IG,
        clean=clean,
        grads=grads,
        deltas=deltas,
        metric_clean=metric_clean,
        metric_patch=metric_patch,
        t0=t0,
    )


SPEC = register(MethodSpec(method=Method.IG, options=IGOptions, node_effects=ig_node_effects))
