"""Relevance patching, relp (docs/algorithms.md, "Methods" and "LRP rules").

atp whose clean forward runs with the LRP rules in force (LN-rule, Identity-rule, Half-rule by
default; AH-rule and epsilon-rule optional), so that the backward returns LRP propagation
coefficients instead of plain gradients: IE(node) ~= (node(patch) - node(clean)) . c(node). Same
cost as atp: two forwards and one backward. Its edges run their backward with the same rules.
"""

from __future__ import annotations

from feature_circuits.attribution.atp import gradient_node_effects
from feature_circuits.attribution.registry import (
    MethodOptions,
    MethodSpec,
    NodeRequest,
    RelPOptions,
    options_as,
    register,
)
from feature_circuits.attribution.results import NodeEffects
from feature_circuits.types import Method

__all__ = ["relp_node_effects"]


def relp_node_effects(req: NodeRequest, options: MethodOptions) -> NodeEffects:
    """relp node effects of one batch with the rules of ``options.lrp`` (default ``LRPConfig()``)."""
    opts = options_as(RelPOptions, options, Method.RELP)
    return gradient_node_effects(req, lrp=opts.lrp, method=Method.RELP)


SPEC = register(MethodSpec(method=Method.RELP, options=RelPOptions, node_effects=relp_node_effects))
