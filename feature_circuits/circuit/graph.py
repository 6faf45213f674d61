"""Aggregation of node/edge effects and the circuit graph (spec section 6).

    agg_nodes = aggregate_nodes(per_batch_node_effects, "sum")     # AggregatedNodes
    agg_edges = aggregate_edges(per_batch_edge_effects, "sum")     # {(up, down): sparse tensor}
    circuit = build_circuit(agg_nodes, agg_edges, node_threshold=0.1, edge_threshold=0.01, ...)
    save_circuit(circuit, "out/circuit.json"); circuit = load_circuit("out/circuit.json")
    g = to_networkx(circuit); export_graphml(circuit, "out/circuit.graphml")

Aggregation ``sum``: node effects summed over positions, then averaged over examples -> (F+1,) per
site; edges summed over both position axes and averaged over examples -> (F_down+1, F_up+1).
Aggregation ``none``: averaged over examples keeping positions -> (s, F+1) per site and
(s_down, F_down+1, s_up, F_up+1) per edge (all examples must have the same length). Batches
combine as an example-weighted mean (sum over every example, divided by the number of examples).

The circuit keeps nodes with ``|effect| > node_threshold`` and edges between kept nodes with
``|weight| > edge_threshold``. The sink node ``logit`` (id :data:`LOGIT_ID`) is fed by the kept
nodes of the last residual site, with edge weight = the node's effect. The sink is not listed in
``circuit.nodes`` (every listed node is a real SAE node, usable by the evaluation); it appears as the
target of edges and is added as a node by :func:`to_networkx`.

``circuit.json`` (schema version :data:`SCHEMA_VERSION`, JSON Schema in
``feature_circuits/circuit.schema.json``)::

    {"schema_version": 1, "model", "saes", "method", "dataset", "split", "num_examples",
     "aggregation", "node_threshold", "edge_threshold", "total_effect",
     "nodes": [{"id", "site", "kind", "layer", "position", "feature", "is_error", "effect"}],
     "edges": [{"source", "target", "weight"}], "timing_s": {...},
     "tokens": [...] (optional), "n_layers": int (optional), "effects_file": str (optional)}

``effects_file`` (written by discovery, :data:`EFFECTS_FILE`) names a safetensors file beside
circuit.json holding the aggregated effect of EVERY node, not just the kept ones: one float32 tensor
per site, (F+1,) under ``sum`` or (s, F+1) under ``none``, error node last (:func:`save_effects`,
:func:`load_effects`). The evaluation sweeps thresholds over it, so thresholds below the discovery
threshold give larger circuits.

Node ids: ``resid_3/123`` (sum) or ``resid_3@4/123`` (none, position 4); error nodes
``resid_3/err`` / ``resid_3@4/err`` (``feature`` null). ``position`` is null under ``sum``.
``layer`` is -1 for the embedding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feature_circuits.attribution.results import EdgeEffects, NodeEffects
from feature_circuits.errors import CircuitError
from feature_circuits.types import Aggregation, Method, SiteKind

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("circuit.schema.json")
#: File name of the dense node effects written beside circuit.json by discovery.
EFFECTS_FILE = "effects.safetensors"
_EFFECTS_FORMAT = "feature_circuits.node_effects"
LOGIT_ID = "logit"
LOGIT_KIND = "logit"

__all__ = [
    "EFFECTS_FILE",
    "LOGIT_ID",
    "SCHEMA_VERSION",
    "AggregatedNodes",
    "Circuit",
    "CircuitError",
    "Edge",
    "Node",
    "aggregate_edges",
    "aggregate_nodes",
    "build_circuit",
    "circuit_from_dict",
    "circuit_to_dict",
    "export_graphml",
    "load_circuit",
    "load_effects",
    "node_id",
    "parse_site",
    "save_circuit",
    "save_effects",
    "to_networkx",
    "validate_circuit_dict",
]


# -------------------------------------------------------------------------------------- aggregation


def _agg(aggregation: Aggregation | str) -> Aggregation:
    try:
        return Aggregation(aggregation)
    except ValueError:
        raise CircuitError(
            f"unknown aggregation {aggregation!r}; choose one of {[a.value for a in Aggregation]}"
        ) from None


@dataclass(frozen=True, kw_only=True)
class AggregatedNodes:
    """Aggregated node effects: ``effects[site]`` is (F+1,) under ``sum`` or (s, F+1) under ``none``
    (error node last). ``total_effect`` is the mean of m(patch) - m(clean) over the examples."""

    aggregation: Aggregation
    effects: dict[str, Tensor]
    num_examples: int
    total_effect: float
    timing_s: dict[str, float] = field(default_factory=dict)


def _check_lengths(seq_lens: Iterable[int], what: str) -> None:
    lens = sorted(set(seq_lens))
    if len(lens) > 1:
        raise CircuitError(
            f"aggregation 'none' keeps positions and needs examples of equal length, but the {what} have "
            f"lengths {lens}; use aggregation 'sum' or a dataset whose examples all have one length"
        )


def aggregate_nodes(
    batches: Sequence[NodeEffects], aggregation: Aggregation | str = Aggregation.SUM
) -> AggregatedNodes:
    """Combine per-batch node effects (each ``effects[site]`` of shape (b, s, F+1)) into one
    example-weighted mean per site (see the module docstring for the two aggregations)."""
    agg = _agg(aggregation)
    if not batches:
        raise CircuitError("no batches to aggregate")
    sites = list(batches[0].effects)
    if agg is Aggregation.NONE:
        _check_lengths((next(iter(b.effects.values())).shape[1] for b in batches), "batches")
    totals: dict[str, Tensor] = {}
    n = 0
    total_effect = 0.0
    timing: dict[str, float] = {}
    for i, b in enumerate(batches):
        if list(b.effects) != sites:
            raise CircuitError(f"batch {i} has sites {list(b.effects)}, batch 0 has {sites}")
        bsz = None
        for site, eff in b.effects.items():
            if eff.dim() != 3:
                raise CircuitError(
                    f"batch {i}, site {site}: expected effects of shape (b, s, F+1), got {tuple(eff.shape)}"
                )
            bsz = eff.shape[0] if bsz is None else bsz
            if eff.shape[0] != bsz:
                raise CircuitError(f"batch {i}: sites disagree on the batch size")
            part = eff.detach().to(torch.float64)
            part = part.sum(dim=(0, 1)) if agg is Aggregation.SUM else part.sum(dim=0)
            if site in totals and totals[site].shape != part.shape:
                raise CircuitError(
                    f"batch {i}, site {site}: shape {tuple(part.shape)} != {tuple(totals[site].shape)}"
                )
            totals[site] = totals[site] + part.cpu() if site in totals else part.cpu()
        n += int(bsz or 0)
        total_effect += float(b.total_effect.detach().to(torch.float64).sum())
        for k, v in b.timing_s.items():
            timing[k] = timing.get(k, 0.0) + float(v)
    if n == 0:
        raise CircuitError("no examples to aggregate")
    return AggregatedNodes(
        aggregation=agg,
        effects={s: (t / n).to(torch.float32) for s, t in totals.items()},
        num_examples=n,
        total_effect=total_effect / n,
        timing_s=timing,
    )


def aggregate_edges(
    batches: Sequence[EdgeEffects], aggregation: Aggregation | str = Aggregation.SUM
) -> dict[tuple[str, str], Tensor]:
    """Combine per-batch edge effects into an example-weighted mean per site pair.

    Input ``edges[(up, down)]``: (b, s_down, F_down+1, s_up, F_up+1), sparse or dense. Output:
    a coalesced sparse tensor (F_down+1, F_up+1) under ``sum`` (both position axes summed), or
    (s_down, F_down+1, s_up, F_up+1) under ``none``; entry [j, k] is the edge k -> j. The logit
    entries (``(last_resid, "logit")``) are skipped: the sink's edges come from the node effects.
    """
    agg = _agg(aggregation)
    if not batches:
        raise CircuitError("no batches to aggregate")
    totals: dict[tuple[str, str], Tensor] = {}
    n_examples = 0
    for i, b in enumerate(batches):
        bsz = None
        for key, t in b.edges.items():
            if key[1] == LOGIT_ID:
                bsz = t.shape[0] if bsz is None else bsz
                continue
            if t.dim() != 5:
                raise CircuitError(
                    f"batch {i}, edge {key}: expected 5 dims (b, s_down, F_down+1, s_up, F_up+1), got {tuple(t.shape)}"
                )
            bsz = t.shape[0] if bsz is None else bsz
            if t.shape[0] != bsz:
                raise CircuitError(f"batch {i}: edge tensors disagree on the batch size")
            t = (t if t.is_sparse else t.to_sparse()).cpu()
            t = t.coalesce() if not t.is_coalesced() else t
            keep = [2, 4] if agg is Aggregation.SUM else [1, 2, 3, 4]  # axes that survive the sum
            # summing over axes = dropping those index rows and coalescing (duplicates add up)
            part = torch.sparse_coo_tensor(
                t.indices()[keep],
                t.values().to(torch.float64),
                tuple(t.shape[a] for a in keep),
                check_invariants=False,
            ).coalesce()
            if key in totals:
                if totals[key].shape != part.shape:
                    what = "lengths differ" if agg is Aggregation.NONE else "shapes differ"
                    raise CircuitError(
                        f"batch {i}, edge {key}: shape {tuple(part.shape)} != {tuple(totals[key].shape)} ({what}; "
                        "aggregation 'none' needs examples of equal length)"
                    )
                totals[key] = totals[key] + part
            else:
                totals[key] = part
        n_examples += int(bsz or 0)
    if n_examples == 0:
        return {}
    return {k: (v / n_examples).coalesce().to(torch.float32) for k, v in totals.items()}


# -------------------------------------------------------------------------------------- the graph

_SITE_RE = re.compile(r"^(embed)$|^(attn|mlp|resid)_(\d+)$")


def parse_site(site: str) -> tuple[str, int]:
    """``resid_3`` -> ("resid", 3); ``embed`` -> ("embed", -1)."""
    m = _SITE_RE.match(site)
    if not m:
        raise CircuitError(f"not a site name: {site!r} (expected embed, attn_L, mlp_L or resid_L)")
    if m.group(1):
        return SiteKind.EMBED.value, -1
    return m.group(2), int(m.group(3))


def node_id(site: str, feature: int | None, position: int | None = None) -> str:
    """``resid_3/123``, ``resid_3@4/123``, ``resid_3/err`` (feature None = error node)."""
    where = site if position is None else f"{site}@{position}"
    return f"{where}/{'err' if feature is None else feature}"


@dataclass(frozen=True, kw_only=True)
class Node:
    id: str
    site: str
    kind: str
    layer: int
    position: int | None
    feature: int | None
    is_error: bool
    effect: float


@dataclass(frozen=True, kw_only=True)
class Edge:
    source: str
    target: str
    weight: float


@dataclass(frozen=True, kw_only=True)
class Circuit:
    """A thresholded feature circuit (what circuit.json holds)."""

    model: str
    saes: str
    method: str
    dataset: str
    split: str
    num_examples: int
    aggregation: str
    node_threshold: float
    edge_threshold: float
    total_effect: float
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    timing_s: Mapping[str, float] = field(default_factory=dict)
    tokens: tuple[str, ...] | None = None
    n_layers: int | None = None
    effects_file: str | None = None  # dense effects of every node, relative to circuit.json's directory
    schema_version: int = SCHEMA_VERSION

    __hash__ = None  # holds a mapping

    def nodes_by_site(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for nd in self.nodes:
            out.setdefault(nd.site, []).append(nd)
        return out

    @property
    def num_layers(self) -> int:
        if self.n_layers is not None:
            return self.n_layers
        return 1 + max((nd.layer for nd in self.nodes), default=-1)

    def summary(self) -> str:
        """Nodes and edges per site, total effect and time, as a short text."""
        by_site = self.nodes_by_site()
        edges_in: dict[str, int] = {}
        site_of = {nd.id: nd.site for nd in self.nodes}
        for e in self.edges:
            tgt = site_of.get(e.target, e.target)
            edges_in[tgt] = edges_in.get(tgt, 0) + 1
        order = sorted(set(by_site) | set(edges_in), key=_site_sort_key)
        lines = [f"{'site':<10} {'nodes':>6} {'(err)':>6} {'edges in':>9}"]
        for s in order:
            nds = by_site.get(s, [])
            lines.append(f"{s:<10} {len(nds):>6} {sum(n.is_error for n in nds):>6} {edges_in.get(s, 0):>9}")
        lines.append(
            f"total: {len(self.nodes)} nodes, {len(self.edges)} edges; total effect {self.total_effect:+.4f} "
            f"over {self.num_examples} examples"
        )
        if self.timing_s:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timing_s.items()))
        return "\n".join(lines)


def _site_sort_key(site: str) -> tuple[int, int]:
    if site == LOGIT_ID:
        return (10**9, 0)
    kind, layer = parse_site(site)
    return (layer, {"embed": 0, "attn": 1, "mlp": 2, "resid": 3}[kind])


def _kept_entries(eff: Tensor, threshold: float) -> list[tuple[int | None, int, float]]:
    """(position or None, flat index, value) of entries with |value| > threshold."""
    if eff.dim() == 1:
        idx = torch.nonzero(eff.abs() > threshold).flatten().tolist()
        return [(None, int(i), float(eff[i])) for i in idx]
    idx = torch.nonzero(eff.abs() > threshold).tolist()
    return [(int(p), int(i), float(eff[p, i])) for p, i in idx]


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
    last_resid: str | None = None,
    n_layers: int | None = None,
    tokens: Sequence[str] | None = None,
    timing_s: Mapping[str, float] | None = None,
) -> Circuit:
    """Threshold aggregated effects into a :class:`Circuit`.

    ``edges`` may be None or empty (``--nodes-only``): the circuit then has only the logit edges.
    ``last_resid`` (default: the resid site with the highest layer) feeds the logit sink.
    """
    agg = nodes.aggregation
    kept: dict[str, dict[tuple[int | None, int], Node]] = {}
    for site, eff in nodes.effects.items():
        kind, layer = parse_site(site)
        n_feat = eff.shape[-1] - 1
        want_dim = 1 if agg is Aggregation.SUM else 2
        if eff.dim() != want_dim:
            raise CircuitError(
                f"site {site}: aggregated effects have {eff.dim()} dims, expected {want_dim} for {agg.value}"
            )
        per = {}
        for pos, i, val in _kept_entries(eff, node_threshold):
            feat = None if i == n_feat else i
            per[(pos, i)] = Node(
                id=node_id(site, feat, pos),
                site=site,
                kind=kind,
                layer=layer,
                position=pos,
                feature=feat,
                is_error=feat is None,
                effect=val,
            )
        kept[site] = per
    if last_resid is None:
        resids = [s for s in nodes.effects if parse_site(s)[0] == "resid"]
        last_resid = max(resids, key=lambda s: parse_site(s)[1]) if resids else None
    out_edges: list[Edge] = []
    for (up, down), t in (edges or {}).items():
        if down == LOGIT_ID or up not in kept or down not in kept:
            continue
        t = t.coalesce() if t.is_sparse else t.to_sparse().coalesce()
        idx, vals = t.indices(), t.values()
        mask = vals.abs() > edge_threshold
        idx, vals = idx[:, mask], vals[mask]
        ku, kd = kept[up], kept[down]
        for col in range(vals.numel()):
            if agg is Aggregation.SUM:
                j, k = int(idx[0, col]), int(idx[1, col])
                dkey, ukey = (None, j), (None, k)
            else:
                sd, j, su, k = (int(x) for x in idx[:, col])
                dkey, ukey = (sd, j), (su, k)
            if dkey in kd and ukey in ku:
                out_edges.append(Edge(source=ku[ukey].id, target=kd[dkey].id, weight=float(vals[col])))
    if last_resid is not None and last_resid in kept:
        for nd in kept[last_resid].values():
            if abs(nd.effect) > edge_threshold:
                out_edges.append(Edge(source=nd.id, target=LOGIT_ID, weight=nd.effect))
    all_nodes = [
        nd
        for s in sorted(kept, key=_site_sort_key)
        for _, nd in sorted(kept[s].items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1]))
    ]
    order = {nd.id: i for i, nd in enumerate(all_nodes)}
    out_edges.sort(key=lambda e: (order.get(e.target, len(order)), order.get(e.source, 0)))
    if n_layers is None and nodes.effects:
        n_layers = 1 + max(parse_site(s)[1] for s in nodes.effects)
    return Circuit(
        model=str(model),
        saes=str(saes),
        method=Method(method).value,
        dataset=str(dataset),
        split=str(split),
        num_examples=nodes.num_examples,
        aggregation=agg.value,
        node_threshold=float(node_threshold),
        edge_threshold=float(edge_threshold),
        total_effect=float(nodes.total_effect),
        nodes=tuple(all_nodes),
        edges=tuple(out_edges),
        timing_s=dict(timing_s if timing_s is not None else nodes.timing_s),
        tokens=None if tokens is None else tuple(str(t) for t in tokens),
        n_layers=n_layers,
    )


# -------------------------------------------------------------------------------------- JSON

_TOP_KEYS = (
    "schema_version",
    "model",
    "saes",
    "method",
    "dataset",
    "split",
    "num_examples",
    "aggregation",
    "node_threshold",
    "edge_threshold",
    "total_effect",
    "nodes",
    "edges",
    "timing_s",
)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def circuit_to_dict(c: Circuit) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema_version": c.schema_version,
        "model": c.model,
        "saes": c.saes,
        "method": c.method,
        "dataset": c.dataset,
        "split": c.split,
        "num_examples": c.num_examples,
        "aggregation": c.aggregation,
        "node_threshold": c.node_threshold,
        "edge_threshold": c.edge_threshold,
        "total_effect": _finite(c.total_effect),
        "nodes": [
            {
                "id": n.id,
                "site": n.site,
                "kind": n.kind,
                "layer": n.layer,
                "position": n.position,
                "feature": n.feature,
                "is_error": n.is_error,
                "effect": n.effect,
            }
            for n in c.nodes
        ],
        "edges": [{"source": e.source, "target": e.target, "weight": e.weight} for e in c.edges],
        "timing_s": {k: float(v) for k, v in c.timing_s.items()},
    }
    if c.tokens is not None:
        d["tokens"] = list(c.tokens)
    if c.n_layers is not None:
        d["n_layers"] = c.n_layers
    if c.effects_file is not None:
        d["effects_file"] = c.effects_file
    return d


_schema_cache: dict[str, Any] | None = None


def _schema() -> dict[str, Any]:
    global _schema_cache
    if _schema_cache is None:
        _schema_cache = json.loads(SCHEMA_PATH.read_text())
    return _schema_cache


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: Mapping[str, Any], where: str, errors: list[str]) -> None:
    """A small JSON Schema subset: type (str or list), const, enum, minimum, required, properties,
    additionalProperties (bool or schema), items."""
    if len(errors) > 20:
        return
    t = schema.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else list(t)
        if not any(_TYPES[x](value) for x in types):
            errors.append(f"{where}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: expected {schema['const']!r}, got {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r:.60} is not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errors.append(f"{where}: {value!r} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        for k in schema.get("required", ()):
            if k not in value:
                errors.append(f"{where}: missing key {k!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                _check(v, props[k], f"{where}.{k}", errors)
            elif extra is False:
                errors.append(f"{where}: unexpected key {k!r}")
            elif isinstance(extra, dict):
                _check(v, extra, f"{where}.{k}", errors)
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            _check(v, schema["items"], f"{where}[{i}]", errors)


def validate_circuit_dict(d: Any, source: str = "circuit") -> None:
    """Check a parsed circuit.json against ``circuit.schema.json`` and the graph's consistency
    (unique node ids, edge endpoints exist); raise :class:`CircuitError` listing the problems."""
    if not isinstance(d, dict):
        raise CircuitError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if "schema_version" not in d:
        raise CircuitError(f"{source}: missing 'schema_version' (not a feature_circuits circuit.json?)")
    if d["schema_version"] != SCHEMA_VERSION:
        raise CircuitError(
            f"{source}: unsupported schema_version {d['schema_version']!r} (this version of feature_circuits reads "
            f"{SCHEMA_VERSION})"
        )
    errors: list[str] = []
    _check(d, _schema(), "$", errors)
    if not errors:
        ids = [n["id"] for n in d["nodes"]]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                errors.append(f"$.nodes: duplicate node id {i!r}")
            seen.add(i)
        for i, n in enumerate(d["nodes"]):
            if n["is_error"] != (n["feature"] is None):
                errors.append(f"$.nodes[{i}]: is_error must be true exactly when feature is null")
            if d["aggregation"] == "sum" and n["position"] is not None:
                errors.append(f"$.nodes[{i}]: position must be null under aggregation 'sum'")
            if d["aggregation"] == "none" and n["position"] is None:
                errors.append(f"$.nodes[{i}]: position is required under aggregation 'none'")
        for i, e in enumerate(d["edges"]):
            for end in ("source", "target"):
                if e[end] not in seen and not (end == "target" and e[end] == LOGIT_ID):
                    errors.append(f"$.edges[{i}].{end}: unknown node {e[end]!r}")
                    break
    if errors:
        more = "" if len(errors) <= 10 else f"\n  ... and {len(errors) - 10} more"
        raise CircuitError(f"{source}: invalid circuit:\n  " + "\n  ".join(errors[:10]) + more)


def circuit_from_dict(d: Mapping[str, Any], source: str = "circuit") -> Circuit:
    validate_circuit_dict(d, source)
    return Circuit(
        schema_version=d["schema_version"],
        model=d["model"],
        saes=d["saes"],
        method=d["method"],
        dataset=d["dataset"],
        split=d["split"],
        num_examples=d["num_examples"],
        aggregation=d["aggregation"],
        node_threshold=float(d["node_threshold"]),
        edge_threshold=float(d["edge_threshold"]),
        total_effect=float("nan") if d["total_effect"] is None else float(d["total_effect"]),
        nodes=tuple(
            Node(
                **{k: n[k] for k in ("id", "site", "kind", "layer", "position", "feature", "is_error")},
                effect=float(n["effect"]),
            )
            for n in d["nodes"]
        ),
        edges=tuple(
            Edge(source=e["source"], target=e["target"], weight=float(e["weight"])) for e in d["edges"]
        ),
        timing_s={k: float(v) for k, v in d["timing_s"].items()},
        tokens=tuple(d["tokens"]) if d.get("tokens") is not None else None,
        n_layers=d.get("n_layers"),
        effects_file=d.get("effects_file"),
    )


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write ``circuit.json`` (validated before writing)."""
    path = Path(path)
    d = circuit_to_dict(circuit)
    validate_circuit_dict(d, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=1, allow_nan=False) + "\n")
    return path


