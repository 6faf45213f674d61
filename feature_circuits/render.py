"""Self-contained interactive HTML page of a circuit (plotly.js inlined, works offline).

    render_circuit_html(circuit, "out/circuit.html", labels="labels.jsonl")

Layout: layers bottom to top (embed at the bottom, the ``logit`` sink on top); within a layer band,
columns for attn / mlp / resid (under ``none`` aggregation one such column group per token position,
labelled with the tokens of the first example). Nodes: blue = positive effect, red = negative, size
by |effect|, error nodes are squares (features are circles). Edges: lines, width by |weight|, colour
by sign. Hover shows site, position/token, feature index, effect and the label when given. A slider
raises the node threshold in the page (nodes with |effect| at or below the step's threshold, and
their edges, are hidden) without re-running discovery.

For the Pythia-70M Marks et al. SAEs (``circuit.saes == "marks"`` and a pythia-70m-deduped model),
clicking a feature node opens its Neuronpedia page,
``https://www.neuronpedia.org/pythia-70m-deduped/{layer}-{res|att|mlp}-sm/{feature}`` (the SAE sets
``res-sm`` / ``att-sm`` / ``mlp-sm`` of the P70D-SM release; layer-indexed). Assumption: the
embedding SAE has no such layer-indexed page, so embed nodes and error nodes get no link.

Every piece of text that comes from data (labels, tokens, model / dataset names) is escaped with
:func:`html.escape`, both in the HTML around the plot and in plotly's hover / tick text (which
plotly.js renders as a subset of HTML). Status for automated checks: after plotly has drawn, the page
writes the number of drawn node markers into ``<div id="fc-status" data-rendered-points=..>`` and
any JavaScript error into ``<div id="fc-errors">``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from feature_circuits.circuit.schema import Circuit, Node
from feature_circuits.errors import LabelsError
from feature_circuits.types import LOGIT_ID, Aggregation, SiteKind

__all__ = ["LabelsError", "load_labels", "neuronpedia_url", "render_circuit_html", "slider_thresholds"]

POS_COLOR = "#1f77b4"
NEG_COLOR = "#d62728"
POS_EDGE = "rgba(31,119,180,0.35)"
NEG_EDGE = "rgba(214,39,40,0.45)"
KIND_COL = {SiteKind.ATTN: 0, SiteKind.MLP: 1, SiteKind.RESID: 2, SiteKind.EMBED: 1}
KIND_DY = {SiteKind.ATTN: -0.22, SiteKind.MLP: 0.0, SiteKind.RESID: 0.22, SiteKind.EMBED: 0.0}
#: Neuronpedia's name of each site kind in the P70D-SM release (the embedding has no page).
NEURONPEDIA_KIND = {SiteKind.RESID: "res", SiteKind.ATTN: "att", SiteKind.MLP: "mlp"}
WIDTH_BINS = 4
MAX_TABLE_ROWS = 3000


Labels = Mapping[tuple[str, "int | None"], str]


def load_labels(
    path: str | Path, sizes: Mapping[str, int] | None = None
) -> dict[tuple[str, int | None], str]:
    """Read a labels file: JSON Lines ``{"site": "resid_3", "feature": 123, "label": "plural nouns"}``
    (``feature`` null labels the site's error node). Blank lines are skipped; anything else that is
    not such an object raises :class:`LabelsError` with ``path:line:``. With ``sizes`` (site name ->
    dictionary size: the model's sites), a site not among them or a feature index past its
    dictionary is such an error too."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file not found: {path}")
    out: dict[tuple[str, int | None], str] = {}
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError as err:
            raise LabelsError(f"{path}: not UTF-8 ({err})") from None
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LabelsError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(d, dict):
            raise LabelsError(f"{where}: expected an object with keys site, feature, label")
        missing = [k for k in ("site", "feature", "label") if k not in d]
        if missing:
            raise LabelsError(f"{where}: missing key(s) {missing}")
        site, feat, label = d["site"], d["feature"], d["label"]
        if not isinstance(site, str) or not site:
            raise LabelsError(f"{where}: 'site' must be a non-empty string, got {site!r}")
        if feat is not None and (isinstance(feat, bool) or not isinstance(feat, int) or feat < 0):
            raise LabelsError(f"{where}: 'feature' must be a non-negative integer or null, got {feat!r}")
        if not isinstance(label, str):
            raise LabelsError(f"{where}: 'label' must be a string, got {type(label).__name__}")
        if sizes is not None and site not in sizes:
            raise LabelsError(f"{where}: unknown site {site!r}; the model's sites are {', '.join(sizes)}")
        if sizes is not None and feat is not None and feat >= sizes[site]:
            raise LabelsError(
                f"{where}: feature {feat} is out of range for site {site} (dictionary size {sizes[site]})"
            )
        out[(site, feat)] = label
    return out


def neuronpedia_url(circuit: Circuit, node: Node) -> str | None:
    """The node's Neuronpedia page for the Pythia-70M Marks SAEs, else None."""
    if circuit.saes != "marks" or "pythia-70m" not in circuit.model.lower() or node.feature is None:
        return None
    kind = NEURONPEDIA_KIND.get(node.kind)
    if kind is None or node.layer < 0:
        return None
    return f"https://www.neuronpedia.org/pythia-70m-deduped/{int(node.layer)}-{kind}-sm/{int(node.feature)}"


def slider_thresholds(circuit: Circuit, steps: int = 8) -> list[float]:
    """Node thresholds for the slider: the circuit's own, then geometric steps up to max |effect|."""
    t0 = float(circuit.node_threshold)
    mags = [abs(n.effect) for n in circuit.nodes if math.isfinite(n.effect)]
    amax = max(mags, default=0.0)
    if amax <= max(t0, 0.0) * 1.0001 or steps <= 1:
        return [t0]
    base = t0 if t0 > 0 else max(min((m for m in mags if m > 0), default=amax) / 2, 1e-12)
    out = [t0] + [base * (amax / base) ** (k / steps) for k in range(1, steps)]
    return sorted(set(out))


def _level(mag: float, thresholds: list[float]) -> int:
    lvl = 0
    for k, t in enumerate(thresholds):
        if mag > t:
            lvl = k
    return lvl


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


def _layout_positions(circuit: Circuit) -> dict[str, tuple[float, float]]:
    none = circuit.aggregation is Aggregation.NONE
    groups: dict[tuple[int, int], list[Node]] = {}
    for nd in circuit.nodes:
        col = KIND_COL.get(nd.kind, 1)
        if none:
            col += 3 * (nd.position or 0)
        groups.setdefault((col, nd.layer), []).append(nd)
    pos: dict[str, tuple[float, float]] = {}
    for (col, layer), nds in groups.items():
        nds.sort(key=lambda n: (n.is_error, n.feature if n.feature is not None else 0))
        n = len(nds)
        spacing = min(0.8 / max(n, 1), 0.2)
        for i, nd in enumerate(nds):
            x = col + (i - (n - 1) / 2) * spacing
            y = (layer + 1) + KIND_DY.get(nd.kind, 0.0)
            pos[nd.id] = (x, y)
    n_cols = 3 * (1 + max((nd.position or 0 for nd in circuit.nodes), default=0)) if none else 3
    pos[LOGIT_ID] = ((n_cols - 1) / 2, circuit.num_layers + 1)
    return pos


def _ptext(s: str) -> str:
    """Escape text for plotly (hover, ticks, titles): plotly.js renders a subset of HTML there and decodes
    only a few named entities (&lt; &gt; &amp;) plus numeric ones, so quotes are left as they are (they
    cannot open a tag once < and > are escaped)."""
    return html.escape(s, quote=False)


def _hover(circuit: Circuit, nd: Node, labels: Labels) -> str:
    e = _ptext
    lines = [f"<b>{e(nd.site)}</b>"]
    if nd.position is not None:
        tok = ""
        if circuit.tokens is not None and 0 <= nd.position < len(circuit.tokens):
            tok = f" ({e(repr(circuit.tokens[nd.position]))})"
        lines.append(f"position {nd.position}{tok}")
    lines.append("error node" if nd.is_error else f"feature {nd.feature}")
    lines.append(f"effect {_fmt(nd.effect)}")
    label = labels.get((nd.site, nd.feature))
    if label:
        lines.append(f"label: {e(label)}")
    return "<br>".join(lines)


def _figure(circuit: Circuit, labels: Labels):
    import plotly.graph_objects as go

    thresholds = slider_thresholds(circuit)
    k_steps = len(thresholds)
    pos = _layout_positions(circuit)
    mags = [abs(n.effect) for n in circuit.nodes if math.isfinite(n.effect)]
    amax = max(mags, default=1.0) or 1.0
    level = {nd.id: _level(abs(nd.effect), thresholds) for nd in circuit.nodes}
    level[LOGIT_ID] = k_steps  # always visible

    traces: list[Any] = []
    trace_level: list[int] = []
    # edges: one trace per (level, sign, width bin)
    wmax = max((abs(e.weight) for e in circuit.edges if math.isfinite(e.weight)), default=1.0) or 1.0
    edge_groups: dict[tuple[int, bool, int], list] = {}
    for ed in circuit.edges:
        if ed.source not in pos or ed.target not in pos:
            continue
        lvl = min(level.get(ed.source, 0), level.get(ed.target, 0))
        w = abs(ed.weight) / wmax if math.isfinite(ed.weight) else 0.0
        b = min(int(w * WIDTH_BINS), WIDTH_BINS - 1)
        edge_groups.setdefault((min(lvl, k_steps - 1), ed.weight >= 0, b), []).append(ed)
    for (lvl, positive, b), eds in sorted(edge_groups.items()):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for ed in eds:
            (x0, y0), (x1, y1) = pos[ed.source], pos[ed.target]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                showlegend=False,
                line={
                    "width": 0.5 + 3.5 * (b + 0.5) / WIDTH_BINS,
                    "color": POS_EDGE if positive else NEG_EDGE,
                },
                name=f"edges {'+' if positive else '-'} level {lvl}",
            )
        )
        trace_level.append(lvl)
    # nodes: one trace per level
    for lvl in range(k_steps):
        nds = [nd for nd in circuit.nodes if level[nd.id] == lvl]
        if not nds:
            continue
        traces.append(
            go.Scatter(
                x=[pos[n.id][0] for n in nds],
                y=[pos[n.id][1] for n in nds],
                mode="markers",
                hoverinfo="text",
                hovertext=[_hover(circuit, n, labels) for n in nds],
                showlegend=False,
                customdata=[neuronpedia_url(circuit, n) or "" for n in nds],
                marker={
                    "size": [
                        8 + 22 * math.sqrt(min(abs(n.effect) / amax, 1.0)) if math.isfinite(n.effect) else 8
                        for n in nds
                    ],
                    "color": [POS_COLOR if n.effect >= 0 else NEG_COLOR for n in nds],
                    "symbol": ["square" if n.is_error else "circle" for n in nds],
                    "line": {
                        "width": [2 if n.is_error else 0.5 for n in nds],
                        "color": ["#222" if n.is_error else "#fff" for n in nds],
                    },
                    "opacity": 0.9,
                },
                name=f"nodes level {lvl}",
            )
        )
        trace_level.append(lvl)
    lx, ly = pos[LOGIT_ID]
    traces.append(
        go.Scatter(
            x=[lx],
            y=[ly],
            mode="markers+text",
            text=["logit"],
            textposition="top center",
            hoverinfo="text",
            hovertext=[f"<b>logit</b><br>total effect {_fmt(circuit.total_effect)}"],
            showlegend=False,
            customdata=[""],
            marker={"size": 18, "color": "#7f7f7f", "symbol": "diamond"},
            name="logit",
        )
    )
    trace_level.append(k_steps)

    fig = go.Figure(data=traces)
    steps = []
    for i, t in enumerate(thresholds):
        n_vis = sum(1 for nd in circuit.nodes if level[nd.id] >= i)
        steps.append(
            {
                "method": "restyle",
                "label": f"{t:.3g}",
                "args": [{"visible": [lv >= i for lv in trace_level]}],
                "name": f"{n_vis} nodes",
            }
        )
    n_layers = circuit.num_layers
    none = circuit.aggregation is Aggregation.NONE
    if none:
        n_pos = 1 + max((nd.position or 0 for nd in circuit.nodes), default=0)
        if circuit.tokens is not None:
            n_pos = max(n_pos, len(circuit.tokens))
        toks = list(circuit.tokens or [])
        tickvals = [3 * p + 1 for p in range(n_pos)]
        ticktext = [_ptext(repr(toks[p])) if p < len(toks) else str(p) for p in range(n_pos)]
        x_range = [-0.8, 3 * n_pos - 0.2]
    else:
        tickvals, ticktext, x_range = [0, 1, 2], ["attn", "mlp", "resid"], [-0.8, 2.8]
    title = _ptext(
        f"{circuit.method.value} circuit: {circuit.model} / {circuit.saes} on "
        f"{circuit.dataset} ({circuit.split}, {circuit.num_examples} examples)"
    )
    if not circuit.nodes:
        title += "<br>" + _ptext(circuit.empty_note())
    fig.update_layout(
        title={"text": title},
        xaxis={
            "tickvals": tickvals,
            "ticktext": ticktext,
            "range": x_range,
            "showgrid": False,
            "zeroline": False,
            "title": {"text": "token position" if none else "site kind"},
        },
        yaxis={
            "tickvals": list(range(n_layers + 2)),
            "ticktext": ["embed"] + [f"layer {i}" for i in range(n_layers)] + ["logit"],
            "range": [-0.6, n_layers + 1.6],
            "showgrid": True,
            "zeroline": False,
        },
        height=max(500, 110 * (n_layers + 2)),
        plot_bgcolor="white",
        hovermode="closest",
        margin={"l": 70, "r": 20, "t": 60, "b": 120},
        sliders=[
            {
                "active": 0,
                "currentvalue": {"prefix": "node threshold |effect| > "},
                "pad": {"t": 50},
                "steps": steps,
            }
        ],
    )
    expected = sum(1 for nd in circuit.nodes if level[nd.id] >= 0) + 1
    return fig, expected


