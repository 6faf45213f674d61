"""Faithfulness and completeness of a circuit by ablation (docs/algorithms.md, "Evaluation").

* :mod:`.masks`: free layers, error-node variants, keep masks built from tensors, node counts;
* :mod:`.ablation`: node means over the patch inputs, ablated forwards and their metric, the
  ablation kinds (mean, zero, patch, resample);
* :mod:`.sweep`: the threshold sweep (plan -> run -> score): :func:`evaluate_circuit` ->
  :class:`EvalResult`;
* :mod:`.scores`: the integrated scores (auc, cpr, cmd) on a fixed grid of sizes, bootstrap
  intervals, the random-circuit baseline (docs/algorithms.md, "Integrated scores");
* :mod:`.report`: ``eval.json``, the ``eval.html`` plot, the summary table, the held-out checks.
"""

from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.ablation import (
    ABLATIONS,
    AblatedValues,
    AblationKind,
    FromInputs,
    SiteMean,
    ablated_metric,
    ablated_metric_values,
    ablated_metrics,
    compute_means,
    parse_ablation,
    positions_aligned,
    resample_inputs,
    zero_values,
)
from feature_circuits.evaluation.masks import (
    STANDARD_VARIANT,
    VARIANTS,
    SiteMask,
    Variant,
    default_free_layers,
    keep_masks,
    node_count,
    parse_variant,
    select,
)
from feature_circuits.evaluation.report import (
    EVAL_JSON_VERSION,
    check_disjoint,
    check_held_out,
    default_dataset,
    eval_json,
    plot_html,
    resolved_dataset,
    summary_table,
)
from feature_circuits.evaluation.scores import (
    AUC_SIZES,
    MIB_FRACTIONS,
    Baseline,
    Grid,
    Intervals,
    Scores,
)
from feature_circuits.evaluation.sweep import (
    EvalResult,
    SweepSource,
    VariantCurve,
    check_effects_agree,
    circuit_effects,
    default_thresholds,
    evaluate_circuit,
    sweep_source,
)

__all__ = [
    "ABLATIONS",
    "AUC_SIZES",
    "EVAL_JSON_VERSION",
    "MIB_FRACTIONS",
    "STANDARD_VARIANT",
    "VARIANTS",
    "AblatedValues",
    "AblationKind",
    "Baseline",
    "EvalResult",
    "EvaluationError",
    "FromInputs",
    "Grid",
    "Intervals",
    "Scores",
    "SiteMask",
    "SiteMean",
    "SweepSource",
    "Variant",
    "VariantCurve",
    "ablated_metric",
    "ablated_metric_values",
    "ablated_metrics",
    "check_disjoint",
    "check_effects_agree",
    "check_held_out",
    "circuit_effects",
    "compute_means",
    "default_dataset",
    "default_free_layers",
    "default_thresholds",
    "eval_json",
    "evaluate_circuit",
    "keep_masks",
    "node_count",
    "parse_ablation",
    "parse_variant",
    "plot_html",
    "positions_aligned",
    "resample_inputs",
    "resolved_dataset",
    "select",
    "summary_table",
    "sweep_source",
    "zero_values",
]
