"""Exact node effects by activation patching (docs/algorithms.md, "Methods"): ground truth.

IE(node) = m(clean | do(node <- node(patch))) - m(clean). A patched node changes the site output by
delta = decode(f with f_i <- f_i(patch)) - decode(f) for a feature, and by err(patch) - err(clean) for
the error node; downstream sites are not spliced (an SAE with its error node is the identity), so the
patched forward runs the clean input with x_site + delta at the node's position. One row per node;
``chunk_size`` single-node patches are stacked along the batch dimension of one forward. Only nodes
with a nonzero delta are run, error nodes included (the others have IE exactly 0).

The patched forwards resume (docs/algorithms.md, "Resuming from the patched site"): they start at
the patched site from the clean run's state and run only the positions from the patched one on,
with the clean keys and values of the earlier positions as a cache
(:mod:`feature_circuits.model.resume`); each patch in a chunk runs from its own position on (packed),
so chunks are simply ``chunk_size`` patches (:func:`row_chunks`). ``ExactOptions(resume=False)``, or a
model the runner does not know, re-runs the whole model for every chunk (:func:`full_rerun_logits`,
the reference).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

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
from feature_circuits.data import Batch
from feature_circuits.model.loading import LoadedModel
from feature_circuits.model.resume import CleanRun, ResumableForward, reads_last_position_only, resumable
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.progress import progress_bar
from feature_circuits.types import Method, Site

__all__ = ["PatchRunner", "exact_node_effects", "full_rerun_logits", "row_chunks"]


def full_rerun_logits(
    loaded: LoadedModel, batch: Batch, site: Site, rows: Tensor, positions: Tensor, vectors: Tensor
) -> Tensor:
    """Logits (n, s, V) of full forwards of ``batch.clean[rows]`` with ``vectors[i]`` added to the
    site's activation at ``positions[i]`` in row ``i`` (an nnsight trace of the whole model)."""
    seq = batch.seq_len
    n = int(rows.shape[0])
    dev = vectors.device
    with torch.no_grad():
        add = torch.zeros(n, seq, vectors.shape[-1], dtype=vectors.dtype, device=dev)
        add[torch.arange(n, device=dev), positions.to(dev)] = vectors
    lm = loaded.lm
    with lm.trace(batch.clean[rows.to(batch.clean.device)].to(loaded.device)):
        x = get_activation(lm, site)
        set_activation(lm, site, x + add)
        logits = save(lm.output.logits)
    return logits.detach()


class PatchRunner:
    """Patched forwards of one batch and the metric on them: resumed from the clean run's state
    when ``resume`` and the model allows (:func:`~feature_circuits.model.resume.resumable`), else
    full re-runs. :meth:`effects` returns ``m(patched) - m(clean)`` per row, the clean metric taken
    from the same kind of forward (so effects carry no offset between the two)."""

    def __init__(
        self, loaded: LoadedModel, batch: Batch, metric, metric_clean: Tensor, *, resume: bool = True
    ):
        self.loaded, self.batch, self.metric = loaded, batch, metric
        self.runner: ResumableForward | None = resumable(loaded) if resume else None
        self.clean: CleanRun | None = None
        self.metric_clean = metric_clean
        self.last_only = False
        if self.runner is not None:
            self.clean = self.runner.clean(batch.clean.to(loaded.device))
            with torch.no_grad():
                self.metric_clean = metric(self.clean.logits, batch).detach()
            self.last_only = reads_last_position_only(metric, self.clean.logits, batch)

    @property
    def resumed(self) -> bool:
        return self.clean is not None

    def logits(self, site: Site, rows: Tensor, positions: Tensor, vectors: Tensor) -> Tensor:
        if self.runner is not None and self.clean is not None:
            return self.runner.patched_logits(
                self.clean, site, rows, positions, vectors, last_only=self.last_only
            )
        return full_rerun_logits(self.loaded, self.batch, site, rows, positions, vectors)

    def effects(self, site: Site, rows: Tensor, positions: Tensor, vectors: Tensor) -> Tensor:
        """(n,): the metric change of each patched row (``rows`` index the batch)."""
        logits = self.logits(site, rows, positions, vectors)
        sub = self.batch.select(rows.cpu())
        with torch.no_grad():
            m = self.metric(logits, sub)
        return (m - self.metric_clean[rows.to(self.metric_clean.device)]).detach()


