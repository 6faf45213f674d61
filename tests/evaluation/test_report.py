"""What an evaluation reports: eval.json, the summary table, the plot; the held-out checks."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from feature_circuits.data import Pair
from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation import (
    EvalResult,
    Variant,
    VariantCurve,
    check_disjoint,
    check_held_out,
    default_dataset,
    eval_json,
    plot_html,
    summary_table,
)
from feature_circuits.metrics import MetricName
from feature_circuits.types import Aggregation


def _result(all_nodes=False):
    curve = VariantCurve(
        n_nodes=(5, 2, 0),
        faithfulness=(1.0, float("nan"), 0.0),
        completeness=(0.0, 0.5, 1.0),
        m_circuit=(-2.0, -1.0, 0.5),
        m_complement=(0.5, -1.0, -2.0),
        m_full=-2.0,
        m_empty=0.5,
    )
    return EvalResult(
        thresholds=(0.01, 0.1, 1.0),
        variants={Variant.ALL_ERRORS_ABLATED: curve, Variant.NO_ERRORS_ABLATED: curve},
        below_discovery_threshold=(not all_nodes, False, False),
        discovery_node_threshold=0.05,
        all_nodes=all_nodes,
        aggregation=Aggregation.SUM,
        metric=MetricName.LOGIT_DIFF,
        free_layers=1,
        n_nodes_total=99,
        num_examples=7,
        means_per_position=True,
        meta={"model": "m", "method": "relp"},
    ).with_meta(eval_dataset="x_test.jsonl")


def test_eval_json_keys_and_values():
    d = eval_json(_result())
    keys = {"thresholds", "n_nodes", "faithfulness", "completeness", "standard_variant", "variants"}
    keys |= {"below_discovery_threshold", "discovery_node_threshold", "sweep_nodes", "note", "aggregation"}
    keys |= {"free_layers", "n_nodes_total", "num_examples", "metric", "ablation", "means", "version", "seed"}
    assert set(d) == keys | {"model", "method", "eval_dataset"}  # no grid: no scores, intervals, baseline
    assert d["version"] == 2 and d["ablation"] == "mean" and d["seed"] == 0
    assert d["faithfulness"] == [1.0, None, 0.0]  # NaN (undefined) as null
    assert d["metric"] == "logit_diff" and d["standard_variant"] == "all_errors_ablated"
    assert d["sweep_nodes"] == "stored" and d["means"] == "per position" and d["aggregation"] == "sum"
    variants = d["variants"]
    assert isinstance(variants, dict) and set(variants) == {"all_errors_ablated", "no_errors_ablated"}
    assert variants["all_errors_ablated"] == {
        "n_nodes": [5, 2, 0],
        "faithfulness": [1.0, None, 0.0],
        "completeness": [0.0, 0.5, 1.0],
        "m_circuit": [-2.0, -1.0, 0.5],
        "m_complement": [0.5, -1.0, -2.0],
        "m_full": -2.0,
        "m_empty": 0.5,
    }
    assert d["eval_dataset"] == "x_test.jsonl" and "first 1 layer(s)" in str(d["note"])
    json.dumps(d, allow_nan=False)
    assert eval_json(_result(all_nodes=True))["sweep_nodes"] == "all"


def test_summary_table_and_plot(tmp_path):
    table = summary_table("circ", _result())
    assert "7 examples" in table and "the circuit's stored nodes only" in table
    assert "std F" in table and "no-err C" in table and "   nan" in table
    assert "m(M) = -2.0000, m(empty) = +0.5000" in table and "* at or below" in table
    assert "every node's effect" in summary_table("circ", _result(all_nodes=True))
    html = plot_html([("a", _result()), ("b", _result(all_nodes=True))], tmp_path / "p" / "eval.html")
    text = html.read_text()
    assert "<script src=" not in text and "Faithfulness" in text and len(text) > 1_000_000
    assert "a (all_errors_ablated)" in text and "b (no_errors_ablated)" in text


def test_result_checks_lengths():
    with pytest.raises(ValueError, match="one entry per threshold"):
        replace(_result(), thresholds=(0.1,))
    assert math.isnan(_result().faithfulness[1])


def test_held_out_refusal():
    with pytest.raises(EvaluationError, match="allow-discovery-split"):
        check_held_out("sva_rc", "train", "sva_rc", "train", allow=False)
    check_held_out("sva_rc", "train", "sva_rc", "train", allow=True)
    check_held_out("sva_rc", "train", "sva_rc", "test", allow=False)
    check_held_out("sva_rc", "train", "sva_nounpp", "train", allow=False)


def _pair(i, line=0):
    return Pair(
        clean_prefix=f"the w{i}", patch_prefix=f"a w{i}", clean_answer=" is", patch_answer=" are", line=line
    )


def test_disjoint_and_default_dataset(tmp_path):
    discovery = [_pair(i) for i in range(6)]
    check_disjoint([_pair(i) for i in range(6, 9)], discovery, "test.jsonl", "train.jsonl")
    with pytest.raises(EvaluationError, match=r"2 of 4 evaluation examples of e.jsonl .* line 5"):
        check_disjoint([_pair(4, line=5), _pair(5), _pair(7), _pair(8)], discovery, "e.jsonl", "train.jsonl")
    (tmp_path / "x_train.jsonl").write_text("")
    assert default_dataset(str(tmp_path / "x_train.jsonl"), "test") == str(tmp_path / "x_train.jsonl")
    (tmp_path / "x_test.jsonl").write_text("")
    assert default_dataset(str(tmp_path / "x_train.jsonl"), "test") == str(tmp_path / "x_test.jsonl")
    assert default_dataset("sva_rc", "test") == "sva_rc"
