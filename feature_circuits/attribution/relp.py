"""Relevance patching, relp (docs/algorithms.md, "Node effects" and "LRP rules").

atp whose clean forward runs with the LRP rules in force (LN-rule, Identity-rule, Half-rule by
default; AH-rule and epsilon-rule optional), so that the backward returns LRP propagation
coefficients instead of plain gradients: IE(node) ~= (node(patch) - node(clean)) . c(node). Same
cost as atp: two forwards and one backward. Its edges run their backward with the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from feature_circuits.attribution.atp import gradient_node_effects
from feature_circuits.attribution.registry import MethodOptions, MethodSpec, RelPOptions, register
from feature_circuits.attribution.results import NodeEffects
from feature_circuits.data import Batch
from feature_circuits.dictionaries import Dictionary
from feature_circuits.metrics import Metric
from feature_circuits.model.loading import LoadedModel
from feature_circuits.types import Method

__all__ = ["relp_node_effects"]


def relp_node_effects(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    *,
    metric: Metric,
    options: MethodOptions | None = None,
    counterfactual: bool = True,
    sites: Sequence[str] | None = None,
) -> NodeEffects:
    """relp node effects of one batch with the rules of ``options.lrp`` (default ``LRPConfig()``)."""
    opts = SPEC.check_options(options)
    assert isinstance(opts, RelPOptions)
    return gradient_node_effects(
        loaded,
        dictionaries,
        batch,
        metric=metric,
        lrp=opts.lrp,
        method=Method.RELP,
        counterfactual=counterfactual,
        sites=sites,
    )


SPEC = register(MethodSpec(method=Method.RELP, options=RelPOptions, node_effects=relp_node_effects))
