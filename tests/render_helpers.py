"""Circuits for the explorer tests, built by hand (pydantic models): a layered circuit with
activations and contexts on every node, and what the page should show for it."""

from __future__ import annotations

import random

from feature_circuits.circuit.schema import Circuit, Context, Edge, Node, NodeActivation
from feature_circuits.types import LOGIT_ID, Aggregation, Method

SITES = ("embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1")


def _activation(rng: random.Random, nd: Node) -> NodeActivation:
    ctxs = []
    for k in range(3):
        toks = ["The", " key", f" w{k}", " to", " the", " cabinets", " is"]
        idx = rng.randrange(len(toks))
        ctxs.append(
            Context(tokens=tuple(toks), index=idx, activation=round(3.0 - k * 0.7, 3), source="discovery")
        )
    return NodeActivation(
        mean_clean=round(rng.uniform(0, 2), 3), mean_patch=round(rng.uniform(0, 2), 3), contexts=tuple(ctxs)
    )


def rich_circuit(
    seed: int = 0, per_site: int = 5, aggregation: str = "sum", drop: frozenset[str] = frozenset()
) -> Circuit:
    """Seven sites (embed .. resid_1) with ``per_site`` nodes each (the last one the error node), every
    node with an activation and three contexts, edges between nodes of different sites (weights of
    both signs) and from resid_1 into the logit. Nodes whose id is in ``drop`` are left out."""
    rng = random.Random(seed)
    agg = Aggregation(aggregation)
    nodes: list[Node] = []
    for site in SITES:
        for i in range(per_site):
            eff = round(rng.choice([1, 1, 1, -1]) * rng.uniform(0.05, 2.0), 4)
            pos = i % 2 if agg is Aggregation.NONE else None
            nd = (
                Node.error_node(site, eff, position=pos)
                if i == per_site - 1
                else Node.feature_node(site, 10 * i + 3, eff, position=pos)
            )
            if nd.id in drop:
                continue
            nodes.append(nd.model_copy(update={"activation": _activation(rng, nd)}))
    rank = {s: k for k, s in enumerate(SITES)}
    edges: list[Edge] = []
    for a in nodes:
        for b in nodes:
            if rank[b.site] - rank[a.site] in (1, 2, 3) and rng.random() < 0.35:
                edges.append(Edge(source=a.id, target=b.id, weight=round(rng.uniform(-0.6, 1.2), 4)))
    edges += [Edge(source=n.id, target=LOGIT_ID, weight=n.effect) for n in nodes if n.site == "resid_1"]
    return Circuit(
        model="tiny <b>model</b>",
        saes="embedded",
        method=Method.RELP,
        dataset="sva_rc",
        split="train",
        num_examples=8,
        aggregation=agg,
        node_threshold=0.01,
        edge_threshold=0.01,
        total_effect=2.5,
        nodes=tuple(nodes),
        edges=tuple(edges),
        n_layers=2,
        tokens=("The", " keys") if agg is Aggregation.NONE else None,
    )


def visible_counts(circuit: Circuit, node_t: float | None, edge_t: float | None) -> tuple[int, int]:
    """Nodes and edges the page shows with node threshold ``node_t`` and edge threshold ``edge_t``
    (None: the slider at its first step, everything)."""
    vis = {n.id for n in circuit.nodes if node_t is None or abs(n.effect) > node_t}
    vis.add(LOGIT_ID)
    n_e = sum(
        1
        for e in circuit.edges
        if e.source in vis and e.target in vis and (edge_t is None or abs(e.weight) > edge_t)
    )
    return len(vis) - 1, n_e


def traced_nodes(circuit: Circuit, k: int) -> set[str]:
    """The nodes "trace from the answer" keeps: backwards from the logit, each reached node's ``k``
    strongest incoming edges (ties by source id)."""
    inc: dict[str, list[Edge]] = {}
    for e in circuit.edges:
        inc.setdefault(e.target, []).append(e)
    seen = {LOGIT_ID}
    todo = [LOGIT_ID]
    while todo:
        t = todo.pop(0)
        for e in sorted(inc.get(t, []), key=lambda e: (-abs(e.weight), e.source))[:k]:
            if e.source not in seen:
                seen.add(e.source)
                todo.append(e.source)
    seen.discard(LOGIT_ID)
    return seen
