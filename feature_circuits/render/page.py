"""The explorer page: one self-contained HTML file (cytoscape.js and the page's own script inlined; no
network request), built from a :class:`~feature_circuits.circuit.Circuit`.

Layout (computed here, drawn as a preset layout): one row per site in execution order, the embedding
at the bottom and the ``logit`` sink on top; within a row the nodes are ordered so that edges cross
little (barycentre passes up and down the rows); under aggregation ``none`` each token position is a
column, headed by its token. Edges are S-shaped curves (vertical at both ends, so a path can be
followed row to row), width and opacity by |weight|, blue for positive and red for negative weights.

The circuit goes into the page as JSON in a ``<script type="application/json">`` element with ``<``,
``>`` and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026`` (no data can close the element); the
page's script puts every piece of text into the document with ``textContent`` (never as HTML), and
cytoscape draws node labels as canvas text. So a label ``<script>alert(1)</script>`` shows as text.

What the page does is described in ``docs/explorer.md``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from feature_circuits.circuit.schema import Circuit, Edge, Node
from feature_circuits.errors import CircuitError
from feature_circuits.render.labels import Group, Labels, load_labels
from feature_circuits.types import LOGIT_ID, Aggregation, Site, SiteKind

__all__ = [
    "edge_thresholds",
    "initial_edge_step",
    "layout",
    "neuronpedia_url",
    "page_data",
    "render_circuit_html",
    "render_compare_html",
    "slider_thresholds",
]

#: Neuronpedia's name of each site kind in the P70D-SM release (the embedding has no page).
NEURONPEDIA_KIND = {SiteKind.RESID: "res", SiteKind.ATTN: "att", SiteKind.MLP: "mlp"}
#: Slider steps (node threshold, edge threshold).
SLIDER_STEPS = 24
#: The page opens with the edge slider at the first step that shows at most this many edges.
DEFAULT_MAX_EDGES = 250
#: Contexts shown per node, tokens either side of the firing token.
MAX_CONTEXTS = 8
ROW_DY = 62.0
LAYER_GAP = 26.0
NODE_DX = 70.0
COLUMN_GAP = 50.0

LabelsLike = Mapping[tuple[str, Any], str]


def neuronpedia_url(circuit: Circuit, node: Node) -> str | None:
    """The node's Neuronpedia page: from the circuit's dictionaries (``circuit.neuronpedia_url``) when
    they name a Neuronpedia id; else, for the Pythia-70M Marks SAEs (``saes == "marks"``), the P70D-SM
    release's ``{layer}-{res|att|mlp}-sm/{feature}``; else None (always None for error nodes)."""
    url = circuit.neuronpedia_url(node)
    if url is not None:
        return url
    if circuit.saes != "marks" or "pythia-70m" not in circuit.model.lower() or node.feature is None:
        return None
    kind = NEURONPEDIA_KIND.get(node.kind)
    if kind is None or node.layer < 0:
        return None
    return f"https://www.neuronpedia.org/pythia-70m-deduped/{int(node.layer)}-{kind}-sm/{int(node.feature)}"


def _quantiles(t0: float, mags: Sequence[float], steps: int) -> list[float]:
    """``t0``, then thresholds that each hide about ``1/steps`` more of ``mags`` (the k-th step hides
    the ``k * n // steps`` smallest; the strongest always stay), ascending, without repeats."""
    m = sorted(x for x in mags if x > t0)
    out = [t0]
    for k in range(1, max(steps, 1)):
        idx = k * len(m) // steps
        if idx >= 1 and m[idx - 1] > out[-1] and m[idx - 1] < m[-1]:
            out.append(m[idx - 1])
    return out


def slider_thresholds(circuit: Circuit, steps: int = 8) -> list[float]:
    """Node thresholds for the node slider (a node is shown when its |effect| is above the step's
    threshold): the circuit's own, then steps that each hide about ``1/steps`` more of its nodes."""
    mags = [abs(n.effect) for n in circuit.nodes if math.isfinite(n.effect)]
    return _quantiles(float(circuit.node_threshold), mags, steps)


def edge_thresholds(circuit: Circuit, steps: int = 8) -> list[float]:
    """Edge thresholds for the edge slider: the circuit's own, then steps that each hide about
    ``1/steps`` more of its edges."""
    mags = [abs(e.weight) for e in circuit.edges if math.isfinite(e.weight)]
    return _quantiles(float(circuit.edge_threshold), mags, steps)


