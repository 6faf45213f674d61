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
:mod:`feature_circuits.metrics`), ``ablation``, ``means``, a human-readable ``note``, and the
circuit's provenance (model, saes, method, dataset, split, plus what the caller adds, e.g. the
evaluation dataset).

Sign of the raw metric values: they are the metric the circuit was discovered with, as
:mod:`feature_circuits.metrics` defines it; for ``logit_diff`` that is logit(patch answer) -
logit(clean answer). Files written before the metric had one owner stored logit(clean answer) -
logit(patch answer) under ``m_*`` (the opposite sign) and the prose definition under ``metric``.
Faithfulness and completeness are ratios of metric differences and are unchanged.

``eval.html`` (:func:`plot_html`) is one self-contained plotly page (plotly.js inlined):
faithfulness and completeness against the number of nodes (log x axis; points with 0 nodes are not
drawn), one line per circuit and variant, the circuit as stored marked on each (a star).

Held-out protocol (docs/algorithms.md, "Evaluation"): :func:`check_held_out` refuses the circuit's
own dataset and split by name or file, :func:`check_disjoint` refuses evaluation examples that are
among the discovery examples whatever the files are called; both unless explicitly allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from feature_circuits.errors import EvaluationError, FeatureCircuitsError
from feature_circuits.evaluation.masks import Variant
from feature_circuits.evaluation.sweep import CircuitPoint, EvalResult, VariantCurve
from feature_circuits.types import Aggregation

if TYPE_CHECKING:
    from feature_circuits.data import Pair

__all__ = [
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
    per_position = result.aggregation is Aggregation.NONE
    first: EvalJson = {}
    if result.standard.stored is not None:
        first["circuit"] = _point_json(result.standard.stored, result.discovery_node_threshold)
    if result.warnings:
        first["warnings"] = list(result.warnings)
    out: EvalJson = {
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
        "ablation": "mean over patch inputs" + (" per position" if per_position else ""),
        "means": "per position"
        if result.means_per_position
        else "over all tokens (examples of different lengths)",
    }
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
        f"== {label}: {result.num_examples} examples, aggregation {result.aggregation.value}, "
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
    return "\n".join(lines)


def plot_html(results: Sequence[tuple[str, EvalResult]], path: Path) -> Path:
    """A self-contained HTML page (plotly.js inlined): faithfulness and completeness vs node count."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Faithfulness", "Completeness"))
    palette = qualitative.Plotly
    for ci, (label, res) in enumerate(results):
        color = palette[ci % len(palette)]
        for variant, curve in res.variants.items():
            pts = [
                (n, f, c, t)
                for n, f, c, t in zip(
                    curve.n_nodes, curve.faithfulness, curve.completeness, res.thresholds, strict=True
                )
                if n > 0
            ]
            pts.sort(key=lambda p: p[0])
            name = f"{label} ({variant.value})"
            for col, idx in ((1, 1), (2, 2)):
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] for p in pts],
                        y=[None if math.isnan(p[idx]) else p[idx] for p in pts],
                        text=[f"threshold {p[3]:.3g}" for p in pts],
                        mode="lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=col == 1,
                        line={"color": color, "dash": _DASH[variant]},
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
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="number of nodes (excluding free layers)", row=1, col=col)
    fig.update_yaxes(title_text="faithfulness", row=1, col=1)
    fig.update_yaxes(title_text="completeness", row=1, col=2)
    fig.update_layout(
        title="Mean-ablation faithfulness and completeness (ideal: faithfulness 1, completeness 0)",
        hovermode="closest",
        height=520,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
