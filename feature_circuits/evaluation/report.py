"""Command line of scripts/evaluate.py: faithfulness / completeness curves of one or more circuits.

    python scripts/evaluate.py --circuit out/relp/circuit.json --circuit out/ig/circuit.json \
        --split test --num-examples 100

For each ``--circuit`` it loads the model and SAEs named in the circuit.json (``model``, ``saes``)
and, when the circuit.json names an ``effects_file`` (discovery writes ``effects.safetensors``), the
effect of every node, so the threshold sweep reaches below the discovery threshold (older circuit
files without it: only the stored nodes are swept),
evaluates on ``--dataset`` (default: the circuit's own dataset) split ``--split`` (default ``test``)
and writes ``eval.json`` (the standard variant at the top level, every variant under ``variants``)
to ``--out`` (default: the circuit's directory; with several circuits and ``--out``,
``eval_<label>.json`` each). One self-contained plotly page ``eval.html`` (plotly.js inlined)
shows faithfulness and completeness against the number of nodes (log x axis; points with 0 nodes
are not drawn), one line per circuit and variant; it goes to ``--out`` or the first circuit's
directory.

Held-out protocol: evaluating on the circuit's own dataset and split is refused unless
``--allow-discovery-split`` is given. Bad inputs exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feature_circuits.evaluation.sweep import (
    STANDARD_VARIANT,
    VARIANTS,
    CircuitNodes,
    EvalResult,
    EvaluationError,
)

__all__ = ["check_disjoint", "check_held_out", "default_dataset", "main", "plot_html", "summary_table"]


class UsageError(ValueError):
    pass


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


def _resolve(name: str, split: str) -> Path | None:
    from feature_circuits.data import resolve_dataset

    try:
        return Path(resolve_dataset(name, split)).resolve()
    except (ValueError, FileNotFoundError, OSError):
        return None


def check_disjoint(
    eval_pairs: list[Any], discovery_pairs: list[Any], eval_name: str, discovery_name: str
) -> None:
    """Refuse (EvaluationError) when evaluation examples are among the examples the circuit was
    discovered on (same prompts and answers), whatever the files are called."""

    def key(p: Any) -> tuple[str, str, str, str]:
        return (p.clean_prefix, p.patch_prefix, p.clean_answer, p.patch_answer)

    seen = {key(p) for p in discovery_pairs}
    shared = [p for p in eval_pairs if key(p) in seen]
    if shared:
        first = shared[0]
        raise EvaluationError(
            f"{len(shared)} of {len(eval_pairs)} evaluation examples of {eval_name} are among the {len(discovery_pairs)} "
            f"examples the circuit was discovered on ({discovery_name}), e.g. line {first.line}: "
            f"{first.clean_prefix!r}; held-out evaluation needs disjoint data; pass --allow-discovery-split to do it "
            "anyway"
        )


def check_held_out(
    circuit_dataset: str, circuit_split: str, dataset: str, split: str, *, allow: bool
) -> None:
    """Refuse (EvaluationError) to evaluate on the data the circuit was discovered on, unless ``allow``."""
    if allow:
        return
    a, b = _resolve(circuit_dataset, circuit_split), _resolve(dataset, split)
    same = (
        (a == b)
        if (a is not None and b is not None)
        else (circuit_dataset == dataset and circuit_split == split)
    )
    if same:
        raise EvaluationError(
            f"refusing to evaluate on the circuit's own discovery data (dataset {circuit_dataset!r}, split "
            f"{circuit_split!r}, file {b or dataset}): held-out evaluation needs disjoint data (--split test, or "
            "--dataset with held-out examples); pass --allow-discovery-split to do it anyway"
        )


# --------------------------------------------------------------------------------------------------
# Output


def _fmt(x: float | None) -> str:
    return "   nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def summary_table(label: str, result: EvalResult) -> str:
    """Per threshold: node count and faithfulness / completeness for every variant."""
    names = list(result.variants)
    short = {"all_errors_ablated": "std", "resid_errors_kept": "resid-err", "no_errors_ablated": "no-err"}
    head = f"{'threshold':>10} {'nodes':>7} " + " ".join(
        f"{short.get(v, v)[:9] + ' F':>11} {short.get(v, v)[:9] + ' C':>11}" for v in names
    )
    title = (
        f"== {label}: {result.num_examples} examples, aggregation {result.aggregation}, "
        f"free layers embed + <{result.free_layers}, {result.n_nodes_total} ablatable nodes, thresholds over "
        + ("every node's effect (effects file)" if result.all_nodes else "the circuit's stored nodes only")
    )
    lines = [title, head]
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
            f"* at or below the discovery node threshold {result.discovery_node_threshold:g}: the circuit file "
            "holds only nodes above it, so these rows are all the same (the whole stored circuit)"
        )
    return "\n".join(lines)


def plot_html(results: Sequence[tuple[str, EvalResult]], path: Path) -> Path:
    """A self-contained HTML page (plotly.js inlined): faithfulness and completeness vs node count."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Faithfulness", "Completeness"))
    dashes = {"all_errors_ablated": "solid", "resid_errors_kept": "dash", "no_errors_ablated": "dot"}
    palette = qualitative.Plotly
    for ci, (label, res) in enumerate(results):
        color = palette[ci % len(palette)]
        for variant, curve in res.variants.items():
            pts = [
                (n, f, c, t)
                for n, f, c, t in zip(curve.n_nodes, curve.faithfulness, curve.completeness, res.thresholds)
                if n > 0
            ]
            pts.sort(key=lambda p: p[0])
            name = f"{label} ({variant})"
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
                        line={"color": color, "dash": dashes.get(variant, "dashdot")},
                        hovertemplate="%{text}<br>nodes %{x}<br>%{y:.3f}<extra>" + name + "</extra>",
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


