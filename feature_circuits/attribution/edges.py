"""Edge effects between direct-path site pairs (docs/algorithms.md, "Edges").

edge(k -> j) = g_j . (d d_j / d u_k)|clean . delta u_k, with g_j the downstream node's gradient from
the node pass (plain for atp, IG-averaged for ig, LRP propagation coefficient for relp: for relp the
edge backward also runs with the LRP rules on).

One clean forward for all pairs (:func:`leaf_forward`): every site's output is saved and then
replaced by a gradient leaf of the same value, so the derivative of a site's saved output with
respect to an earlier site's leaf runs along the direct path only (the sites in between are
leaves). Since u = decode(f_u) + err_u with decode affine, d/d f_u = decoder rows and d/d err_u = I,
so the chain factors as

    edge(k -> j) = [ c_j . (d x_d / d x_u) ] . W_dec[k] * delta f_k      (error node: . delta err)

where c_j = g_j d node_j / d x_d is computed at node j's own row through its dictionary. The VJPs
from the site output x_d to all its upstream leaves at once are batched with ``is_grads_batched``:
row r of a batched VJP carries the r-th selected node of EVERY example at once (examples are
independent), so a downstream site costs ceil(max nodes per example / chunk_size) batched
backwards that are d wide, not F wide. Where the direct path into a site mixes no positions (MLPs,
norms, residual sums: every pair but those through attention; :func:`position_wise` probes the
backward actually run), a node's gradient lies at its own position only, so a row carries one node
of every (example, position) at once and the site costs ceil(max nodes per position / chunk_size).
Only the upstream features with a non-zero delta in the batch are multiplied out. Future positions
are structurally zero and not stored; exact zeros are dropped.

On the sparse feature path (node effects with :class:`SparseSiteState`; docs/algorithms.md,
"Sparse feature path") an upstream row's features are its active slots with a non-zero delta:
the edge values of a chunk are one SDDMM of the VJP rows with the decoder rows of those slots
(never a (d, F) product, never a (slots x d) gather), and the downstream gradients are read at
their slots.

:func:`edge_forward` is the unfactored form (features and errors of both sites as tensors in the
graph), kept as the one-backward-per-node reference the tests and the benchmark compare against.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from feature_circuits.attribution.forward import SparseDecoder
from feature_circuits.attribution.registry import METHODS, method_spec
from feature_circuits.attribution.results import EdgeEffects, NodeEffects, SparseSiteState, State, row_offsets
from feature_circuits.data import Batch
from feature_circuits.dictionaries import (
    Dictionary,
    FeatureGradients,
    encode_with_error,
    splice_with_grad_leaves,
)
from feature_circuits.errors import ConfigError
from feature_circuits.model.loading import LoadedModel
from feature_circuits.model.lrp import lrp_context
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import LOGIT_ID, LRPConfig, Method, Site, SiteKind

__all__ = [
    "SitePair",
    "SparseUpstream",
    "check_direct_pairs",
    "edge_effects",
    "edge_forward",
    "leaf_forward",
    "position_wise",
    "select_nodes",
    "site_pairs",
    "site_successors",
]


@dataclass(frozen=True)
class SitePair:
    """An edge's ends (site names, ``up`` before ``down``) and the sites between them that the
    direct path does not cross (``stop``)."""

    up: str
    down: str
    stop: tuple[str, ...] = ()


def site_successors(loaded: LoadedModel) -> dict[str, list[str]]:
    """The data flow between all sites (``attn_z`` included): for each site, the sites that read it
    with no other site in between. Per layer, ``prev`` (``resid_{l-1}``, ``embed`` for l = 0) feeds
    ``attn_z_l``, which feeds ``attn_l``; ``prev`` feeds ``mlp_l`` and ``resid_l``; ``attn_l`` feeds
    ``mlp_l`` (sequential residual only) and ``resid_l``; ``mlp_l`` feeds ``resid_l``."""
    succ: dict[str, list[str]] = {s.name: [] for s in loaded.all_sites}
    for layer in range(loaded.n_layers):
        prev = Site.format(SiteKind.EMBED, -1) if layer == 0 else Site.format(SiteKind.RESID, layer - 1)
        z, attn, mlp, resid = (
            Site.format(kind, layer)
            for kind in (SiteKind.ATTN_Z, SiteKind.ATTN, SiteKind.MLP, SiteKind.RESID)
        )
        if z in succ:
            succ[prev].append(z)
            succ[z].append(attn)
        else:
            succ[prev].append(attn)
        succ[prev] += [mlp, resid]
        if not loaded.parallel_residual:
            succ[attn].append(mlp)
        succ[attn].append(resid)
        succ[mlp].append(resid)
    return succ


def site_pairs(loaded: LoadedModel, available: Collection[str] | None = None) -> list[SitePair]:
    """The direct-path pairs (docs/algorithms.md, "Edges") between the spliced sites
    (``available``; default: every default site), in forward order of the downstream site (then
    nearest upstream first): ``u -> d`` when a path of the computation leads from ``u`` to ``d``
    through no other spliced site. With every default site spliced these are the per-layer pairs
    of the table; with partial coverage a pair may skip sites without a dictionary (e.g.
    ``resid_1 -> resid_3``). Each pair's stops are the pairs' sites strictly between its ends."""
    succ = site_successors(loaded)
    rank = {s.name: s.rank for s in loaded.all_sites}
    spliced = {s.name for s in loaded.sites} if available is None else set(available) & set(succ)
    found: list[tuple[str, str]] = []
    for up in spliced:
        stack, seen = list(succ[up]), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in spliced:
                found.append((up, n))
            else:
                stack.extend(succ[n])
    names = {n for pair in found for n in pair}
    pairs = [
        SitePair(u, d, tuple(sorted((n for n in names if rank[u] < rank[n] < rank[d]), key=rank.__getitem__)))
        for u, d in found
    ]
    pairs.sort(key=lambda p: (rank[p.down], tuple(-r for r in rank[p.up])))
    return pairs


def edge_forward(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    ids: Tensor,
    pair: SitePair,
    lrp: LRPConfig | None = None,
) -> dict[str, Tensor]:
    """Clean forward for one pair: returns ``fu``, ``eu`` (upstream leaves) and ``fd``, ``ed``
    (downstream node values, functions of the leaves through the direct path only)."""
    up, down = loaded.site(pair.up), loaded.site(pair.down)
    stops = [loaded.site(n) for n in pair.stop]
    order: list[tuple[Site, str]] = [(up, "up"), *[(s, "stop") for s in stops], (down, "down")]
    order.sort(key=lambda t: t[0].rank)
    if order[0][1] != "up" or order[-1][1] != "down":
        raise ValueError(f"pair {pair} is not in forward order")
    lm = loaded.lm
    saved: dict[str, Tensor] = {}
    with lrp_context(loaded, lrp), lm.trace(ids.to(loaded.device)):
        for site, role in order:
            x = get_activation(lm, site)
            if role == "up":
                out, f, err = splice_with_grad_leaves(dictionaries[site.name], x)
                set_activation(lm, site, out)
                saved["fu"], saved["eu"] = save(f), save(err)
            elif role == "stop":
                set_activation(lm, site, x.detach())
            else:
                fd, ed = encode_with_error(dictionaries[site.name], x)
                saved["fd"], saved["ed"] = save(fd), save(ed)
    return saved


def select_nodes(
    effects: Tensor, threshold: float, *, per_position: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Downstream nodes with |effect| > threshold: (example, position, index, rank within example
    -- within (example, position) with ``per_position``), in (example, position, index) order;
    ``effects`` (b, s, F+1) dense or sparse COO."""
    if effects.is_sparse:
        t = effects.coalesce()
        keep = t.values().abs() > threshold
        e, p, j = t.indices()[:, keep].unbind(0)
    else:
        idx = (effects.abs() > threshold).nonzero()
        e, p, j = idx[:, 0], idx[:, 1], idx[:, 2]
    group = e * effects.shape[1] + p if per_position else e
    counts = torch.bincount(group, minlength=effects.shape[0] * (effects.shape[1] if per_position else 1))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(e.shape[0], device=e.device) - starts[group]
    return e, p, j, rank


