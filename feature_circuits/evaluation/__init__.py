"""Faithfulness and completeness of a circuit by mean ablation (docs/algorithms.md, "Evaluation").

* :mod:`.masks`: free layers, error-node variants, keep masks built from tensors, node counts;
* :mod:`.ablation`: node means over the patch inputs, ablated forwards and their metric;
* :mod:`.sweep`: the threshold sweep (plan -> run -> score): :func:`evaluate_circuit` ->
  :class:`EvalResult`;
* :mod:`.report`: ``eval.json``, the ``eval.html`` plot, the summary table, the held-out checks.
"""

from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.ablation import (
    SiteMean,
    ablated_metric,
    ablated_metrics,
    compute_means,
    positions_aligned,
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
    check_disjoint,
    check_held_out,
    default_dataset,
    eval_json,
    plot_html,
    resolved_dataset,
    summary_table,
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
    "STANDARD_VARIANT",
    "VARIANTS",
    "EvalResult",
    "EvaluationError",
    "SiteMask",
    "SiteMean",
    "SweepSource",
    "Variant",
    "VariantCurve",
    "ablated_metric",
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
    "parse_variant",
    "plot_html",
    "positions_aligned",
    "resolved_dataset",
    "select",
    "summary_table",
    "sweep_source",
]