def load_circuit(path: str | Path) -> Circuit:
    """Read and validate ``circuit.json``; :class:`CircuitError` with the file name on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CircuitError(f"circuit file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CircuitError(f"{path}: not valid JSON ({err})") from None
    return circuit_from_dict(d, str(path))


# -------------------------------------------------------------------------------------- dense effects


def save_effects(effects: Mapping[str, Tensor], path: str | Path, aggregation: Aggregation | str) -> Path:
    """Write dense aggregated node effects (``{site: (F+1,) or (s, F+1)}``, error node last) as a
    float32 safetensors file (metadata: format and aggregation)."""
    from safetensors.torch import save_file

    agg = _agg(aggregation)
    want = 1 if agg is Aggregation.SUM else 2
    tensors = {}
    for site, eff in effects.items():
        parse_site(site)
        if eff.dim() != want:
            raise CircuitError(
                f"effects[{site!r}] has shape {tuple(eff.shape)}; expected {want} dims for {agg.value}"
            )
        tensors[site] = eff.detach().to(device="cpu", dtype=torch.float32).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": _EFFECTS_FORMAT, "aggregation": agg.value})
    return path


def load_effects(path: str | Path, aggregation: Aggregation | str | None = None) -> dict[str, Tensor]:
    """Read a file written by :func:`save_effects`; :class:`CircuitError` naming the file when it is
    missing, unreadable, or does not hold node effects (of ``aggregation``, when given)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CircuitError(f"node effects file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            effects = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CircuitError(
            f"{path}: not a readable safetensors node effects file ({type(err).__name__}: {err})"
        ) from None
    if meta.get("format") != _EFFECTS_FORMAT:
        raise CircuitError(
            f"{path}: not a feature_circuits node effects file (metadata format {meta.get('format')!r})"
        )
    stored = meta.get("aggregation")
    if aggregation is not None and stored != _agg(aggregation).value:
        raise CircuitError(
            f"{path}: effects are for aggregation {stored!r}, the circuit uses {_agg(aggregation).value!r}"
        )
    if not effects:
        raise CircuitError(f"{path}: no node effects in the file")
    want = 1 if stored == Aggregation.SUM.value else 2
    for site, eff in effects.items():
        try:
            parse_site(site)
        except CircuitError as err:
            raise CircuitError(f"{path}: {err}") from None
        if eff.dim() != want or eff.shape[-1] < 1 or not eff.is_floating_point():
            raise CircuitError(
                f"{path}: effects[{site!r}] has shape {tuple(eff.shape)} ({eff.dtype}); expected "
                f"{want} floating-point dims for aggregation {stored!r}"
            )
    return effects