def leaf_forward(
    loaded: LoadedModel,
    ids: Tensor,
    names: Collection[str],
    lrp: LRPConfig | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One clean forward in which every named site's output is saved (``outs``, still a function of
    the earlier leaves) and then replaced by a gradient leaf with the same value (``leaves``).

    So d outs[d] / d leaves[u] is the derivative along the paths from u to d that cross no other
    named site: the direct path (docs/algorithms.md, "Edges") when the named sites are all
    the sites between."""
    lm = loaded.lm
    leaves: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    with lrp_context(loaded, lrp), lm.trace(ids.to(loaded.device)):
        for site in sorted((s for s in loaded.all_sites if s.name in names), key=lambda t: t.rank):
            x = get_activation(lm, site)
            outs[site.name] = save(x)
            leaf = x.detach().clone().requires_grad_(True)
            set_activation(lm, site, leaf)
            leaves[site.name] = save(leaf)
    return leaves, outs


def pair_sites(pairs: Sequence[SitePair]) -> set[str]:
    return {n for p in pairs for n in (p.up, p.down, *p.stop)}


def check_direct_pairs(loaded: LoadedModel, pairs: Sequence[SitePair]) -> None:
    """Each pair's stops must be exactly the sites of the computation that lie between its ends."""
    order = {s.name: s.rank for s in loaded.all_sites}
    names = pair_sites(pairs)
    for p in pairs:
        if order[p.up] >= order[p.down]:
            raise ValueError(f"pair {p} is not in forward order")
        between = {n for n in names if order[p.up] < order[n] < order[p.down]}
        if between != set(p.stop):
            raise ValueError(
                f"pair {p}: the sites between its ends are {sorted(between)}, its stops {sorted(p.stop)}"
            )