def initial_edge_step(circuit: Circuit, steps: Sequence[float], max_edges: int = DEFAULT_MAX_EDGES) -> int:
    """The edge slider's step when the page opens: the first that shows at most ``max_edges`` edges
    (step 0, every edge, when the circuit has no more than that)."""
    for k, t in enumerate(steps):
        if sum(1 for e in circuit.edges if k == 0 or abs(e.weight) > t) <= max_edges:
            return k
    return len(steps) - 1


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Node positions (page pixels, y down), row labels (site, y) and column labels (text, x)."""

    pos: dict[str, tuple[float, float]]
    rows: list[tuple[str, float]]
    columns: list[tuple[str, float]]


def _rows(circuit: Circuit) -> list[str]:
    sites = {nd.site for nd in circuit.nodes} | set(circuit.dictionaries)
    return sorted((s for s in sites if Site.is_name(s)), key=Site.rank_of)


def layout(circuit: Circuit) -> Layout:
    """Rows by site (embed at the bottom), columns by position under aggregation ``none``; nodes in a
    cell ordered by the weighted mean x of their neighbours (two passes up, one down)."""
    rows = _rows(circuit)
    y_of: dict[str, float] = {}
    y = 0.0
    prev_layer: int | None = None
    for site in rows:
        _kind, layer = Site.parse(site)
        if prev_layer is not None:
            y -= ROW_DY + (LAYER_GAP if layer != prev_layer else 0.0)
        y_of[site] = y
        prev_layer = layer
    logit_y = y - ROW_DY - LAYER_GAP
    none = circuit.aggregation is Aggregation.NONE
    cells: dict[tuple[str, int], list[Node]] = {}
    for nd in circuit.nodes:
        cells.setdefault((nd.site, nd.position or 0), []).append(nd)
    n_pos = 1 + max((nd.position or 0 for nd in circuit.nodes), default=0)
    if none and circuit.tokens is not None:
        n_pos = max(n_pos, len(circuit.tokens))
    width = [max((len(v) for (_s, p), v in cells.items() if p == q), default=1) for q in range(n_pos)]
    centre: list[float] = []
    x0 = 0.0
    for q in range(n_pos):
        w = max(width[q] - 1, 0) * NODE_DX
        centre.append(x0 + w / 2)
        x0 += w + NODE_DX + COLUMN_GAP
    shift = (centre[-1] + centre[0]) / 2 if centre else 0.0
    centre = [c - shift for c in centre]

    x: dict[str, float] = {LOGIT_ID: 0.0}

    def place(order: dict[tuple[str, int], list[Node]]) -> None:
        for (_site, p), nds in order.items():
            n = len(nds)
            for i, nd in enumerate(nds):
                x[nd.id] = centre[p] + (i - (n - 1) / 2) * NODE_DX

    for nds in cells.values():
        nds.sort(key=lambda n: (n.is_error, -abs(n.effect)))
    place(cells)
    rank = {nd.id: Site.rank_of(nd.site) for nd in circuit.nodes}
    rank[LOGIT_ID] = (10**9, 0)
    ins: dict[str, list[Edge]] = {}
    outs: dict[str, list[Edge]] = {}
    for ed in circuit.edges:
        ins.setdefault(ed.target, []).append(ed)
        outs.setdefault(ed.source, []).append(ed)

    def sweep(up: bool) -> None:
        keys = sorted(cells, key=lambda c: Site.rank_of(c[0]), reverse=not up)
        for cell in keys:
            nds = cells[cell]

            def bary(nd: Node) -> float:
                nbrs = [(e.source, e.weight) for e in ins.get(nd.id, ())] if up else []
                if not up:
                    nbrs = [(e.target, e.weight) for e in outs.get(nd.id, ())]
                tot = sum(abs(w) for _, w in nbrs)
                if tot <= 0:
                    return x[nd.id]
                return sum(abs(w) * x[m] for m, w in nbrs) / tot

            nds.sort(key=lambda n: (bary(n), n.id))
            place({cell: nds})

    for up in (True, False, True):
        sweep(up)
    pos = {nd.id: (x[nd.id], y_of[nd.site]) for nd in circuit.nodes}
    pos[LOGIT_ID] = (0.0, logit_y)
    columns: list[tuple[str, float]] = []
    if none:
        toks = list(circuit.tokens or [])
        columns = [(repr(toks[q]) if q < len(toks) else f"position {q}", centre[q]) for q in range(n_pos)]
    return Layout(pos=pos, rows=[(s, y_of[s]) for s in rows] + [(LOGIT_ID, logit_y)], columns=columns)


# -------------------------------------------------------------------------------------- page data


def _activation(nd: Node) -> dict[str, Any] | None:
    act = nd.activation
    if act is None:
        return None
    return {
        "mc": act.mean_clean,
        "mp": act.mean_patch,
        "ctx": [[list(c.tokens), c.index, c.activation, c.source] for c in act.contexts[:MAX_CONTEXTS]],
    }


def _node_data(circuit: Circuit, nd: Node, labels: LabelsLike, xy: tuple[float, float]) -> dict[str, Any]:
    tok = None
    if nd.position is not None and circuit.tokens is not None and nd.position < len(circuit.tokens):
        tok = circuit.tokens[nd.position]
    return {
        "id": nd.id,
        "site": nd.site,
        "kind": nd.kind.value,
        "layer": nd.layer,
        "pos": nd.position,
        "tok": tok,
        "f": nd.feature,
        "err": nd.is_error,
        "eff": nd.effect,
        "lab": labels.get((nd.site, nd.feature), ""),
        "url": neuronpedia_url(circuit, nd),
        "act": _activation(nd),
        "x": round(xy[0], 2),
        "y": round(xy[1], 2),
    }


def _meta(circuit: Circuit) -> list[list[str]]:
    meta = [
        ["model", circuit.model],
        ["SAEs", circuit.saes],
        ["method", circuit.method.value],
        ["metric", circuit.metric.value],
        ["dataset", f"{circuit.dataset} ({circuit.split})"],
        ["examples", str(circuit.num_examples)],
        ["aggregation", circuit.aggregation.value],
        ["node threshold", f"{circuit.node_threshold:g}"],
        ["edge threshold", f"{circuit.edge_threshold:g}"],
        ["total effect", f"{circuit.total_effect:+.4g}"],
        ["nodes / edges", f"{len(circuit.nodes)} / {len(circuit.edges)}"],
    ]
    if circuit.sites_without_dictionary:
        meta.append(["sites without dictionary", ", ".join(circuit.sites_without_dictionary)])
    if circuit.tokens is not None:
        meta.append(["tokens (first example)", " | ".join(repr(t) for t in circuit.tokens)])
    return meta


def _title(circuit: Circuit) -> str:
    return (
        f"{circuit.method.value} circuit: {circuit.model} / {circuit.saes} on {circuit.dataset} "
        f"({circuit.split}, {circuit.num_examples} examples)"
    )


def page_data(
    circuit: Circuit,
    labels: LabelsLike | None = None,
    groups: Sequence[Group] | None = None,
) -> dict[str, Any]:
    """Everything the page's script draws, as JSON-ready data (see the module docstring)."""
    labels = labels or {}
    if groups is None:
        groups = labels.groups if isinstance(labels, Labels) else []
    lay = layout(circuit)
    e_steps = edge_thresholds(circuit, SLIDER_STEPS)
    return {
        "title": _title(circuit),
        "meta": _meta(circuit),
        "empty": circuit.empty_note() if not circuit.nodes else "",
        "aggregation": circuit.aggregation.value,
        "total_effect": circuit.total_effect if math.isfinite(circuit.total_effect) else None,
        "nodes": [_node_data(circuit, nd, labels, lay.pos[nd.id]) for nd in circuit.nodes],
        "logit": {"x": lay.pos[LOGIT_ID][0], "y": lay.pos[LOGIT_ID][1]},
        "edges": [[e.source, e.target, e.weight] for e in circuit.edges],
        "rows": [[s, y] for s, y in lay.rows],
        "columns": [[t, x] for t, x in lay.columns],
        "node_thresholds": slider_thresholds(circuit, SLIDER_STEPS),
        "edge_thresholds": e_steps,
        "initial_edge_step": initial_edge_step(circuit, e_steps),
        # labels not on any node of this circuit travel along, so the page's download keeps them
        "labels": [[s, f, lab] for (s, f), lab in labels.items()],
        "groups": [{"name": g.name, "nodes": list(g.nodes)} for g in groups],
        "compare": None,
    }


