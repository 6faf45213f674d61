"""Which nodes a mean-ablation forward keeps: free layers, error-node variants, keep masks as tensors.

Definitions (docs/algorithms.md, "Evaluation"):

* **Nodes of a site.** A site with ``F`` features has ``F + 1`` nodes per position; index ``F`` (the
  last, :func:`feature_circuits.types.error_index`) is its error node. A *selection* is, per site, a
  boolean tensor ``(P, F + 1)`` over those nodes: ``P = 1`` when the circuit is summed over positions
  (aggregation ``sum``: a selected node is kept at every position) and ``P = s`` when it keeps
  positions (aggregation ``none``).
* **Free layers.** The embedding and the layers ``< n_layers // 3`` (:func:`default_free_layers`)
  are always kept ("given for free": early features are token-specific and do not transfer between
  splits). They are never ablated -- not in the complement of a circuit nor in the empty circuit --
  and their nodes are not counted (:func:`node_count`).
* **Variants** (:class:`Variant`): which error nodes are kept whatever the selection says. A variant's
  forced keeps apply to a circuit, to its complement and to the empty circuit alike.
* **Keep masks** (:func:`keep_masks`): a selection (or its complement) with the variant's forced
  keeps and the free layers applied, as one :class:`SiteMask` per site, or ``None`` where every node
  of the site is kept (the site is then not touched by the ablated forward at all).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from feature_circuits.errors import EvaluationError
from feature_circuits.types import Site, SiteKind

__all__ = [
    "STANDARD_VARIANT",
    "VARIANTS",
    "SiteMask",
    "Variant",
    "default_free_layers",
    "is_free",
    "keep_masks",
    "node_count",
    "parse_variant",
    "select",
]


class Variant(str, enum.Enum):
    """Which error nodes are always kept (docs/algorithms.md, "Evaluation")."""

    #: The standard: an error node is kept only if it is in the circuit.
    ALL_ERRORS_ABLATED = "all_errors_ablated"
    #: Residual-stream error nodes are always kept.
    RESID_ERRORS_KEPT = "resid_errors_kept"
    #: Every error node is always kept.
    NO_ERRORS_ABLATED = "no_errors_ablated"

    def keeps_error(self, site: Site) -> bool:
        """Whether this variant keeps ``site``'s error node whatever the selection."""
        return self is Variant.NO_ERRORS_ABLATED or (
            self is Variant.RESID_ERRORS_KEPT and site.kind is SiteKind.RESID
        )


STANDARD_VARIANT = Variant.ALL_ERRORS_ABLATED
#: Every variant with what it keeps by force.
VARIANTS: dict[Variant, str] = {
    Variant.ALL_ERRORS_ABLATED: "none (an error node is kept only if it is in the circuit; the standard)",
    Variant.RESID_ERRORS_KEPT: "residual-stream error nodes always kept",
    Variant.NO_ERRORS_ABLATED: "every error node always kept",
}


def parse_variant(name: Variant | str) -> Variant:
    """The variant called ``name``; :class:`EvaluationError` naming the choices otherwise."""
    try:
        return Variant(name)
    except ValueError:
        choices = ", ".join(v.value for v in Variant)
        raise EvaluationError(f"unknown variant {name!r}; choose from {choices}") from None


def default_free_layers(n_layers: int) -> int:
    """Layers ``< n_layers // 3`` (and the embedding) are always kept: layers 0-1 of a 6-layer model,
    layer 0 of a 4-layer one, none of a 2-layer one."""
    return n_layers // 3


def is_free(site: Site, free_layers: int) -> bool:
    """Whether ``site`` is always kept: the embedding, or a layer below ``free_layers``."""
    return site.kind is SiteKind.EMBED or site.layer < free_layers


@dataclass(frozen=True, kw_only=True)
class SiteMask:
    """Which nodes of one site are kept: ``f`` ``(P, F)`` and ``err`` ``(P, 1)``, both boolean;
    ``P = 1`` broadcasts over positions."""

    f: Tensor
    err: Tensor

    def __post_init__(self) -> None:
        if self.f.dtype != torch.bool or self.err.dtype != torch.bool:
            raise EvaluationError(f"keep masks must be boolean, got {self.f.dtype} and {self.err.dtype}")
        if self.f.dim() != 2 or tuple(self.err.shape) != (self.f.shape[0], 1):
            raise EvaluationError(
                f"keep masks must be (P, F) and (P, 1), got {tuple(self.f.shape)} and {tuple(self.err.shape)}"
            )

    @classmethod
    def of_nodes(cls, keep: Tensor) -> SiteMask:
        """From a ``(P, F + 1)`` boolean tensor over a site's nodes (error node last)."""
        return cls(f=keep[:, :-1], err=keep[:, -1:])

    @property
    def all_kept(self) -> bool:
        return bool(self.f.all()) and bool(self.err.all())


def select(effects: Mapping[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """The selection ``|effect| > threshold`` of per-site node effects (any shape)."""
    return {name: eff.abs() > threshold for name, eff in effects.items()}


def _selection_of(selected: Mapping[str, Tensor], site: Site) -> Tensor:
    try:
        return selected[site.name]
    except KeyError:
        raise EvaluationError(f"no node selection for site {site.name!r}") from None


def keep_masks(
    selected: Mapping[str, Tensor],
    sites: Sequence[Site],
    *,
    complement: bool = False,
    variant: Variant | str = STANDARD_VARIANT,
    free_layers: int = 0,
) -> dict[str, SiteMask | None]:
    """Keep masks per site from a selection (``{site: (P, F + 1) bool}``, error node last; every site
    outside the free layers must be present).

    ``complement``: keep exactly the nodes NOT selected. Then the variant's forced error keeps and the
    free layers are applied; ``None`` means every node of the site is kept.
    """
    variant = parse_variant(variant)
    out: dict[str, SiteMask | None] = {}
    for site in sites:
        if is_free(site, free_layers):
            out[site.name] = None
            continue
        keep = _selection_of(selected, site)
        if complement:
            keep = ~keep
        if variant.keeps_error(site):
            keep = keep.clone()
            keep[:, -1] = True
        mask = SiteMask.of_nodes(keep)
        out[site.name] = None if mask.all_kept else mask
    return out


def node_count(selected: Mapping[str, Tensor], sites: Sequence[Site], free_layers: int) -> int:
    """Number of selected nodes outside the free layers."""
    return sum(int(_selection_of(selected, s).sum()) for s in sites if not is_free(s, free_layers))