def _node_cotangents(ae: Dictionary, x: Tensor, j: Tensor, g_f: Tensor, g_err: Tensor, n_fd: int) -> Tensor:
    """d(g . node)/dx for n downstream nodes at their own activation rows ``x`` (n, d): feature node
    j < F is g_j f_j(x), the error node (j = F) is g_err . (x - decode(f(x))). A dictionary with
    :class:`~feature_circuits.dictionaries.FeatureGradients` gives the feature nodes' rows directly;
    otherwise (and always for error nodes) they come through a full encode and its backward."""
    is_f = j < n_fd
    if isinstance(ae, FeatureGradients):
        cot = torch.empty_like(x)
        fi = is_f.nonzero().squeeze(1)
        cot[fi] = g_f[fi].unsqueeze(-1) * ae.feature_gradients(x[fi], j[fi]).to(x)
        ei = (~is_f).nonzero().squeeze(1)
        if ei.numel():
            xe = x[ei].detach().requires_grad_(True)
            with torch.enable_grad():
                _f, err = encode_with_error(ae, xe)
                (cot[ei],) = torch.autograd.grad((err * g_err[ei]).sum(), xe)
        return cot
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # masks as factors, not boolean indexing: no host-device synchronisation
        f, err = encode_with_error(ae, x)
        picked = f.gather(1, j.clamp(max=n_fd - 1).unsqueeze(1)).squeeze(1)
        scalar = (picked * g_f * is_f).sum() + ((err * g_err).sum(-1) * ~is_f).sum()
        (cot,) = torch.autograd.grad(scalar, x)
    return cot