# --------------------------------------------------------------------------------------------------
# main


def _parse_thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--thresholds must be a comma-separated list of numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise UsageError(f"--thresholds must be finite numbers >= 0, got {text!r}")
    return vals


def _parse_variants(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in VARIANTS]
    if bad or not vals:
        raise UsageError(f"unknown variant(s) {bad or text!r}; choose from {', '.join(VARIANTS)}")
    return vals


@dataclass
class _Job:
    path: Path
    nodes: CircuitNodes
    dataset: str
    label: str


def _label(c: CircuitNodes, path: Path) -> str:
    return f"{path.parent.name or 'circuit'} [{c.meta.get('method', '?')}, saes={c.meta.get('saes', '?')}]"


def _load_jobs(args: argparse.Namespace) -> list[_Job]:
    from feature_circuits.circuit.graph import CircuitError, load_circuit

    jobs = []
    for p in args.circuit:
        path = Path(p)
        if path.is_dir():
            path = path / "circuit.json"
        try:
            circ = load_circuit(path)
        except CircuitError as err:
            raise UsageError(str(err).replace("\n", " ")) from None
        nodes = CircuitNodes.from_circuit(circ)
        if (
            circ.effects_file is not None
        ):  # dense effects of every node: the sweep goes below the discovery threshold
            nodes = nodes.with_effects_file(path.parent / circ.effects_file, source=str(path))
        nodes.meta["path"] = str(path)
        dataset = args.dataset if args.dataset is not None else default_dataset(circ.dataset, args.split)
        check_held_out(circ.dataset, circ.split, dataset, args.split, allow=args.allow_discovery_split)
        jobs.append(_Job(path=path, nodes=nodes, dataset=dataset, label=_label(nodes, path)))
    labels = [j.label for j in jobs]
    for j in jobs:
        if labels.count(j.label) > 1:
            j.label = f"{j.label} {j.path}"
    return jobs