_POST_SCRIPT = """
var gd = document.getElementById('{plot_id}');
function fcCount() {
  var n = gd.querySelectorAll('.scatterlayer .trace .points path.point').length;
  var st = document.getElementById('fc-status');
  st.setAttribute('data-rendered-points', String(n));
  st.setAttribute('data-done', '1');
  st.textContent = 'rendered ' + n + ' node markers (incl. logit)';
}
fcCount();
gd.on('plotly_afterplot', fcCount);
if (window.location.hash === '#fc-hover') {
  // test hook: hover every node marker in turn (plotly throttles hover events, hence the timer) and
  // record each hover label's text content in a pre element, id fc-hovertexts
  var todo = [], out = [];
  gd.data.forEach(function (tr, c) {
    if (tr.mode === 'lines') return;
    for (var p = 0; p < tr.x.length; p++) todo.push([c, p]);
  });
  var step = function () {
    if (!todo.length) {
      var pre = document.createElement('pre');
      pre.id = 'fc-hovertexts';
      pre.textContent = out.join('\\n');
      document.body.appendChild(pre);
      return;
    }
    var cp = todo.shift();
    Plotly.Fx.unhover(gd);
    Plotly.Fx.hover(gd, [{curveNumber: cp[0], pointNumber: cp[1]}]);
    var hl = gd.querySelector('.hoverlayer');
    out.push(hl ? hl.textContent : '');
    setTimeout(step, 120);
  };
  setTimeout(step, 120);
}
gd.on('plotly_click', function (ev) {
  if (!ev || !ev.points || !ev.points.length) return;
  var url = ev.points[0].customdata;
  if (typeof url === 'string' && url.indexOf('https://www.neuronpedia.org/') === 0) {
    window.open(url, '_blank', 'noopener');
  }
});
"""