# -------------------------------------------------------------------------------------- networkx


def to_networkx(circuit: Circuit):
    """A ``networkx.DiGraph``: one node per circuit node (attributes site, kind, layer, position,
    feature, is_error, effect) plus the ``logit`` sink (kind ``logit``, layer = n_layers), one edge
    per circuit edge (attribute weight). Graph attributes hold the circuit's metadata."""
    import networkx as nx

    g = nx.DiGraph()
    g.graph.update({k: getattr(circuit, k) for k in _TOP_KEYS if k not in ("nodes", "edges", "timing_s")})
    g.graph["timing_s"] = dict(circuit.timing_s)
    for n in circuit.nodes:
        g.add_node(
            n.id,
            site=n.site,
            kind=n.kind,
            layer=n.layer,
            position=n.position,
            feature=n.feature,
            is_error=n.is_error,
            effect=n.effect,
        )
    g.add_node(
        LOGIT_ID,
        site=LOGIT_ID,
        kind=LOGIT_KIND,
        layer=circuit.num_layers,
        position=None,
        feature=None,
        is_error=False,
        effect=circuit.total_effect,
    )
    for e in circuit.edges:
        g.add_edge(e.source, e.target, weight=e.weight)
    return g


def export_graphml(circuit: Circuit, path: str | Path) -> Path:
    """Write the :func:`to_networkx` graph as GraphML. GraphML has no null: a missing ``position``
    or ``feature`` is written as -1; ``timing_s`` is flattened to ``timing_<key>`` graph attributes."""
    import networkx as nx

    g = to_networkx(circuit)
    for _, attrs in g.nodes(data=True):
        for k in ("position", "feature"):
            if attrs[k] is None:
                attrs[k] = -1
        if not math.isfinite(attrs["effect"]):
            attrs["effect"] = 0.0
    timing = g.graph.pop("timing_s")
    for k, v in timing.items():
        g.graph[f"timing_{k}"] = float(v)
    for k, v in list(g.graph.items()):
        if v is None:
            g.graph[k] = ""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(g, path)
    return path
