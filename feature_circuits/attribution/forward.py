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
feature gradients are one sampled product with the decoder rows (:meth:`SparseDecoder.dot`), never
an F-wide matmul.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from feature_circuits.attribution.results import SiteState, SparseSiteState, row_offsets
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
    "ENCODE_BUDGET",
    "FEATURE_PATHS",
    "SPARSE_MIN_FEATURES",
    "CleanPatch",
    "SparseDecoder",
    "attribution_sites",
    "clean_and_patch",
    "collect_activations",
    "collect_states",
    "encode_budget",
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


#: Elements of the largest dense (rows x F) encoder output the sparse path holds at once, per
#: device type (others: the CPU's): the encoder runs over row chunks of at most this many
#: elements, so that the F-wide activations never exist for the whole batch (a chunk's are reduced
#: to its active slots before the next). On the CPU 2^21 (8 MB of float32: 64 rows of 32768
#: features) keeps the transient below the model's own forward; a GPU wants larger products.
ENCODE_BUDGET = {"cpu": 1 << 21, "cuda": 1 << 25}


def encode_budget(device: torch.device) -> int:
    """:data:`ENCODE_BUDGET` of ``device``'s type."""
    return ENCODE_BUDGET.get(device.type, ENCODE_BUDGET["cpu"])


#: dtypes whose sparse products run as CSR kernels (``sparse_csr @ dense``, ``sampled_addmm``);
#: others (half, bfloat16) use the gather fallback
_CSR_DTYPES = (torch.float32, torch.float64)

#: Elements of the largest temporary (slots x d) the gather fallback builds at once.
_GATHER_BUDGET = 1 << 22


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what the path uses
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


#: per dictionary: the SparseDecoder of each (dtype, device), with the parameter versions it was
#: made from (a changed parameter invalidates it)
_DECODERS: weakref.WeakKeyDictionary[Any, dict[tuple[torch.dtype, torch.device], tuple[tuple, SparseDecoder]]]
_DECODERS = weakref.WeakKeyDictionary()


def _param_versions(ae: Dictionary) -> tuple:
    if not isinstance(ae, torch.nn.Module):
        return ()
    return tuple((p.data_ptr(), p._version) for p in ae.parameters())