_ONERROR = """<script>
(function () {
  function report(msg) {
    var box = document.getElementById('fc-errors');
    if (!box) { return; }
    var d = document.createElement('div');
    d.className = 'fc-error';
    d.textContent = String(msg);
    box.appendChild(d);
  }
  window.onerror = function (msg, src, line, col) { report(msg + ' @' + src + ':' + line + ':' + col); };
  window.addEventListener('unhandledrejection', function (ev) {
    report('unhandled rejection: ' + ev.reason);
  });
})();
</script>"""

_CSS = """body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.meta{font-size:13px;color:#444}#fc-status{font-size:11px;color:#888}#fc-errors{color:#b00}
.key span{display:inline-block;margin-right:1.2em}"""


def render_circuit_html(
    circuit: Circuit, path: str | Path, labels: Labels | str | Path | None = None
) -> Path:
    """Write ``path``: a self-contained HTML page (plotly.js inlined) showing the circuit."""
    import plotly.io as pio

    if labels is None:
        labels = {}
    elif isinstance(labels, (str, Path)):
        labels = load_labels(labels)
    fig, expected = _figure(circuit, labels)
    plot_html = pio.to_html(
        fig,
        include_plotlyjs=True,
        full_html=False,
        div_id="fc-graph",
        post_script=_POST_SCRIPT,
        config={"displaylogo": False, "responsive": True},
    )
    e = html.escape
    meta = [
        ("model", circuit.model),
        ("SAEs", circuit.saes),
        ("method", circuit.method.value),
        ("metric", circuit.metric.value),
        ("dataset", f"{circuit.dataset} ({circuit.split})"),
        ("examples", str(circuit.num_examples)),
        ("aggregation", circuit.aggregation.value),
        ("node threshold", f"{circuit.node_threshold:g}"),
        ("edge threshold", f"{circuit.edge_threshold:g}"),
        ("total effect", _fmt(circuit.total_effect)),
        ("nodes / edges", f"{len(circuit.nodes)} / {len(circuit.edges)}"),
    ]
    if circuit.tokens is not None:
        meta.append(("tokens (first example)", " | ".join(repr(t) for t in circuit.tokens)))
    rows = []
    for nd in sorted(circuit.nodes, key=lambda n: -abs(n.effect))[:MAX_TABLE_ROWS]:
        url = neuronpedia_url(circuit, nd)
        tok = ""
        if nd.position is not None:
            tok = str(nd.position)
            if circuit.tokens is not None and nd.position < len(circuit.tokens):
                tok += f" {circuit.tokens[nd.position]!r}"
        link = f'<a href="{e(url)}" target="_blank" rel="noopener">neuronpedia</a>' if url else ""
        rows.append(
            f"<tr><td>{e(nd.id)}</td><td>{e(nd.site)}</td><td>{e(tok)}</td>"
            f"<td>{'error' if nd.is_error else nd.feature}</td><td>{_fmt(nd.effect)}</td>"
            f'<td class="fc-label">{e(labels.get((nd.site, nd.feature), ""))}</td><td>{link}</td></tr>'
        )
    more = len(circuit.nodes) - len(rows)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{e(f"circuit: {circuit.model} / {circuit.method.value} / {circuit.dataset}")}</title>
<style>{_CSS}</style>
{_ONERROR}
</head><body>
<h2>Feature circuit</h2>
<div class="meta">{"<br>".join(f"<b>{e(k)}</b>: {e(v)}" for k, v in meta)}</div>
<div class="key meta"><span style="color:{POS_COLOR}">&#9679; positive effect</span>
<span style="color:{NEG_COLOR}">&#9679; negative effect</span><span>&#9632; error node</span>
<span>&#9679; feature</span><span>size: |effect|; edge width: |weight|</span></div>
{f'<p id="fc-empty"><b>{e(circuit.empty_note())}</b></p>' if not circuit.nodes else ""}
<div id="fc-errors"></div>
<div id="fc-status" data-expected-nodes="{expected}" data-rendered-points="" data-done="0"></div>
{plot_html}
<h3>Nodes</h3>
<table id="fc-nodes"><thead><tr><th>id</th><th>site</th><th>position</th><th>feature</th><th>effect</th>
<th>label</th><th>link</th></tr></thead><tbody>
{"".join(rows)}
</tbody></table>
{f"<p>... and {more} more nodes (see circuit.json)</p>" if more > 0 else ""}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
