"""Edge effects between direct-path site pairs (spec section 4).

edge(k -> j) = g_j . (d d_j / d u_k)|clean . delta u_k, with g_j the downstream node's gradient from
the node pass (plain for atp, IG-averaged for ig, LRP propagation coefficient for relp: for relp the
edge backward also runs with the LRP rules on).

One clean forward per site pair: the upstream site's output is decode(f_u) + err_u with f_u, err_u
grad leaves (the gradient reaches the features through the decoder only), the intermediate sites
named by the pair are replaced by their detached clean value (direct paths only), and the
downstream node values are f_d = encode(x_d), err_d = x_d - decode(f_d). The VJPs from the selected
downstream nodes are batched with ``is_grads_batched``: row r of a batched VJP carries the r-th
selected node of EVERY example at once (examples are independent), so a pair costs
ceil(max nodes per example / chunk_size) batched backwards. Future positions are structurally zero
and not stored; exact zeros are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..dictionaries import encode_with_error, splice_with_grad_leaves
from ..lrp import lrp_context
from ..sites import get_activation, set_activation
from ..types import LRPConfig, Method, Site
from .base import EdgeEffects, NodeEffects


@dataclass(frozen=True)
class SitePair:
    up: str
    down: str
    stop: tuple[str, ...] = ()


def site_pairs(loaded: Any, available: set[str] | None = None) -> list[SitePair]:
    """The direct-path pairs of spec section 4, in forward order of the downstream site."""
    pairs: list[SitePair] = []
    for layer in range(loaded.n_layers):
        prev = "embed" if layer == 0 else f"resid_{layer - 1}"
        attn, mlp, resid = f"attn_{layer}", f"mlp_{layer}", f"resid_{layer}"
        pairs.append(SitePair(prev, attn))
        if not loaded.parallel_residual:
            pairs.append(SitePair(attn, mlp))
        pairs.append(SitePair(prev, mlp, (attn,)))
        pairs += [SitePair(mlp, resid), SitePair(attn, resid, (mlp,)), SitePair(prev, resid, (attn, mlp))]
    if available is not None:
        pairs = [p for p in pairs if p.up in available and p.down in available]
    return pairs


def edge_forward(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    ids: Tensor,
    pair: SitePair,
    lrp: LRPConfig | None = None,
) -> dict[str, Tensor]:
    """Clean forward for one pair: returns ``fu``, ``eu`` (upstream leaves) and ``fd``, ``ed``
    (downstream node values, functions of the leaves through the direct path only)."""
    by_name = {s.name: s for s in loaded.sites}
    up, down = by_name[pair.up], by_name[pair.down]
    stops = [by_name[n] for n in pair.stop]
    order: list[tuple[Site, str]] = [(up, "up"), *[(s, "stop") for s in stops], (down, "down")]
    order.sort(key=lambda t: t[0].order)
    if order[0][1] != "up" or order[-1][1] != "down":
        raise ValueError(f"pair {pair} is not in forward order")
    lm = loaded.lm
    saved: dict[str, Any] = {}
    with lrp_context(loaded, lrp), lm.trace(ids.to(loaded.device)):
        for site, role in order:
            x = get_activation(lm, site)
            if role == "up":
                out, f, err = splice_with_grad_leaves(dictionaries[site.name], x)
                set_activation(lm, site, out)
                saved["fu"], saved["eu"] = f.save(), err.save()
            elif role == "stop":
                set_activation(lm, site, x.detach())
            else:
                fd, ed = encode_with_error(dictionaries[site.name], x)
                saved["fd"], saved["ed"] = fd.save(), ed.save()
    return saved


def select_nodes(effects: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Downstream nodes with |effect| > threshold: (example, position, index, rank within example)."""
    idx = (effects.abs() > threshold).nonzero()
    e, p, j = idx[:, 0], idx[:, 1], idx[:, 2]
    counts = torch.bincount(e, minlength=effects.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(idx.shape[0], device=idx.device) - starts[e]
    return e, p, j, rank


def pair_edges(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    batch: Any,
    nodes: NodeEffects,
    pair: SitePair,
    *,
    node_threshold: float,
    lrp: LRPConfig | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Sparse COO (b, s_d, F_d+1, s_u, F_u+1) edge effects of one site pair."""
    if nodes.grads is None:
        raise ValueError("edge effects need node gradients: compute nodes with atp, ig or relp (not exact)")
    gd = nodes.grads[pair.down]
    du = nodes.deltas[pair.up]
    b, s, n_fd = gd.f.shape
    n_fu = du.f.shape[-1]
    shape = (b, s, n_fd + 1, s, n_fu + 1)
    e, p, j, rank = select_nodes(nodes.effects[pair.down], node_threshold)
    dev = gd.f.device
    if e.numel() == 0:
        return torch.sparse_coo_tensor(torch.zeros(5, 0, dtype=torch.long, device=dev),
                                       torch.zeros(0, dtype=gd.f.dtype, device=dev), shape,
                                       check_invariants=False).coalesce()
    saved = edge_forward(loaded, dictionaries, batch.clean, pair, lrp=lrp)
    fu, eu, fd, ed = saved["fu"], saved["eu"], saved["fd"], saved["ed"]
    n_rows = int(rank.max()) + 1
    positions = torch.arange(s, device=dev)
    all_idx, all_val = [], []
    for r0 in range(0, n_rows, chunk_size):
        r1 = min(n_rows, r0 + chunk_size)
        sel = (rank >= r0) & (rank < r1)
        ce, cp, cj, cr = e[sel], p[sel], j[sel], rank[sel] - r0
        is_f = cj < n_fd
        cot_f = torch.zeros(r1 - r0, *fd.shape, dtype=fd.dtype, device=fd.device)
        cot_e = torch.zeros(r1 - r0, *ed.shape, dtype=ed.dtype, device=ed.device)
        cot_f[cr[is_f], ce[is_f], cp[is_f], cj[is_f]] = gd.f[ce[is_f], cp[is_f], cj[is_f]].to(fd.dtype)
        cot_e[cr[~is_f], ce[~is_f], cp[~is_f]] = gd.err[ce[~is_f], cp[~is_f]].to(ed.dtype)
        gfu, geu = torch.autograd.grad(
            [fd, ed], [fu, eu], [cot_f, cot_e], retain_graph=r1 < n_rows, is_grads_batched=True, allow_unused=True
        )
        if gfu is None:
            gfu = torch.zeros(r1 - r0, *fu.shape, dtype=fu.dtype, device=fu.device)
        if geu is None:
            geu = torch.zeros(r1 - r0, *eu.shape, dtype=eu.dtype, device=eu.device)
        with torch.no_grad():
            vf = gfu[cr, ce] * du.f[ce]  # (n, s_u, F_u)
            ve = (geu[cr, ce] * du.err[ce]).sum(-1, keepdim=True)  # (n, s_u, 1)
            vals = torch.cat([vf, ve], -1)
            vals = vals * (positions.view(1, -1, 1) <= cp.view(-1, 1, 1))  # drop future positions
            nz = vals.nonzero()
            n_i, su, k = nz[:, 0], nz[:, 1], nz[:, 2]
            all_idx.append(torch.stack([ce[n_i], cp[n_i], cj[n_i], su, k]))
            all_val.append(vals[n_i, su, k])
    return torch.sparse_coo_tensor(torch.cat(all_idx, 1), torch.cat(all_val), shape, check_invariants=False).coalesce()


def edge_effects(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    batch: Any,
    nodes: NodeEffects,
    *,
    node_threshold: float,
    method: Method | str | None = None,
    lrp: LRPConfig | None = None,
    chunk_size: int = 64,
    pairs: list[SitePair] | None = None,
) -> EdgeEffects:
    """Edge effects of one batch for atp, ig and relp (``method`` defaults to ``nodes.method``; relp
    runs the edge backward with ``lrp`` rules, default ``LRPConfig()``). ``chunk_size``: rows per
    batched VJP (each row carries one downstream node of every example)."""
    method = Method(nodes.method if method is None else method)
    if method is Method.EXACT:
        raise ValueError("edge effects are defined for atp, ig and relp (exact has no gradients)")
    if method is Method.RELP:
        lrp = LRPConfig() if lrp is None else lrp
    else:
        lrp = None
    t0 = time.perf_counter()
    available = set(nodes.effects) & set(dictionaries)
    pairs = site_pairs(loaded, available) if pairs is None else pairs
    edges: dict[tuple[str, str], Tensor] = {}
    timing: dict[str, float] = {}
    for pair in pairs:
        t1 = time.perf_counter()
        edges[(pair.up, pair.down)] = pair_edges(
            loaded, dictionaries, batch, nodes, pair, node_threshold=node_threshold, lrp=lrp, chunk_size=chunk_size
        )
        timing[f"{pair.up}->{pair.down}"] = time.perf_counter() - t1
    last = f"resid_{loaded.n_layers - 1}"
    if last in nodes.effects:
        edges[(last, "logit")] = nodes.effects[last]
    timing["total"] = time.perf_counter() - t0
    return EdgeEffects(method=method, edges=edges, timing_s=timing)
