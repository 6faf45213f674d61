"""Thresholds: aggregated effects -> a :class:`~feature_circuits.circuit.schema.Circuit`
(docs/algorithms.md, "Aggregation and the circuit graph").

    circuit = build_circuit(agg_nodes, agg_edges, node_threshold=0.1, edge_threshold=0.01, ...)

The circuit keeps the nodes with ``|effect| > node_threshold`` and the edges between kept nodes
with ``|weight| > edge_threshold``. The sink node ``logit`` (:data:`~feature_circuits.types.LOGIT_ID`)
is fed by the kept nodes of the last residual site whose effect passes ``edge_threshold``, with
edge weight = the node's effect. The sink is not listed in ``circuit.nodes`` (every listed node is a
real dictionary node, usable by the evaluation); it is the target of edges and is added as a node
by :func:`~feature_circuits.circuit.export.to_networkx`. Nodes are listed by site in execution
order, then by position and index; edges by target, then source, in that node order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import ValidationError
from torch import Tensor

from feature_circuits.circuit.aggregate import AggregatedNodes
from feature_circuits.circuit.schema import Circuit, Edge, Node
from feature_circuits.errors import CircuitError
from feature_circuits.metrics import MetricName
from feature_circuits.types import LOGIT_ID, Aggregation, Method, Site, SiteKind

__all__ = ["build_circuit"]

#: A kept node's key within its site: (position or None, flat index).
_Key = tuple[int | None, int]


def _kept_entries(eff: Tensor, threshold: float) -> list[tuple[int | None, int, float]]:
    """(position or None, flat index, value) of entries with |value| > threshold."""
    if eff.dim() == 1:
        idx = torch.nonzero(eff.abs() > threshold).flatten().tolist()
        return [(None, int(i), float(eff[i])) for i in idx]
    idx = torch.nonzero(eff.abs() > threshold).tolist()
    return [(int(p), int(i), float(eff[p, i])) for p, i in idx]


def _kept_nodes(nodes: AggregatedNodes, node_threshold: float) -> dict[str, dict[_Key, Node]]:
    agg = nodes.aggregation
    want_dim = 1 if agg is Aggregation.SUM else 2
    kept: dict[str, dict[_Key, Node]] = {}
    for site, eff in nodes.effects.items():
        if not Site.is_name(site):
            raise CircuitError(f"aggregated effects: not a site name: {site!r}")
        if eff.dim() != want_dim:
            raise CircuitError(
                f"site {site}: aggregated effects have {eff.dim()} dims, expected {want_dim} for {agg.value}"
            )
        n_features = eff.shape[-1] - 1
        kept[site] = {
            (pos, i): Node.from_index(site, i, n_features, val, pos)
            for pos, i, val in _kept_entries(eff, node_threshold)
        }
    return kept


def _kept_edges(
    kept: Mapping[str, Mapping[_Key, Node]],
    edges: Mapping[tuple[str, str], Tensor],
    aggregation: Aggregation,
    edge_threshold: float,
) -> list[Edge]:
    out: list[Edge] = []
    for (up, down), t in edges.items():
        if down == LOGIT_ID or up not in kept or down not in kept:
            continue
        t = t.coalesce() if t.is_sparse else t.to_sparse().coalesce()
        idx, vals = t.indices(), t.values()
        mask = vals.abs() > edge_threshold
        idx, vals = idx[:, mask], vals[mask]
        ku, kd = kept[up], kept[down]
        for col in range(vals.numel()):
            if aggregation is Aggregation.SUM:
                j, k = int(idx[0, col]), int(idx[1, col])
                dkey, ukey = (None, j), (None, k)
            else:
                sd, j, su, k = (int(x) for x in idx[:, col])
                dkey, ukey = (sd, j), (su, k)
            if dkey in kd and ukey in ku:
                out.append(Edge(source=ku[ukey].id, target=kd[dkey].id, weight=float(vals[col])))
    return out


def _last_resid(sites: Sequence[str]) -> str | None:
    resids = [s for s in sites if Site.parse(s)[0] is SiteKind.RESID]
    return max(resids, key=lambda s: Site.parse(s)[1]) if resids else None


def build_circuit(
    nodes: AggregatedNodes,
    edges: Mapping[tuple[str, str], Tensor] | None,
    *,
    node_threshold: float,
    edge_threshold: float,
    model: str,
    saes: str,
    method: Method | str,
    dataset: str,
    split: str,
    metric: MetricName | str = MetricName.LOGIT_DIFF,
    last_resid: str | None = None,
    n_layers: int | None = None,
    tokens: Sequence[str] | None = None,
    timing_s: Mapping[str, float] | None = None,
) -> Circuit:
    """Threshold aggregated effects into a :class:`Circuit` (see the module docstring).

    ``edges`` may be None or empty (``--nodes-only``): the circuit then has only the logit edges.
    The circuit records the largest |effect| of any node (``max_abs_effect``), which an empty circuit
    reports. ``last_resid`` (default: the resid site with the highest layer) feeds the logit sink; ``metric``
    is the metric the effects were computed with (recorded in the circuit); ``n_layers`` defaults
    to one more than the highest layer among the sites.
    """
    try:
        method, metric = Method(method), MetricName(metric)
    except ValueError as err:
        raise CircuitError(f"build_circuit: {err}") from None
    kept = _kept_nodes(nodes, node_threshold)
    if last_resid is None:
        last_resid = _last_resid(list(kept))
    out_edges = _kept_edges(kept, edges or {}, nodes.aggregation, edge_threshold)
    if last_resid is not None and last_resid in kept:
        out_edges += [
            Edge(source=nd.id, target=LOGIT_ID, weight=nd.effect)
            for nd in kept[last_resid].values()
            if abs(nd.effect) > edge_threshold
        ]
    all_nodes = [
        nd
        for s in sorted(kept, key=Site.rank_of)
        for _, nd in sorted(kept[s].items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1]))
    ]
    order = {nd.id: i for i, nd in enumerate(all_nodes)}
    out_edges.sort(key=lambda e: (order.get(e.target, len(order)), order.get(e.source, 0)))
    finite = [e[torch.isfinite(e)].abs() for e in nodes.effects.values()]
    largest = max((float(e.max()) for e in finite if e.numel()), default=None)
    if n_layers is None and kept:
        n_layers = 1 + max(Site.parse(s)[1] for s in kept)
    try:
        return Circuit(
            model=str(model),
            saes=str(saes),
            method=method,
            metric=metric,
            dataset=str(dataset),
            split=str(split),
            num_examples=nodes.num_examples,
            aggregation=nodes.aggregation,
            node_threshold=float(node_threshold),
            edge_threshold=float(edge_threshold),
            total_effect=float(nodes.total_effect),
            nodes=tuple(all_nodes),
            edges=tuple(out_edges),
            timing_s=dict(timing_s if timing_s is not None else nodes.timing_s),
            tokens=None if tokens is None else tuple(str(t) for t in tokens),
            n_layers=n_layers,
            max_abs_effect=largest,
        )
    except ValidationError as err:
        raise CircuitError(f"build_circuit: invalid circuit:\n{err}") from None
