"""The forwards every attribution method shares (docs/algorithms.md, "Methods"): the sites to
attribute, the clean and patch states of every site, and the clean forward with every dictionary
spliced in as gradient leaves.

A site's *state* is its features ``f`` and error node ``err`` (:class:`SiteState`). The patch state
is the state on the counterfactual input, or -- without a counterfactual -- every node set to zero,
whose model output is the one with the last residual site zeroed (every later quantity is a
function of it).

The sparse feature path (:func:`use_sparse` chooses it; docs/algorithms.md, "Sparse feature
path"): the dense encoder pass stays, but only the features active in the clean or the patch input
of each (example, position) are kept (:class:`SparseSiteState`), decoded, and get gradients. Since
``decode`` is affine, a feature's gradient is its decoder row times the gradient of the site output,
``d m / d f_k = W_dec[k] . d m / d x`` (and the error node's gradient is ``d m / d x`` itself), so the
clean forward only needs one d-wide gradient leaf per site (:func:`site_output_grads`) and the
feature gradients are gathered rows (:func:`gather_dot`), never an F-wide matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from feature_circuits.attribution.results import SiteState, SparseSiteState
from feature_circuits.data import Batch
from feature_circuits.dictionaries import (
    Dictionary,
    IdentityDictionary,
    encode_with_error,
    splice_with_grad_leaves,
)
from feature_circuits.errors import ConfigError
from feature_circuits.metrics import Metric
from feature_circuits.model.loading import LoadedModel
from feature_circuits.model.lrp import lrp_context
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import LRPConfig, Site

__all__ = [
    "FEATURE_PATHS",
    "SPARSE_MIN_FEATURES",
    "CleanPatch",
    "SparseDecoder",
    "attribution_sites",
    "clean_and_patch",
    "collect_activations",
    "collect_states",
    "gather_dot",
    "patch_states",
    "site_output_grads",
    "sparse_site_states",
    "spliced_clean_forward",
    "use_sparse",
    "zero_last_resid_logits",
]


def attribution_sites(
    loaded: LoadedModel, dictionaries: Mapping[str, Dictionary], sites: Iterable[str] | None = None
) -> list[Site]:
    """Sites (forward order) that have a dictionary, optionally restricted to ``sites`` names."""
    wanted = None if sites is None else set(sites)
    out = [s for s in loaded.all_sites if s.name in dictionaries and (wanted is None or s.name in wanted)]
    if wanted is not None and len(out) != len(wanted):
        missing = wanted - {s.name for s in out}
        raise ConfigError(f"sites {sorted(missing)}: no dictionary or unknown site")
    return out


def collect_states(
    loaded: LoadedModel, dictionaries: Mapping[str, Dictionary], ids: Tensor, sites: Sequence[Site]
) -> tuple[dict[str, SiteState], Tensor]:
    """Plain forward on ``ids``: every site's (features, error) and the logits (all detached)."""
    acts: dict[str, Tensor] = {}
    lm = loaded.lm
    with lm.trace(ids.to(loaded.device)):
        for s in sites:
            acts[s.name] = save(get_activation(lm, s))
        logits = save(lm.output.logits)
    with torch.no_grad():
        states = {
            s.name: SiteState(*encode_with_error(dictionaries[s.name], acts[s.name].detach())) for s in sites
        }
    return states, logits.detach()


def zero_last_resid_logits(loaded: LoadedModel, ids: Tensor) -> Tensor:
    """Logits with the last residual site zeroed: the model's output when every node of every site
    is set to zero (no-counterfactual "patch" state)."""
    lm = loaded.lm
    last = loaded.last_resid
    with lm.trace(ids.to(loaded.device)):
        x = get_activation(lm, last)
        set_activation(lm, last, torch.zeros_like(x))
        logits = save(lm.output.logits)
    return logits.detach()