def _vjp_rows(
    out: Tensor, leaves: Sequence[Tensor], cot: Tensor, *, batched: bool
) -> tuple[Tensor | None, ...]:
    """VJPs of the rows of ``cot`` (R, *out.shape) from ``out`` to each leaf: (R, *leaf.shape) each,
    None for a leaf ``out`` does not depend on. One vmapped backward, or (``batched`` False) one
    backward per row, stacked."""
    if batched:
        return torch.autograd.grad(
            [out], list(leaves), [cot], retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    rows = [torch.autograd.grad([out], list(leaves), [c], retain_graph=True, allow_unused=True) for c in cot]
    return tuple(
        None if rows[0][k] is None else torch.stack([r[k] for r in rows]) for k in range(len(leaves))
    )


def position_wise(out: Tensor, leaves: Sequence[Tensor]) -> bool:
    """Whether the derivative of ``out`` (b, s, d) with respect to every leaf (b, s, d_u) is
    block-diagonal over positions (the direct path mixes no positions: MLPs, norms, residual sums;
    not attention), as the backward actually run (LRP rules included) computes it. Probed with one
    VJP of a random cotangent at the last position: a position-wise path leaves every earlier
    position's gradient exactly zero, a mixing one (attention) does not."""
    b, s = int(out.shape[0]), int(out.shape[1])
    if s == 1:
        return True
    gen = torch.Generator().manual_seed(0)
    cot = torch.zeros_like(out)
    cot[:, -1] = torch.randn(b, out.shape[-1], generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad([out], list(leaves), [cot], retain_graph=True, allow_unused=True)
    return all(g is None or not bool(g[:, :-1].any()) for g in grads)


#: per model: whether the direct paths of a downstream site's pairs (with the LRP rules of the
#: backward) mix no positions (:func:`position_wise`)
_POSITION_WISE: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


def _empty_edges(shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.sparse_coo_tensor(
        torch.zeros(5, 0, dtype=torch.long, device=like.device),
        torch.zeros(0, dtype=like.dtype, device=like.device),
        shape,
        check_invariants=False,
    ).coalesce()


#: per upstream site: decoder rows (K, d) of the K features whose delta is non-zero somewhere in the
#: batch, their deltas (b, s, K), the error delta (b, s, d), and the K+1 output columns (K: error node)
UpstreamFactors = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class SparseUpstream:
    """What a sparse upstream site contributes to every edge out of it: its decoder (rows ``w``
    (F, d)), the flat slots (``row`` = e * s + p, feature ``col``; :class:`SparseSiteState`'s
    layout) of the features whose delta is non-zero (the only ones with a non-zero edge), their
    deltas, the CSR offsets of those slots per row, and the error delta (b, s, d)."""

    dec: SparseDecoder
    row: Tensor
    col: Tensor
    delta_f: Tensor
    crow: Tensor
    delta_err: Tensor
    n_features: int

    def edge_values(
        self, g: Tensor, ce: Tensor, q: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Edges for VJP rows ``g`` (n, L, d) of downstream nodes in examples ``ce`` (n,), row
        ``g[i, l]`` being the upstream position ``q[i, l]`` (n, L); ``valid`` (n, L) marks the rows
        that can carry an edge (the others, e.g. future positions, are structurally zero). Flat
        ``(i, q, col, value)`` over the upstream nodes (``col`` F is the error node), non-zero
        values only. Feature values are ``(w[col] . g[i, l]) * delta`` for the slots of row
        (ce[i], q[i, l]): one SDDMM (:meth:`SparseDecoder.dot`) over the chunk, no (slots x d) gather."""
        n, length, d = g.shape
        s = self.delta_err.shape[1]
        up_rows = ce.view(-1, 1) * s + q  # (n, L): the upstream row of each VJP row
        counts = (self.crow[1:] - self.crow[:-1])[up_rows] * valid
        flat_counts = counts.reshape(-1)
        crow = torch.cat([flat_counts.new_zeros(1), flat_counts.cumsum(0)])
        vjp_row = torch.repeat_interleave(torch.arange(n * length, device=g.device), flat_counts)
        slot = self.crow[up_rows.reshape(-1)][vjp_row] + (
            torch.arange(vjp_row.shape[0], device=g.device) - crow[vjp_row]
        )
        col = self.col[slot]
        feat = self.dec.dot(crow, col, g.reshape(n * length, d)) * self.delta_f[slot]
        err = (g * self.delta_err[ce.view(-1, 1), q]).sum(-1)  # (n, L)
        ei, el = valid.nonzero().unbind(1)
        i = torch.cat([vjp_row // length, ei])
        qq = torch.cat([q.reshape(-1)[vjp_row], q[ei, el]])
        cols = torch.cat([col, torch.full_like(ei, self.n_features)])
        vals = torch.cat([feat.to(err.dtype), err[ei, el]])
        keep = vals != 0
        return i[keep], qq[keep], cols[keep], vals[keep]


def sparse_upstream(ae: Dictionary, delta: SparseSiteState, like: Tensor) -> SparseUpstream:
    """:class:`SparseUpstream` of a site on the sparse feature path."""
    keep = delta.values != 0  # a slot with no delta has no edge: not gathered
    row = delta.row[keep]
    return SparseUpstream(
        SparseDecoder.of(ae, like),
        row,
        delta.col[keep],
        delta.values[keep].to(like.dtype),
        row_offsets(row, delta.n_rows),
        delta.err.to(like.dtype),
        delta.n_features,
    )


def upstream_factors(ae: Dictionary, delta: State, like: Tensor) -> UpstreamFactors | SparseUpstream:
    """What an upstream site contributes to every edge out of it (computed once per site)."""
    if isinstance(delta, SparseSiteState):
        return sparse_upstream(ae, delta, like)
    active = (delta.f != 0).any(0).any(0).nonzero().squeeze(1)
    return (
        ae.decoder_directions(like)[active],
        delta.f[..., active].to(like.dtype),
        delta.err.to(like.dtype),
        torch.cat([active, active.new_tensor([delta.f.shape[-1]])]),
    )


def down_edges(
    dictionaries: Mapping[str, Dictionary],
    nodes: NodeEffects,
    down: str,
    ups: Sequence[str],
    leaves: Mapping[str, Tensor],
    outs: Mapping[str, Tensor],
    factors: Mapping[str, UpstreamFactors | SparseUpstream],
    *,
    node_threshold: float,
    chunk_size: int = 64,
    per_position: bool | None = None,
    batched_vjp: bool = True,
) -> dict[str, Tensor]:
    """Sparse COO (b, s_d, F_d+1, s_u, F_u+1) edge effects into site ``down`` from each of ``ups``.
    ``per_position``: whether the direct paths into ``down`` mix no positions (None: probe it,
    :func:`position_wise`). ``batched_vjp``: the rows of a chunk in one vmapped backward
    (``is_grads_batched``); False: one backward per row (a tensor-parallel model, whose collectives
    have no batching rule).

    The VJP is factored so that no F-wide tensor is ever backpropagated: each selected downstream
    node's cotangent on its site output row is computed through its own dictionary (n rows, not
    b*s), one batched VJP per chunk runs through the model from that output to all upstream site
    outputs at once (d wide), and the upstream features' gradients are the products with the
    decoder rows of the features whose delta is non-zero (the only ones with a non-zero edge)."""
    if nodes.grads is None:
        raise ConfigError("edge effects need node gradients: compute nodes with atp, ig or relp (not exact)")
    gd = nodes.grads[down]
    xd = outs[down]
    b, s, n_fd = gd.shape
    shapes = {u: (b, s, n_fd + 1, s, nodes.deltas[u].n_features + 1) for u in ups}
    up_leaves = [leaves[u] for u in ups]
    if per_position is None:
        per_position = position_wise(xd, up_leaves)
    # a VJP row carries one node of every example (every (example, position) when per_position)
    e, p, j, rank = select_nodes(nodes.effects[down], node_threshold, per_position=per_position)
    if e.numel() == 0:
        return {u: _empty_edges(shapes[u], gd.f) for u in ups}
    j_f = j.clamp(max=n_fd - 1)
    cot_rows = _node_cotangents(
        dictionaries[down],
        xd.detach()[e, p],
        j,
        (gd.values_at(e, p, j_f) if isinstance(gd, SparseSiteState) else gd.f[e, p, j_f]).to(xd.dtype),
        gd.err[e, p].to(xd.dtype),
        n_fd,
    )
    # nodes sorted by rank, so that a chunk of rows is a contiguous slice (one synchronisation here)
    order = torch.argsort(rank, stable=True)
    e, p, j, rank, cot_rows = e[order], p[order], j[order], rank[order], cot_rows[order]
    ends = torch.bincount(rank).cumsum(0).tolist()  # ends[r]: nodes of rank <= r
    n_rows = len(ends)
    positions = torch.arange(s, device=xd.device)
    found: dict[str, tuple[list[Tensor], list[Tensor]]] = {u: ([], []) for u in ups}
    for r0 in range(0, n_rows, chunk_size):
        r1 = min(n_rows, r0 + chunk_size)
        sel = slice(ends[r0 - 1] if r0 else 0, ends[r1 - 1])
        ce, cp, cj, cr = e[sel], p[sel], j[sel], rank[sel] - r0
        cot = torch.zeros(r1 - r0, *xd.shape, dtype=xd.dtype, device=xd.device)
        cot[cr, ce, cp] = cot_rows[sel]
        grads = _vjp_rows(xd, up_leaves, cot, batched=batched_vjp)
        with torch.no_grad():
            if per_position:  # each node's gradient lies at its own position only
                q = cp.view(-1, 1)
                valid = torch.ones_like(q, dtype=torch.bool)
            else:  # at the positions up to the node's own; later ones are structurally zero
                q = positions.view(1, -1).expand(cp.shape[0], -1)
                valid = q <= cp.view(-1, 1)
            for u, gxu in zip(ups, grads, strict=True):
                if gxu is None:
                    continue
                fac = factors[u]
                g = gxu[cr, ce, cp].unsqueeze(1) if per_position else gxu[cr, ce]  # (n, L, d)
                if isinstance(fac, SparseUpstream):
                    n_i, su, col, val = fac.edge_values(g, ce, q, valid)
                else:
                    w_act, df_act, derr, cols = fac
                    eq = (ce.view(-1, 1), q)
                    vals = torch.cat([(g @ w_act.T) * df_act[eq], (g * derr[eq]).sum(-1, keepdim=True)], -1)
                    vals = vals.masked_fill(~valid.unsqueeze(-1), 0)
                    n_i, l_i, k = vals.nonzero().unbind(1)
                    su, col, val = q[n_i, l_i], cols[k], vals[n_i, l_i, k]
                found[u][0].append(torch.stack([ce[n_i], cp[n_i], cj[n_i], su, col]))
                found[u][1].append(val)
    return {
        u: torch.sparse_coo_tensor(
            torch.cat(idx, 1), torch.cat(val), shapes[u], check_invariants=False
        ).coalesce()
        if idx
        else _empty_edges(shapes[u], gd.f)
        for u, (idx, val) in found.items()
    }


def edge_effects(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    nodes: NodeEffects,
    *,
    node_threshold: float,
    method: Method | str | None = None,
    lrp: LRPConfig | None = None,
    chunk_size: int = 64,
    pairs: Sequence[SitePair] | None = None,
) -> EdgeEffects:
    """Edge effects of one batch for atp, ig and relp (``method`` defaults to ``nodes.method``; relp
    runs the edge backward with ``lrp`` rules, default ``LRPConfig()``). ``node_threshold``: the
    downstream nodes with |effect| above it get edges. ``chunk_size``: rows per batched VJP (each
    row carries one downstream node of every example). ``pairs``: default :func:`site_pairs`."""
    spec = method_spec(nodes.method if method is None else method)
    if not spec.has_gradients:
        raise ConfigError(
            f"method {spec.method.value}: edge effects are defined for methods with gradients "
            f"({', '.join(m.value for m, s in METHODS.items() if s.has_gradients)})"
        )
    if chunk_size < 1:
        raise ConfigError(f"edge_effects: chunk_size must be >= 1, got {chunk_size}")
    method = spec.method
    lrp = spec.backward_lrp(lrp)
    t0 = time.perf_counter()
    available = set(nodes.effects) & set(dictionaries)
    pairs = site_pairs(loaded, available) if pairs is None else list(pairs)
    check_direct_pairs(loaded, pairs)
    edges: dict[tuple[str, str], Tensor] = {}
    timing: dict[str, float] = {}
    if pairs:
        t1 = time.perf_counter()
        leaves, outs = leaf_forward(loaded, batch.clean, pair_sites(pairs), lrp)
        timing["forward"] = time.perf_counter() - t1
        factors = {
            u: upstream_factors(dictionaries[u], nodes.deltas[u], leaves[u])
            for u in dict.fromkeys(p.up for p in pairs)
        }
        downs = list(dict.fromkeys(p.down for p in pairs))
        known = _POSITION_WISE.setdefault(loaded.hf_model, {})
        for down in downs:
            t1 = time.perf_counter()
            ups = [p.up for p in pairs if p.down == down]
            key = (tuple(p for p in pairs if p.down == down), lrp)
            if key not in known:  # a property of the model and the backward: probed once
                known[key] = position_wise(outs[down], [leaves[u] for u in ups])
            got = down_edges(
                dictionaries,
                nodes,
                down,
                ups,
                leaves,
                outs,
                factors,
                node_threshold=node_threshold,
                chunk_size=chunk_size,
                per_position=known[key],
                batched_vjp=loaded.tensor_parallel == 1,
            )
            for u in ups:
                edges[(u, down)] = got[u]
            timing[f"->{down}"] = time.perf_counter() - t1
        del leaves, outs, factors
    last = loaded.last_resid.name
    if last in nodes.effects:
        edges[(last, LOGIT_ID)] = nodes.effects[last]
    timing["total"] = time.perf_counter() - t0
    return EdgeEffects(method=method, edges=edges, timing_s=timing)