def run(args: argparse.Namespace) -> int:
    import torch

    from feature_circuits.data import DatasetError, load_pairs, resolve_dataset
    from feature_circuits.dictionaries.marks import load_dictionaries
    from feature_circuits.evaluation.sweep import compute_means, evaluate_circuit, positions_aligned
    from feature_circuits.model.loading import load_model

    if args.num_examples is not None and args.num_examples < 1:
        raise UsageError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    thresholds = _parse_thresholds(args.thresholds)
    variants = _parse_variants(args.variants)
    jobs = _load_jobs(args)

    models: dict[str, Any] = {}
    dicts: dict[tuple[str, str], Any] = {}
    means_cache: dict[tuple, Any] = {}
    results: list[tuple[str, EvalResult]] = []
    outs = []
    for job in jobs:
        meta = job.nodes.meta
        model_name, saes = str(meta["model"]), str(meta["saes"])
        if model_name not in models:
            models[model_name] = load_model(model_name, device=args.device, dtype=torch.float32)
        loaded = models[model_name]
        if (model_name, saes) not in dicts:
            dicts[(model_name, saes)] = load_dictionaries(
                loaded.sites, saes, device=loaded.device, dtype=loaded.dtype
            )
        aes = dicts[(model_name, saes)]
        data_path = resolve_dataset(job.dataset, args.split)
        pairs = load_pairs(data_path, loaded.tokenizer, limit=args.num_examples)
        discovery_path = _resolve(str(meta["dataset"]), str(meta["split"]))
        if not args.allow_discovery_split and discovery_path is not None and discovery_path.is_file():
            limit = meta.get("num_examples")
            try:
                discovery = load_pairs(discovery_path, loaded.tokenizer, limit=int(limit) if limit else None)
            except DatasetError as err:
                print(
                    f"warning: cannot read the discovery data to check it is disjoint: {err}", file=sys.stderr
                )
            else:
                check_disjoint(pairs, discovery, str(data_path), str(discovery_path))
        key = (model_name, saes, str(data_path), len(pairs), args.batch_size)
        if key not in means_cache:
            from feature_circuits.data import make_batches

            batches = make_batches(pairs, loaded.tokenizer, args.batch_size)
            means_cache[key] = compute_means(loaded, aes, batches, per_position=positions_aligned(batches))
        print(f"evaluating {job.label} on {data_path} ({len(pairs)} examples)", file=sys.stderr)
        res = evaluate_circuit(
            loaded,
            aes,
            job.nodes,
            pairs,
            thresholds=thresholds,
            variants=variants,
            batch_size=args.batch_size,
            free_layers=args.free_layers,
            means=means_cache[key],
            progress=not args.quiet,
        )
        res.meta.update({"eval_dataset": str(data_path), "eval_split": args.split, "circuit": str(job.path)})
        results.append((job.label, res))
        if args.out is None:
            out_json = job.path.parent / "eval.json"
        elif len(jobs) == 1:
            out_json = Path(args.out) / "eval.json"
        else:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{job.path.parent.name}_{meta.get('method', '')}").strip(
                "_"
            )
            out_json = Path(args.out) / f"eval_{safe}.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(res.to_dict(), indent=1) + "\n")
        outs.append(out_json)
        print(summary_table(job.label, res))
    html = (Path(args.out) if args.out is not None else jobs[0].path.parent) / "eval.html"
    plot_html(results, html)
    for p in outs:
        print(f"wrote {p}")
    print(f"wrote {html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--circuit",
        action="append",
        required=True,
        metavar="PATH",
        help="circuit.json (or its directory); repeat to compare several circuits on one plot",
    )
    ap.add_argument(
        "--dataset", default=None, help="dataset name or .jsonl path (default: the circuit's dataset)"
    )
    ap.add_argument("--split", default="test", help="split of a named dataset (default: test)")
    ap.add_argument("--num-examples", type=int, default=100, help="evaluation examples (default: 100)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--thresholds",
        default=None,
        help="comma-separated node thresholds on |effect| (default: logspace(-4, 0, 15), extended "
        "upwards past the largest effect)",
    )
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} (standard: {STANDARD_VARIANT})",
    )
    ap.add_argument(
        "--free-layers",
        type=int,
        default=None,
        help="layers < this (and embed) are always kept (default: n_layers // 3)",
    )
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument(
        "--allow-discovery-split",
        action="store_true",
        help="allow evaluating on the circuit's own discovery dataset and split",
    )
    ap.add_argument("--out", default=None, help="output directory (default: the circuit's directory)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from feature_circuits.data import DatasetError, UnknownDatasetError
    from feature_circuits.dictionaries.marks import DictionaryError
    from feature_circuits.model.loading import ModelLoadError
    from feature_circuits.model.sites import UnsupportedModelError

    try:
        return run(args)
    except (
        UsageError,
        EvaluationError,
        DatasetError,
        UnknownDatasetError,
        DictionaryError,
        ModelLoadError,
        UnsupportedModelError,
        FileNotFoundError,
    ) as err:
        msg = " ".join(str(err).split())
        print(f"evaluate.py: error: {msg}", file=sys.stderr)
        return 2
