"""What an evaluation reports: ``eval.json``, the ``eval.html`` plot, the summary table; and the
held-out rule (the evaluation data must not be the discovery data).

``eval.json`` (:func:`eval_json`) holds first ``circuit``: the circuit exactly as stored in
circuit.json (its own nodes at its ``threshold``: ``n_nodes``, ``faithfulness``, ``completeness``,
standard variant; each variant's under ``variants.<v>.stored``; absent for bare aggregated
effects) and, when any, ``warnings`` (e.g. the effects file disagrees with circuit.json: nodes
removed or added by hand), then the standard variant's curves at the top level
(``thresholds``, ``n_nodes``, ``faithfulness``, ``completeness``; faithfulness ``null`` where it is
undefined), every variant under ``variants`` (the same curves plus the raw metric values
``m_circuit``, ``m_complement``, ``m_full``, ``m_empty``), then how the sweep was made:
``standard_variant``, ``below_discovery_threshold``, ``discovery_node_threshold``, ``sweep_nodes``
(``all``: every node's effect from the effects file; ``stored``: only the circuit's nodes),
``aggregation``, ``free_layers``, ``n_nodes_total``, ``num_examples``, ``metric`` (its name in
:mod:`feature_circuits.metrics`), ``ablation`` (the kind: ``mean``, ``zero``, ``patch``,
``resample``), ``means``, ``seed``, a human-readable ``note``, and the circuit's provenance (model,
saes, method, dataset, split, plus what the caller adds, e.g. the evaluation dataset).

Version 2 (``version``) adds the integrated scores (docs/algorithms.md, "Integrated scores"), all
the standard variant's at the top level and each variant's under ``variants.<v>``:
``scores: {auc, cpr, cmd}``; ``grid: {auc_sizes, mib_fractions, auc_n_nodes, mib_n_nodes, n_nodes,
capped, faithfulness, n_ranked}`` (the top-k circuits' faithfulness at every node count
``n_nodes``); ``intervals: {level, draws, seed, auc, cpr, cmd, faithfulness, completeness,
grid_faithfulness, circuit_faithfulness, circuit_completeness}`` (``[lo, hi]`` each, lists of them
per threshold or grid size; absent without a bootstrap); ``baseline: {kind, variant, draws, seed,
scores: {auc: {mean, std}, ...}, draw_scores, grid_faithfulness_mean, grid_faithfulness_std}``
(absent without draws). Version 1 files have none of these and ``ablation`` as prose.

Sign of the raw metric values: they are the metric the circuit was discovered with, as
:mod:`feature_circuits.metrics` defines it; for ``logit_diff`` that is logit(patch answer) -
logit(clean answer). Files written before the metric had one owner stored logit(clean answer) -
logit(patch answer) under ``m_*`` (the opposite sign) and the prose definition under ``metric``.
Faithfulness and completeness are ratios of metric differences and are unchanged.

``eval.html`` (:func:`plot_html`) is one self-contained plotly page (plotly.js inlined):
faithfulness and completeness against the number of nodes (log x axis; points with 0 nodes are not
drawn), one line per circuit and variant, the circuit as stored marked on each (a star), with
bootstrap error bars on the standard variant; below, the faithfulness of the top-k circuits on
the grid with the random baseline (mean ± std over its draws), and the integrated scores per
circuit with their intervals and the baseline's.

Held-out protocol (docs/algorithms.md, "Evaluation"): :func:`check_held_out` refuses the circuit's
own dataset and split by name or file, :func:`check_disjoint` refuses evaluation examples that are
among the discovery examples whatever the files are called; both unless explicitly allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feature_circuits.errors import EvaluationError, FeatureCircuitsError
from feature_circuits.evaluation.masks import Variant
from feature_circuits.evaluation.scores import Baseline, Grid, Intervals, Scores
from feature_circuits.evaluation.sweep import CircuitPoint, EvalResult, VariantCurve

if TYPE_CHECKING:
    from feature_circuits.data import Pair

__all__ = [
    "EVAL_JSON_VERSION",
    "EvalJson",
    "check_disjoint",
    "check_held_out",
    "default_dataset",
    "eval_json",
    "plot_html",
    "resolved_dataset",
    "summary_table",
]


# --------------------------------------------------------------------------------------------------
# Dataset choice and the held-out rule


def _split_file(path: Path) -> tuple[str, str] | None:
    m = re.fullmatch(r"(.+)_(train|test)\.jsonl", path.name)
    return (m.group(1), m.group(2)) if m else None


def default_dataset(circuit_dataset: str, split: str) -> str:
    """The circuit's dataset for ``split``: a shipped name stays a name (its ``split`` file is used);
    a path ``X_<split>.jsonl`` is swapped for its sibling ``X_<split>.jsonl`` of the requested split
    when that exists."""
    p = Path(circuit_dataset)
    if p.is_file():
        parts = _split_file(p)
        if parts is not None:
            sibling = p.with_name(f"{parts[0]}_{split}.jsonl")
            if sibling.is_file():
                return str(sibling)
    return circuit_dataset


def resolved_dataset(name: str, split: str) -> Path | None:
    """The file a dataset name or path resolves to for ``split``, or None when it does not resolve."""
    from feature_circuits.data import resolve_dataset

    try:
        return Path(resolve_dataset(name, split)).resolve()
    except (FeatureCircuitsError, OSError):
        return None


def check_disjoint(
    eval_pairs: Sequence[Pair], discovery_pairs: Sequence[Pair], eval_name: str, discovery_name: str
) -> None:
    """Refuse (EvaluationError) when evaluation examples are among the examples the circuit was
    discovered on (same prompts and answers), whatever the files are called."""

    def key(p: Pair) -> tuple[str, str, str, str]:
        return (p.clean_prefix, p.patch_prefix, p.clean_answer, p.patch_answer)

    seen = {key(p) for p in discovery_pairs}
    shared = [p for p in eval_pairs if key(p) in seen]
    if shared:
        first = shared[0]
        raise EvaluationError(
            f"{len(shared)} of {len(eval_pairs)} evaluation examples of {eval_name} are among the "
            f"{len(discovery_pairs)} examples the circuit was discovered on ({discovery_name}), e.g. line "
            f"{first.line}: {first.clean_prefix!r}; held-out evaluation needs disjoint data; pass "
            "--allow-discovery-split to do it anyway"
        )


def check_held_out(
    circuit_dataset: str, circuit_split: str, dataset: str, split: str, *, allow: bool
) -> None:
    """Refuse (EvaluationError) to evaluate on the data the circuit was discovered on, unless ``allow``."""
    if allow:
        return
    a, b = resolved_dataset(circuit_dataset, circuit_split), resolved_dataset(dataset, split)
    same = (
        (a == b)
        if (a is not None and b is not None)
        else (circuit_dataset == dataset and circuit_split == split)
    )
    if same:
        raise EvaluationError(
            f"refusing to evaluate on the circuit's own discovery data (dataset {circuit_dataset!r}, split "
            f"{circuit_split!r}, file {b or dataset}): held-out evaluation needs disjoint data "
            "(--split test, or --dataset with held-out examples); pass --allow-discovery-split to do it "
            "anyway"
        )


# --------------------------------------------------------------------------------------------------
# eval.json

#: A JSON value as :func:`json.dumps` writes it.
JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]
#: The ``eval.json`` document.
EvalJson = dict[str, JsonValue]
#: ``version`` of the ``eval.json`` written (2: integrated scores, intervals, baseline, ablation kind).
EVAL_JSON_VERSION = 2


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _scores_json(scores: Scores) -> EvalJson:
    return {k: _num(v) for k, v in scores.as_dict().items()}


def _interval(iv: tuple[float, float]) -> list[JsonValue]:
    return [_num(iv[0]), _num(iv[1])]


def _intervals_json(iv: Intervals) -> EvalJson:
    out: EvalJson = {"level": iv.level, "draws": iv.draws, "seed": iv.seed}
    out.update({k: _interval(v) for k, v in iv.scores.items()})
    out["faithfulness"] = [_interval(x) for x in iv.faithfulness]
    out["completeness"] = [_interval(x) for x in iv.completeness]
    out["grid_faithfulness"] = [_interval(x) for x in iv.grid_faithfulness]
    if iv.stored is not None:
        out["circuit_faithfulness"] = _interval(iv.stored["faithfulness"])
        out["circuit_completeness"] = _interval(iv.stored["completeness"])
    return out


def _grid_json(grid: Grid, curve: VariantCurve) -> EvalJson:
    return {
        "auc_sizes": list(grid.auc_sizes),
        "mib_fractions": list(grid.fractions),
        "auc_n_nodes": list(grid.auc_k),
        "mib_n_nodes": list(grid.mib_k),
        "n_nodes": list(grid.sizes),
        "capped": list(grid.capped),
        "n_ranked": grid.n_ranked,
        "faithfulness": _json_floats(curve.grid_faithfulness),
    }


def _baseline_json(b: Baseline) -> EvalJson:
    mean, std = b.scores_mean.as_dict(), b.scores_std.as_dict()
    return {
        "kind": "random",
        "variant": b.variant,
        "draws": b.draws,
        "seed": b.seed,
        "scores": {k: {"mean": _num(mean[k]), "std": _num(std[k])} for k in mean},
        "draw_scores": [_scores_json(s) for s in b.draw_scores],
        "grid_faithfulness_mean": _json_floats(b.grid_faithfulness_mean),
        "grid_faithfulness_std": _json_floats(b.grid_faithfulness_std),
    }


def _json_floats(xs: Sequence[float]) -> list[JsonValue]:
    """NaN (an undefined faithfulness) as JSON ``null``."""
    return [None if math.isnan(x) else x for x in xs]


def _point_json(point: CircuitPoint, threshold: float | None) -> EvalJson:
    f, c = _json_floats([point.faithfulness, point.completeness])
    return {
        "threshold": threshold,
        "n_nodes": point.n_nodes,
        "faithfulness": f,
        "completeness": c,
        "m_circuit": point.m_circuit,
        "m_complement": point.m_complement,
    }


def _curve_json(curve: VariantCurve) -> EvalJson:
    stored: EvalJson = {} if curve.stored is None else {"stored": _point_json(curve.stored, None)}
    if curve.grid_faithfulness:
        stored["grid_faithfulness"] = _json_floats(curve.grid_faithfulness)
    if curve.scores is not None:
        stored["scores"] = _scores_json(curve.scores)
    if curve.intervals is not None:
        stored["intervals"] = _intervals_json(curve.intervals)
    return {
        "n_nodes": list(curve.n_nodes),
        "faithfulness": _json_floats(curve.faithfulness),
        "completeness": _json_floats(curve.completeness),
        "m_circuit": list(curve.m_circuit),
        "m_complement": list(curve.m_complement),
        "m_full": curve.m_full,
        "m_empty": curve.m_empty,
        **stored,
    }


def _note(result: EvalResult) -> str:
    if result.all_nodes:
        sweep = (
            "thresholds apply to the aggregated effects of every node (the circuit's effects file), "
            "so thresholds below discovery_node_threshold give larger circuits. "
        )
    else:
        sweep = (
            "thresholds apply to the node effects stored in the circuit, which holds only nodes with "
            "|effect| > discovery_node_threshold: every threshold at or below it gives the same node set "
            "(flagged in below_discovery_threshold). "
        )
    return (
        sweep + f"Node counts exclude the embedding and the first {result.free_layers} layer(s), which are "
        "always kept, and the error nodes a variant keeps by force."
    )


def eval_json(result: EvalResult) -> EvalJson:
    """The ``eval.json`` document of ``result`` (keys: see the module docstring)."""
    std = _curve_json(result.standard)
    first: EvalJson = {}
    if result.standard.stored is not None:
        first["circuit"] = _point_json(result.standard.stored, result.discovery_node_threshold)
    if result.warnings:
        first["warnings"] = list(result.warnings)
    out: EvalJson = {
        "version": EVAL_JSON_VERSION,
        **first,
        "thresholds": list(result.thresholds),
        "n_nodes": std["n_nodes"],
        "faithfulness": std["faithfulness"],
        "completeness": std["completeness"],
        "standard_variant": result.standard_variant.value,
        "variants": {v.value: _curve_json(c) for v, c in result.variants.items()},
        "below_discovery_threshold": list(result.below_discovery_threshold),
        "discovery_node_threshold": result.discovery_node_threshold,
        "sweep_nodes": "all" if result.all_nodes else "stored",
        "note": _note(result),
        "aggregation": result.aggregation.value,
        "free_layers": result.free_layers,
        "n_nodes_total": result.n_nodes_total,
        "num_examples": result.num_examples,
        "metric": result.metric.value,
        "ablation": result.ablation.value,
        "means": "per position"
        if result.means_per_position
        else "over all tokens (examples of different lengths)",
        "seed": result.seed,
    }
    std_curve = result.standard
    if std_curve.scores is not None:
        out["scores"] = _scores_json(std_curve.scores)
    if result.grid is not None and std_curve.grid_faithfulness:
        out["grid"] = _grid_json(result.grid, std_curve)
    if std_curve.intervals is not None:
        out["intervals"] = _intervals_json(std_curve.intervals)
    if result.baseline is not None:
        out["baseline"] = _baseline_json(result.baseline)
    out.update({k: v for k, v in result.meta.items() if k not in out})
    return out


# --------------------------------------------------------------------------------------------------
# Summary table and plot

#: Short column names of the variants in the summary table, and their line styles in the plot.
_SHORT = {
    Variant.ALL_ERRORS_ABLATED: "std",
    Variant.RESID_ERRORS_KEPT: "resid-err",
    Variant.NO_ERRORS_ABLATED: "no-err",
}
_DASH = {
    Variant.ALL_ERRORS_ABLATED: "solid",
    Variant.RESID_ERRORS_KEPT: "dash",
    Variant.NO_ERRORS_ABLATED: "dot",
}


def _fmt(x: float | None) -> str:
    return "   nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def summary_table(label: str, result: EvalResult) -> str:
    """Per threshold: node count and faithfulness / completeness for every variant."""
    names = list(result.variants)
    head = f"{'threshold':>10} {'nodes':>7} " + " ".join(
        f"{_SHORT[v][:9] + ' F':>11} {_SHORT[v][:9] + ' C':>11}" for v in names
    )
    title = (
        f"== {label}: {result.num_examples} examples, {result.ablation.value} ablation, "
        f"aggregation {result.aggregation.value}, "
        f"free layers embed + <{result.free_layers}, {result.n_nodes_total} ablatable nodes, thresholds over "
        + ("every node's effect (effects file)" if result.all_nodes else "the circuit's stored nodes only")
    )
    lines = [title, *(f"warning: {w}" for w in result.warnings)]
    if result.standard.stored is not None:
        stored = " ".join(
            f"{_fmt(p.faithfulness):>11} {_fmt(p.completeness):>11}"
            for p in (result.variants[v].stored for v in names)
            if p is not None
        )
        lines += [
            f"the circuit as stored (threshold {result.discovery_node_threshold:g}):",
            head,
            f"{'stored':>10} {result.standard.stored.n_nodes:>7} {stored}",
            "the sweep:",
        ]
    lines.append(head)
    for i, t in enumerate(result.thresholds):
        mark = "*" if result.below_discovery_threshold[i] else " "
        cells = " ".join(
            f"{_fmt(result.variants[v].faithfulness[i]):>11} {_fmt(result.variants[v].completeness[i]):>11}"
            for v in names
        )
        lines.append(f"{t:>9.3g}{mark} {result.n_nodes[i]:>7} {cells}")
    std = result.standard
    lines.append(f"m(M) = {std.m_full:+.4f}, m(empty) = {std.m_empty:+.4f} (standard variant)")
    if any(result.below_discovery_threshold):
        lines.append(
            f"* at or below the discovery node threshold {result.discovery_node_threshold:g}: the circuit "
            "file holds only nodes above it, so these rows are all the same (the whole stored circuit)"
        )
    lines += _scores_lines(result)
    return "\n".join(lines)


def _iv(iv: Intervals | None, key: str) -> str:
    if iv is None:
        return ""
    lo, hi = iv.scores[key]
    return f" [{_fmt(lo).strip()}, {_fmt(hi).strip()}]"


def _scores_lines(result: EvalResult) -> list[str]:
    """The integrated scores of every variant (with intervals), the random baseline, the grid."""
    grid = result.grid
    if grid is None or all(c.scores is None for c in result.variants.values()):
        return []
    std_iv = result.standard.intervals
    how = (
        f"95% bootstrap intervals over the {result.num_examples} examples, {std_iv.draws} resamples"
        if std_iv is not None
        else "no bootstrap"
    )
    lines = [
        f"integrated scores of the top-k circuits on the fixed grid ({how}; seed {result.seed}); "
        "auc: normalised area under F vs log10(nodes) over nodes "
        f"{'/'.join(str(s) for s in grid.auc_sizes)}; cpr / cmd: MIB's areas of F and |1 - F| over "
        f"node fractions {'/'.join(f'{p:g}' for p in grid.fractions)} of {grid.n_total}:"
    ]
    for v, c in result.variants.items():
        if c.scores is None:
            continue
        cells = "   ".join(
            f"{k} {_fmt(getattr(c.scores, k))}{_iv(c.intervals, k)}" for k in ("auc", "cpr", "cmd")
        )
        lines.append(f"  {_SHORT[v]:>9}: {cells}")
    b = result.baseline
    if b is not None:
        mean, sd = b.scores_mean, b.scores_std
        cells = "   ".join(
            f"{k} {_fmt(getattr(mean, k))} ± {getattr(sd, k):.3f}" for k in ("auc", "cpr", "cmd")
        )
        lines.append(f"  {'random':>9}: {cells}  ({b.draws} draws, same node count per site, {b.variant})")
    f = result.standard.grid_faithfulness
    lines.append(f"  {'grid nodes':>10} " + " ".join(f"{n:>6}" for n in grid.sizes))
    lines.append(f"  {'F':>10} " + " ".join(f"{_fmt(x):>6}" for x in f))
    if b is not None:
        lines.append(f"  {'random F':>10} " + " ".join(f"{_fmt(x):>6}" for x in b.grid_faithfulness_mean))
    if any(grid.capped):
        lines.append(
            f"  (only the {grid.n_ranked} stored nodes are ranked, no effects file: larger grid sizes keep "
            "the whole stored circuit)"
        )
    return lines


def _errors(
    ys: Sequence[float | None], ivs: Sequence[tuple[float, float]] | None
) -> dict[str, object] | None:
    """plotly ``error_y`` from intervals (None when there are none)."""
    if ivs is None:
        return None
    plus, minus = [], []
    for y, (lo, hi) in zip(ys, ivs, strict=True):
        ok = y is not None and not (math.isnan(lo) or math.isnan(hi))
        plus.append(max(hi - y, 0.0) if ok and y is not None else 0.0)
        minus.append(max(y - lo, 0.0) if ok and y is not None else 0.0)
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "thickness": 1}


def plot_html(results: Sequence[tuple[str, EvalResult]], path: Path) -> Path:
    """A self-contained HTML page (plotly.js inlined): faithfulness and completeness vs node count;
    the grid's faithfulness with the random baseline; the integrated scores with their intervals."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "Faithfulness",
            "Completeness",
            "Top-k circuits on the grid (dotted: random)",
            "Integrated scores (hollow: random; cmd: lower is better)",
        ),
        vertical_spacing=0.14,
    )
    palette = qualitative.Plotly
    ablations = sorted({res.ablation.value for _, res in results})
    for ci, (label, res) in enumerate(results):
        color = palette[ci % len(palette)]
        for variant, curve in res.variants.items():
            iv = curve.intervals if variant is res.standard_variant else None
            pts = [
                (n, f, c, t, i)
                for i, (n, f, c, t) in enumerate(
                    zip(curve.n_nodes, curve.faithfulness, curve.completeness, res.thresholds, strict=True)
                )
                if n > 0
            ]
            pts.sort(key=lambda p: p[0])
            name = f"{label} ({variant.value})"
            for col, idx in ((1, 1), (2, 2)):
                ys = [None if math.isnan(p[idx]) else p[idx] for p in pts]
                ivs = None
                if iv is not None:
                    per = iv.faithfulness if col == 1 else iv.completeness
                    ivs = [per[p[4]] for p in pts]
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] for p in pts],
                        y=ys,
                        text=[f"threshold {p[3]:.3g}" for p in pts],
                        mode="lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=col == 1,
                        line={"color": color, "dash": _DASH[variant]},
                        error_y=_errors(ys, ivs),
                        hovertemplate="%{text}<br>nodes %{x}<br>%{y:.3f}<extra>" + name + "</extra>",
                    ),
                    row=1,
                    col=col,
                )
            point = curve.stored
            if point is None or point.n_nodes <= 0:
                continue
            for col, value in ((1, point.faithfulness), (2, point.completeness)):
                fig.add_trace(
                    go.Scatter(
                        x=[point.n_nodes],
                        y=[None if math.isnan(value) else value],
                        mode="markers",
                        name=f"{name}: the circuit as stored",
                        legendgroup=name,
                        showlegend=False,
                        marker={"color": color, "symbol": "star", "size": 14, "line": {"width": 1}},
                        hovertemplate=f"the circuit as stored (threshold {res.discovery_node_threshold:g})"
                        "<br>nodes %{x}<br>%{y:.3f}<extra>" + name + "</extra>",
                    ),
                    row=1,
                    col=col,
                )
        _grid_traces(fig, go, label, res, color)
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="number of nodes (excluding free layers)", row=1, col=col)
    fig.update_xaxes(type="log", title_text="number of nodes (top-k by |effect|)", row=2, col=1)
    fig.update_yaxes(title_text="faithfulness", row=1, col=1)
    fig.update_yaxes(title_text="completeness", row=1, col=2)
    fig.update_yaxes(title_text="faithfulness", row=2, col=1)
    fig.update_yaxes(title_text="score", row=2, col=2)
    fig.update_layout(
        title=f"{'/'.join(ablations)}-ablation faithfulness and completeness (ideal: faithfulness 1, "
        "completeness 0); error bars: 95% bootstrap intervals over examples",
        hovermode="closest",
        height=1000,
        barmode="group",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def _grid_traces(fig: Any, go: Any, label: str, res: EvalResult, color: str) -> None:
    """Row 2: the standard variant's grid faithfulness (with intervals) and the random baseline;
    the scores as grouped bars (with intervals), the baseline's as hollow bars (± std)."""
    grid, curve = res.grid, res.standard
    if grid is None or not curve.grid_faithfulness or curve.scores is None:
        return
    name = f"{label} ({res.standard_variant.value})"
    pts = [
        (n, f, i) for i, (n, f) in enumerate(zip(grid.sizes, curve.grid_faithfulness, strict=True)) if n > 0
    ]
    ys = [None if math.isnan(p[1]) else p[1] for p in pts]
    iv = curve.intervals
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in pts],
            y=ys,
            mode="lines+markers",
            name=f"{name}: grid",
            legendgroup=name,
            showlegend=False,
            line={"color": color},
            error_y=_errors(ys, None if iv is None else [iv.grid_faithfulness[p[2]] for p in pts]),
            hovertemplate="top-%{x} circuit<br>%{y:.3f}<extra>" + name + "</extra>",
        ),
        row=2,
        col=1,
    )
    b = res.baseline
    if b is not None:
        bys = [b.grid_faithfulness_mean[p[2]] for p in pts]
        sds = [b.grid_faithfulness_std[p[2]] for p in pts]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[None if math.isnan(y) else y for y in bys],
                mode="lines+markers",
                name=f"{label}: random baseline",
                legendgroup=name,
                showlegend=False,
                line={"color": color, "dash": "dot"},
                error_y={"type": "data", "array": [0.0 if math.isnan(x) else x for x in sds], "thickness": 1},
                hovertemplate="random, %{x} nodes<br>%{y:.3f} (mean of "
                + str(b.draws)
                + " draws)<extra>"
                + name
                + "</extra>",
            ),
            row=2,
            col=1,
        )
    keys = ("auc", "cpr", "cmd")
    vals = [getattr(curve.scores, k) for k in keys]
    err = None
    if iv is not None:
        err = _errors([None if math.isnan(v) else v for v in vals], [iv.scores[k] for k in keys])
    fig.add_trace(
        go.Bar(
            x=list(keys),
            y=[None if math.isnan(v) else v for v in vals],
            name=f"{name}: scores",
            legendgroup=name,
            showlegend=False,
            marker={"color": color},
            error_y=err,
            hovertemplate="%{x} %{y:.3f}<extra>" + name + "</extra>",
        ),
        row=2,
        col=2,
    )
    if b is not None:
        mean, sd = b.scores_mean, b.scores_std
        fig.add_trace(
            go.Bar(
                x=list(keys),
                y=[_num(getattr(mean, k)) for k in keys],
                name=f"{label}: random",
                legendgroup=name,
                showlegend=False,
                marker={"color": "rgba(0,0,0,0)", "line": {"color": color, "width": 2}},
                error_y={"type": "data", "array": [getattr(sd, k) for k in keys], "thickness": 1},
                hovertemplate="random %{x} %{y:.3f}<extra>" + name + "</extra>",
            ),
            row=2,
            col=2,
        )