def spliced_clean_forward(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    ids: Tensor,
    sites: Sequence[Site],
    lrp: LRPConfig | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Forward on ``ids`` with every site spliced (features and error as grad leaves, output
    bit-identical to the model's), with the LRP rules of ``lrp`` active. Returns the leaves and
    the logits (with their graph)."""
    lm = loaded.lm
    leaves: dict[str, tuple[Tensor, Tensor]] = {}
    with lrp_context(loaded, lrp), lm.trace(ids.to(loaded.device)):
        for s in sites:
            out, f, err = splice_with_grad_leaves(dictionaries[s.name], get_activation(lm, s))
            set_activation(lm, s, out)
            leaves[s.name] = (save(f), save(err))
        logits = save(lm.output.logits)
    return leaves, logits


def patch_states(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    sites: Sequence[Site],
    clean: Mapping[str, SiteState],
    metric: Metric,
    counterfactual: bool,
) -> tuple[dict[str, SiteState], Tensor]:
    """Patch states of every site and the metric on the patch input (no-counterfactual: zero states
    and the metric with every node zeroed)."""
    if counterfactual:
        states, logits = collect_states(loaded, dictionaries, batch.patch, sites)
    else:
        states = {k: SiteState(torch.zeros_like(v.f), torch.zeros_like(v.err)) for k, v in clean.items()}
        logits = zero_last_resid_logits(loaded, batch.clean)
    with torch.no_grad():
        m = metric(logits, batch).detach()
    return states, m


@dataclass(frozen=True, kw_only=True)
class CleanPatch:
    """Clean and patch states of every site, and the metric on both (``(b,)`` each)."""

    clean: dict[str, SiteState]
    patch: dict[str, SiteState]
    metric_clean: Tensor
    metric_patch: Tensor


def clean_and_patch(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    sites: Sequence[Site],
    metric: Metric,
    counterfactual: bool,
) -> CleanPatch:
    """A plain clean forward (states and metric) and :func:`patch_states`."""
    clean, clean_logits = collect_states(loaded, dictionaries, batch.clean, sites)
    with torch.no_grad():
        metric_clean = metric(clean_logits, batch).detach()
    patch, metric_patch = patch_states(loaded, dictionaries, batch, sites, clean, metric, counterfactual)
    return CleanPatch(clean=clean, patch=patch, metric_clean=metric_clean, metric_patch=metric_patch)


# ------------------------------------------------------------------------------ sparse feature path

#: ``feature_path`` choices: ``auto`` (:func:`use_sparse` decides), ``dense``, ``sparse``.
FEATURE_PATHS = ("auto", "dense", "sparse")

#: ``auto`` takes the sparse path when every site's dictionary has at least this many features (a
#: smaller dictionary is cheaper dense: its F-wide matmuls are small, and the sparse path's gathers
#: and index bookkeeping cost more than they save).
SPARSE_MIN_FEATURES = 4096


def use_sparse(
    dictionaries: Mapping[str, Dictionary], sites: Sequence[Site], feature_path: str = "auto"
) -> bool:
    """Whether a node pass over ``sites`` runs on the sparse feature path: ``sparse`` / ``dense``
    force it; ``auto``: sparse iff every site's dictionary has at least :data:`SPARSE_MIN_FEATURES`
    features and none is an identity dictionary (neurons are dense by construction)."""
    if feature_path not in FEATURE_PATHS:
        raise ConfigError(f"feature_path must be one of {list(FEATURE_PATHS)}, got {feature_path!r}")
    if feature_path != "auto":
        return feature_path == "sparse"
    ds = [dictionaries[s.name] for s in sites]
    return bool(ds) and all(
        not isinstance(d, IdentityDictionary) and int(d.dict_size) >= SPARSE_MIN_FEATURES for d in ds
    )


#: Elements of the largest temporary (rows x K x d) a gather may build at once.
_GATHER_BUDGET = 1 << 22


def gather_rows(w: Tensor, index: Tensor) -> Tensor:
    """``w[index]`` (n, d) for a 1-D ``index``, reading ``w`` (F, d) in its own layout: a
    transposed view of a contiguous (d, F) weight (the usual decoder) is gathered along its
    contiguous rows instead of being copied."""
    if not w.is_contiguous() and w.T.is_contiguous():
        return w.T.index_select(1, index).T
    return w.index_select(0, index)


@dataclass(frozen=True)
class SparseDecoder:
    """A dictionary's affine decode as decoder rows ``w`` (F, d; a view, never copied) and ``bias``
    (d,) = decode(0), so that decode(f) = sum_k f_k w[k] + bias over the active k only."""

    w: Tensor
    bias: Tensor

    @classmethod
    def of(cls, ae: Dictionary, like: Tensor) -> SparseDecoder:
        with torch.no_grad():
            w = ae.decoder_directions(like).detach()
            zero = torch.zeros(1, int(ae.dict_size), dtype=like.dtype, device=like.device)
            bias = ae.decode(zero).detach().reshape(-1).to(like.dtype)
        return cls(w, bias)

    def _slots(self, index: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Flat (row, feature) of the real slots (all slots when ``mask`` is None)."""
        k = index.shape[-1]
        flat = index.reshape(-1)
        if mask is None:
            sel = torch.arange(flat.shape[0], device=flat.device)
        else:
            sel = mask.reshape(-1).nonzero().squeeze(1)
        return sel, flat[sel] if k else flat[:0]

    def apply(
        self,
        index: Tensor,
        mask: Tensor | None,
        values: Sequence[Tensor] = (),
        grads: Sequence[Tensor] = (),
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Decodes (..., d) of each of ``values`` (sum over the slots of ``v * w[index]`` plus the
        bias) and slot dots (..., K) ``w[index[..., k]] . g[...]`` of each of ``grads`` (the slot
        features' gradient from the site output's, W_dec[:, active]^T g; 0 at padding slots), with
        ONE gather of the decoder rows of the real slots (``mask``; None: every slot, so padding
        slots must then carry value 0), in chunks of bounded size."""
        lead, k = index.shape[:-1], index.shape[-1]
        d = self.w.shape[1]
        n_rows = math.prod(lead)
        decs = [self.bias.to(self.w.dtype).expand(n_rows, d).clone() for _ in values]
        dots = [torch.zeros(index.numel(), dtype=self.w.dtype, device=self.w.device) for _ in grads]
        if k:
            sel, cols = self._slots(index, mask)
            row = sel // k
            vals = [v.reshape(-1).to(self.w.dtype)[sel] for v in values]
            gs = [g.reshape(-1, d).to(self.w.dtype) for g in grads]
            step = max(1, _GATHER_BUDGET // max(d, 1))
            for i0 in range(0, sel.shape[0], step):
                i1 = min(sel.shape[0], i0 + step)
                rows = gather_rows(self.w, cols[i0:i1])
                r = row[i0:i1]
                for out, v in zip(decs, vals, strict=True):
                    out.index_add_(0, r, rows * v[i0:i1, None])
                for out, g in zip(dots, gs, strict=True):
                    out[sel[i0:i1]] = (rows * g[r]).sum(-1)
        return [x.reshape(*lead, d) for x in decs], [x.reshape(*lead, k) for x in dots]

    def decode(self, index: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """(..., d): the sum over the slots of ``values * w[index]`` plus the bias (:meth:`apply`)."""
        return self.apply(index, mask, values=[values])[0][0]

    def dot(self, index: Tensor, g: Tensor, mask: Tensor | None = None) -> Tensor:
        """(..., K): ``w[index[..., k]] . g[...]`` -- the slot features' gradient from the gradient
        ``g`` (..., d) of the site output (:meth:`apply`)."""
        return self.apply(index, mask, grads=[g])[1][0]


def gather_dot(w: Tensor, index: Tensor, g: Tensor, mask: Tensor | None = None) -> Tensor:
    """(..., K): ``w[index[..., k]] . g[...]`` for decoder rows ``w`` (F, d) (see
    :meth:`SparseDecoder.dot`)."""
    return SparseDecoder(w, w.new_zeros(w.shape[1])).dot(index, g, mask)


def _row_union(active: Tensor) -> tuple[Tensor, Tensor]:
    """(b, s, F) bool -> (index, mask) of shape (b, s, K), K the largest row count: each row's
    active features in increasing order, padded with feature 0 and mask False."""
    b, s, _ = active.shape
    flat = active.reshape(b * s, -1)
    counts = flat.sum(-1)
    k = int(counts.max()) if counts.numel() else 0
    index = torch.zeros(b * s, k, dtype=torch.long, device=active.device)
    mask = torch.zeros(b * s, k, dtype=torch.bool, device=active.device)
    if k:
        row, col = flat.nonzero().unbind(1)  # row-major: rows in order, columns increasing
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(row.shape[0], device=row.device) - starts[row]
        index[row, slot] = col
        mask[row, slot] = True
    return index.reshape(b, s, k), mask.reshape(b, s, k)


def sparse_site_states(
    ae: Dictionary,
    x_clean: Tensor,
    x_patch: Tensor | None,
    dec: SparseDecoder | None = None,
    grad: Tensor | None = None,
) -> tuple[SparseSiteState, SparseSiteState, SparseSiteState | None]:
    """Clean and patch states of one site on the sparse path, sharing one index: per row the
    features active (non-zero) in the clean or the patch activation. ``x_patch=None``: the zero
    patch state (no counterfactual). The encoder runs dense (one site at a time); the features
    are kept at their slots and decoded sparsely for the error node. With ``grad`` (the gradient
    of the site output, (b, s, d)) also the gradient state (slot features: decoder rows . grad;
    error node: grad), from the same gather of decoder rows; else None."""
    dec = SparseDecoder.of(ae, x_clean) if dec is None else dec
    n = int(ae.dict_size)
    with torch.no_grad():
        fc = ae.encode(x_clean)
        fp = None if x_patch is None else ae.encode(x_patch)
        active = fc != 0 if fp is None else (fc != 0) | (fp != 0)
        index, mask = _row_union(active)
        del active
        vc = fc.gather(-1, index) * mask
        del fc
        vp = None if fp is None else fp.gather(-1, index) * mask
        del fp
        values = [vc] if vp is None else [vc, vp]
        decs, dots = dec.apply(index, mask, values, [] if grad is None else [grad])
        clean = SparseSiteState(index, mask, vc, x_clean - decs[0], n)
        if vp is None or x_patch is None:
            patch = SparseSiteState(index, mask, torch.zeros_like(vc), torch.zeros_like(clean.err), n)
        else:
            patch = SparseSiteState(index, mask, vp, x_patch - decs[1], n)
        g_state = None
        if grad is not None:
            g_state = SparseSiteState(index, mask, dots[0].to(vc.dtype), grad.to(clean.err.dtype), n)
    return clean, patch, g_state


def collect_activations(
    loaded: LoadedModel, ids: Tensor, sites: Sequence[Site]
) -> tuple[dict[str, Tensor], Tensor]:
    """Plain forward on ``ids``: every site's activation (b, s, d) and the logits (detached)."""
    acts: dict[str, Tensor] = {}
    lm = loaded.lm
    with lm.trace(ids.to(loaded.device)):
        for s in sites:
            acts[s.name] = save(get_activation(lm, s))
        logits = save(lm.output.logits)
    return {k: v.detach() for k, v in acts.items()}, logits.detach()


def site_output_grads(
    loaded: LoadedModel,
    ids: Tensor,
    sites: Sequence[Site],
    metric_fn: Callable[[Tensor], Tensor],
    lrp: LRPConfig | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Clean forward with a zero d-wide gradient leaf added to every site output (the output stays
    bit-identical), the LRP rules of ``lrp`` in force; one backward of ``metric_fn(logits).sum()``.
    Returns the site activations, dm/d(site output) per site (the error node's gradient, from which
    every feature's is a decoder row product) and the metric (b,), all detached."""
    lm = loaded.lm
    acts: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}
    with lrp_context(loaded, lrp), lm.trace(ids.to(loaded.device)):
        for s in sites:
            x = get_activation(lm, s)
            z = torch.zeros_like(x).requires_grad_(True)
            acts[s.name] = save(x)
            leaves[s.name] = save(z)
            set_activation(lm, s, x + z)
        logits = save(lm.output.logits)
    m = metric_fn(logits)
    flat = [leaves[s.name] for s in sites]
    got = torch.autograd.grad(m.sum(), flat, allow_unused=True)
    grads = {
        s.name: torch.zeros_like(leaves[s.name]) if g is None else g.detach()
        for s, g in zip(sites, got, strict=True)
    }
    return {k: v.detach() for k, v in acts.items()}, grads, m.detach()