def row_chunks(n_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` slices of ``n_rows`` patches, ``max_rows`` per forward (the last one
    shorter). Resumed forwards pack each row from its own position on, so the positions mixed in a
    chunk cost nothing extra and every chunk can be full."""
    step = max(1, max_rows)
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _site_nodes(delta: SiteState, eff: Tensor, max_nodes: int | None) -> Tensor:
    """(N, 3) nodes (example, position, index) to patch at a site, in position order: the feature
    nodes with a nonzero delta (at most ``max_nodes``, largest |delta| first; the others' effects
    set to NaN in ``eff``) and every error node (index F) with a nonzero delta."""
    n_feat = delta.f.shape[-1]
    feat_nodes = (delta.f != 0).nonzero()  # (N, 3): example, position, feature
    if max_nodes is not None and feat_nodes.shape[0] > max_nodes:
        mag = delta.f[feat_nodes[:, 0], feat_nodes[:, 1], feat_nodes[:, 2]].abs()
        keep = torch.argsort(-mag, stable=True)[:max_nodes]
        skipped = torch.ones(feat_nodes.shape[0], dtype=torch.bool, device=mag.device)
        skipped[keep] = False
        sk = feat_nodes[skipped]
        eff[sk[:, 0], sk[:, 1], sk[:, 2]] = math.nan
        feat_nodes = feat_nodes[keep.sort().values]
    err_nodes = (delta.err != 0).any(-1).nonzero()  # (N, 2): example, position
    err_nodes = torch.cat([err_nodes, torch.full_like(err_nodes[:, :1], n_feat)], 1)
    nodes = torch.cat([feat_nodes, err_nodes], 0)
    return nodes[torch.argsort(nodes[:, 1], stable=True)]


def exact_node_effects(req: NodeRequest, options: MethodOptions) -> NodeEffects:
    """Exact node effects of one batch. ``options.max_nodes``: per site, patch at most this many
    feature nodes (largest |delta| first; every error node with a nonzero delta is patched, the
    others' effects are exactly 0); the skipped features get NaN. ``options.chunk_size``:
    single-node patches per forward; ``options.resume``: resumed forwards (else full re-runs);
    ``options.progress``: a bar over the patches."""
    opts = options_as(ExactOptions, options, Method.EXACT)
    max_nodes, chunk_size = opts.max_nodes, opts.chunk_size
    t0 = time.perf_counter()
    loaded, dictionaries, batch, metric = req.loaded, req.dictionaries, req.batch, req.metric
    site_list = req.site_list()
    run = clean_and_patch(loaded, dictionaries, batch, site_list, metric, req.counterfactual)
    clean, patch, metric_clean = run.clean, run.patch, run.metric_clean
    runner = PatchRunner(loaded, batch, metric, metric_clean, resume=opts.resume)
    effects: dict[str, torch.Tensor] = {}
    deltas: dict[str, SiteState] = {}
    plans: list[tuple[Site, Tensor]] = []
    for s in site_list:
        c, p = clean[s.name], patch[s.name]
        delta = p - c
        deltas[s.name] = delta
        b, seq, n_feat = c.f.shape
        eff = torch.zeros(b, seq, n_feat + 1, dtype=c.f.dtype, device=c.f.device)
        effects[s.name] = eff
        plans.append((s, _site_nodes(delta, eff, max_nodes)))
    n_forwards = 0
    total = sum(int(nodes.shape[0]) for _, nodes in plans)
    with progress_bar(total=total, desc="exact", unit="patch", enabled=opts.progress) as bar:
        for s, nodes in plans:
            ae = dictionaries[s.name]
            c, p, delta, eff = clean[s.name], patch[s.name], deltas[s.name], effects[s.name]
            n_feat = c.f.shape[-1]
            for start, stop in row_chunks(int(nodes.shape[0]), chunk_size):
                chunk = nodes[start:stop]
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
                eff[e, pos, j] = runner.effects(s, e, pos, vec).to(eff.device, eff.dtype)
                n_forwards += 1
                bar.update(int(chunk.shape[0]))
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