# ------------------------------------------------------------------------------------------ HTML


@cache
def _asset(name: str) -> str:
    return files("feature_circuits.render").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def _json_for_script(data: object) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


#: The page may run its own inline script and style and nothing else: no request leaves it.
_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:"


def _page(data: dict[str, Any]) -> str:
    e = html.escape
    lib = _asset("cytoscape.min.js").replace("</script", "<\\/script")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>{e(data["title"])}</title>
<style>{_asset("explorer.css")}</style>
<script>{_asset("onerror.js")}</script>
</head><body>
<div id="fc-errors"></div>
<div id="fc-status" data-done="0"></div>
<script type="application/json" id="fc-data">{_json_for_script(data)}</script>
{f'<p id="fc-empty">{e(data["empty"])}</p>' if data["empty"] else ""}
<div id="fc-app"></div>
<script>{lib}</script>
<script>{_asset("explorer.js")}</script>
</body></html>
"""


def _labels(labels: Labels | LabelsLike | str | Path | None) -> LabelsLike:
    if labels is None:
        return Labels()
    if isinstance(labels, (str, Path)):
        return load_labels(labels)
    return labels


def _write(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def render_circuit_html(
    circuit: Circuit, path: str | Path, labels: Labels | LabelsLike | str | Path | None = None
) -> Path:
    """Write ``path``: the explorer page of ``circuit`` (labels and groups from ``labels``: a
    :class:`Labels`, a plain ``{(site, feature): label}`` mapping or a labels/groups file)."""
    return _write(path, _page(page_data(circuit, _labels(labels))))


def _union(a: Circuit, b: Circuit) -> tuple[Circuit, dict[str, str], dict[tuple[str, str], str]]:
    if a.aggregation is not b.aggregation:
        raise CircuitError(
            f"cannot compare circuits of aggregation {a.aggregation.value!r} and {b.aggregation.value!r}"
        )
    a_ids = {nd.id for nd in a.nodes}
    b_ids = {nd.id for nd in b.nodes}
    nodes = list(a.nodes) + [nd for nd in b.nodes if nd.id not in a_ids]
    a_edges = {(e.source, e.target) for e in a.edges}
    b_edges = {(e.source, e.target) for e in b.edges}
    edges = list(a.edges) + [e for e in b.edges if (e.source, e.target) not in a_edges]
    node_in = {
        i: "both" if i in a_ids and i in b_ids else ("a" if i in a_ids else "b") for i in a_ids | b_ids
    }
    edge_in = {
        k: "both" if k in a_edges and k in b_edges else ("a" if k in a_edges else "b")
        for k in a_edges | b_edges
    }
    n_layers = max(a.num_layers, b.num_layers)
    union = a.replace(
        nodes=tuple(nodes),
        edges=tuple(edges),
        n_layers=n_layers,
        dictionaries={**b.dictionaries, **a.dictionaries},
        node_threshold=min(a.node_threshold, b.node_threshold),
        edge_threshold=min(a.edge_threshold, b.edge_threshold),
        tokens=a.tokens if a.tokens is not None else b.tokens,
    )
    return union, node_in, edge_in


def render_compare_html(
    a: Circuit,
    b: Circuit,
    path: str | Path,
    labels: Labels | LabelsLike | str | Path | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> Path:
    """Write ``path``: circuits ``a`` and ``b`` overlaid on one layout (the union of their nodes):
    each node and edge is marked as in both, only in A or only in B, and the side panel shows both
    effects. :class:`CircuitError` when the two have different aggregations."""
    lab = _labels(labels)
    union, node_in, edge_in = _union(a, b)
    data = page_data(union, lab)
    eff_b = {nd.id: nd.effect for nd in b.nodes}
    eff_a = {nd.id: nd.effect for nd in a.nodes}
    w_b = {(e.source, e.target): e.weight for e in b.edges}
    for nd in data["nodes"]:
        nd["in"] = node_in[nd["id"]]
        nd["effA"] = eff_a.get(nd["id"])
        nd["effB"] = eff_b.get(nd["id"])
    data["edges"] = [
        [s, t, w, edge_in[(s, t)], w_b.get((s, t))] for s, t, w in ((e[0], e[1], e[2]) for e in data["edges"])
    ]
    counts = {k: sum(1 for v in node_in.values() if v == k) for k in ("both", "a", "b")}
    data["title"] = f"compare: {names[0]} vs {names[1]}"
    data["meta"] = [
        ["A", f"{names[0]}: {_title(a)}"],
        ["B", f"{names[1]}: {_title(b)}"],
        ["nodes", f"{counts['both']} in both, {counts['a']} only in A, {counts['b']} only in B"],
        ["aggregation", a.aggregation.value],
        ["total effect", f"A {a.total_effect:+.4g}, B {b.total_effect:+.4g}"],
    ]
    data["compare"] = {"names": list(names), "counts": counts}
    return _write(path, _page(data))