@dataclass(frozen=True)
class SparseDecoder:
    """A dictionary's affine decode as decoder rows ``w`` (F, d, contiguous rows) and ``bias`` (d,)
    = decode(0), so that decode(f) = sum_k f_k w[k] + bias over the active k only.

    Products with the flat (row, feature) slots of :class:`SparseSiteState` are CSR kernels:
    decode is ``csr(values) @ w`` and the slot features' gradient ``w[col] . g[row]`` is
    ``sampled_addmm`` (an SDDMM): no F-wide product and no (slots x d) gather."""

    w: Tensor
    bias: Tensor

    @classmethod
    def of(cls, ae: Dictionary, like: Tensor) -> SparseDecoder:
        """The decoder of ``ae`` in ``like``'s dtype and device (cached per dictionary: the rows
        are the dictionary's own weight when it is stored row-major, else one contiguous copy)."""
        key = (like.dtype, like.device)
        versions = _param_versions(ae)
        try:
            cached = _DECODERS.setdefault(ae, {}).get(key)
        except TypeError:  # not weak-referenceable: no cache
            cached = None
        if cached is not None and cached[0] == versions:
            return cached[1]
        with torch.no_grad():
            w = ae.decoder_directions(like).detach().contiguous()
            zero = torch.zeros(1, int(ae.dict_size), dtype=like.dtype, device=like.device)
            bias = ae.decode(zero).detach().reshape(-1).to(like.dtype)
        dec = cls(w, bias)
        with contextlib.suppress(TypeError):
            _DECODERS[ae][key] = (versions, dec)
        return dec

    def decode(self, row: Tensor, col: Tensor, values: Tensor, n_rows: int) -> Tensor:
        """(n_rows, d): per row the sum over its slots of ``values * w[col]``, plus the bias."""
        d = self.w.shape[1]
        v = values.to(self.w.dtype)
        if self.w.dtype in _CSR_DTYPES:
            out = _csr(row_offsets(row, n_rows), col, v, (n_rows, self.w.shape[0])) @ self.w
            return out + self.bias
        out = self.bias.expand(n_rows, d).clone()
        step = max(1, _GATHER_BUDGET // max(d, 1))
        for i0 in range(0, col.shape[0], step):
            i1 = min(col.shape[0], i0 + step)
            out.index_add_(0, row[i0:i1], gather_rows(self.w, col[i0:i1]) * v[i0:i1, None])
        return out

    def dot(self, crow: Tensor, col: Tensor, g: Tensor) -> Tensor:
        """(slots,): ``w[col[i]] . g[r]`` for every slot ``i`` of CSR row ``r`` (``crow`` its
        offsets, ``g`` (rows, d) the gradient of the site output at each row): the slot features'
        gradient, W_dec[:, active]^T g."""
        g = g.to(self.w.dtype)
        n_rows = g.shape[0]
        if col.numel() == 0:
            return g.new_zeros(0)
        if self.w.dtype in _CSR_DTYPES:
            pattern = _csr(crow, col, g.new_zeros(col.shape[0]), (n_rows, self.w.shape[0]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse.sampled_addmm(pattern, g, self.w.T, beta=0.0).values()
        row = torch.repeat_interleave(torch.arange(n_rows, device=g.device), crow.diff())
        out = g.new_empty(col.shape[0])
        step = max(1, _GATHER_BUDGET // max(g.shape[1], 1))
        for i0 in range(0, col.shape[0], step):
            i1 = min(col.shape[0], i0 + step)
            out[i0:i1] = (gather_rows(self.w, col[i0:i1]) * g[row[i0:i1]]).sum(-1)
        return out


def gather_rows(w: Tensor, index: Tensor) -> Tensor:
    """``w[index]`` (n, d) for a 1-D ``index``, reading ``w`` (F, d) in its own layout: a
    transposed view of a contiguous (d, F) weight is gathered along its contiguous rows instead of
    being copied."""
    if not w.is_contiguous() and w.T.is_contiguous():
        return w.T.index_select(1, index).T
    return w.index_select(0, index)


def _active_slots(
    ae: Dictionary, x_clean: Tensor, x_patch: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The dense encoder on row chunks of both activations (at most :func:`encode_budget` F-wide
    elements at once, clean and patch rows of a chunk in one encode): ``(row, col, clean values,
    patch values)`` of the features non-zero in the clean or the patch activation, rows
    ascending, features ascending within a row. ``x_patch=None``: clean only (patch values None)."""
    d = x_clean.shape[-1]
    xc = x_clean.reshape(-1, d)
    xp = None if x_patch is None else x_patch.reshape(-1, d)
    n_rows = xc.shape[0]
    per_row = int(ae.dict_size) * (1 if xp is None else 2)
    step = max(1, encode_budget(xc.device) // max(per_row, 1))
    rows: list[Tensor] = []
    cols: list[Tensor] = []
    vcs: list[Tensor] = []
    vps: list[Tensor] = []
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        if xp is None:
            fc, fp = ae.encode(xc[r0:r1]), None
            active = fc != 0
        else:  # one encoder product for both inputs (encoders are row-wise; larger GEMMs are faster)
            fc, fp = ae.encode(torch.cat([xc[r0:r1], xp[r0:r1]])).split(r1 - r0)
            active = torch.logical_or(fc, fp)
        r, c = active.nonzero().unbind(1)
        del active
        rows.append(r + r0)
        cols.append(c)
        vcs.append(fc[r, c])
        if fp is not None:
            vps.append(fp[r, c])
        del fc, fp
    vp = torch.cat(vps) if x_patch is not None else None
    return torch.cat(rows), torch.cat(cols), torch.cat(vcs), vp


def sparse_site_states(
    ae: Dictionary,
    x_clean: Tensor,
    x_patch: Tensor | None,
    dec: SparseDecoder | None = None,
    grad: Tensor | None = None,
) -> tuple[SparseSiteState, SparseSiteState, SparseSiteState | None]:
    """Clean and patch states of one site on the sparse path, sharing one index: per row the
    features active (non-zero) in the clean or the patch activation. ``x_patch=None``: the zero
    patch state (no counterfactual). The encoder runs dense (one site and one row chunk at a
    time); the features are kept at their slots and decoded sparsely for the error node. With
    ``grad`` (the gradient of the site output, (b, s, d)) also the gradient state (slot features:
    decoder rows . grad; error node: grad); else None."""
    dec = SparseDecoder.of(ae, x_clean) if dec is None else dec
    n = int(ae.dict_size)
    b, s, d = x_clean.shape
    with torch.no_grad():
        row, col, vc, vp = _active_slots(ae, x_clean, x_patch)
        dec_c = dec.decode(row, col, vc, b * s).view(b, s, d).to(x_clean.dtype)
        clean = SparseSiteState(row, col, vc, x_clean - dec_c, n)
        if vp is None or x_patch is None:
            patch = clean.with_values(torch.zeros_like(vc), torch.zeros_like(clean.err))
        else:
            dec_p = dec.decode(row, col, vp, b * s).view(b, s, d).to(x_patch.dtype)
            patch = clean.with_values(vp, x_patch - dec_p)
        g_state = None
        if grad is not None:
            dots = dec.dot(clean.crow, col, grad.reshape(b * s, d))
            g_state = clean.with_values(dots.to(vc.dtype), grad.to(clean.err.dtype))
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
    del logits  # the backward does not need the (b, s, V) logits themselves, only their gradient
    flat = [leaves[s.name] for s in sites]
    got = torch.autograd.grad(m.sum(), flat, allow_unused=True)
    grads = {
        s.name: torch.zeros_like(leaves[s.name]) if g is None else g.detach()
        for s, g in zip(sites, got, strict=True)
    }
    return {k: v.detach() for k, v in acts.items()}, grads, m.detach()
