"""The forwards every attribution method shares (docs/algorithms.md, "Methods"): the sites to
attribute, the clean and patch states of every site, and the clean forward with every dictionary
spliced in as gradient leaves.

A site's *state* is its features ``f`` and error node ``err`` (:class:`SiteState`). The patch state
is the state on the counterfactual input, or -- without a counterfactual -- every node set to zero,
whose model output is the one with the last residual site zeroed (every later quantity is a
function of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from feature_circuits.attribution.results import SiteState
from feature_circuits.data import Batch
from feature_circuits.dictionaries import Dictionary, encode_with_error, splice_with_grad_leaves
from feature_circuits.errors import ConfigError
from feature_circuits.metrics import Metric
from feature_circuits.model.loading import LoadedModel
from feature_circuits.model.lrp import lrp_context
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import LRPConfig, Site

__all__ = [
    "CleanPatch",
    "attribution_sites",
    "clean_and_patch",
    "collect_states",
    "patch_states",
    "spliced_clean_forward",
    "zero_last_resid_logits",
]


def attribution_sites(
    loaded: LoadedModel, dictionaries: Mapping[str, Dictionary], sites: Iterable[str] | None = None
) -> list[Site]:
    """Sites (forward order) that have a dictionary, optionally restricted to ``sites`` names."""
    wanted = None if sites is None else set(sites)
    out = [s for s in loaded.sites if s.name in dictionaries and (wanted is None or s.name in wanted)]
    if wanted is not None and len(out) != len(wanted):
        missing = wanted - {s.name for s in out}
        raise ConfigError(f"sites {sorted(missing)}: no dictionary or unknown site")
    return out


def collect_states(
    loaded: LoadedModel, dictionaries: Mapping[str, Dictionary], ids: Tensor, sites: Sequence[Site]
) -> tuple[dict[str, SiteState], Tensor]:
    """Plain forward on ``ids``: every site's (features, error) and the logits (all detached)."""
    acts: dict[str, Tensor] = {}
    lm = loaded.lm
    with lm.trace(ids.to(loaded.device)):
        for s in sites:
            acts[s.name] = save(get_activation(lm, s))
        logits = save(lm.output.logits)
    with torch.no_grad():
        states = {
            s.name: SiteState(*encode_with_error(dictionaries[s.name], acts[s.name].detach())) for s in sites
        }
    return states, logits.detach()


def zero_last_resid_logits(loaded: LoadedModel, ids: Tensor) -> Tensor:
    """Logits with the last residual site zeroed: the model's output when every node of every site
    is set to zero (no-counterfactual "patch" state)."""
    lm = loaded.lm
    last = loaded.last_resid
    with lm.trace(ids.to(loaded.device)):
        x = get_activation(lm, last)
        set_activation(lm, last, torch.zeros_like(x))
        logits = save(lm.output.logits)
    return logits.detach()


def spliced_clean_forward(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    ids: Tensor,
    sites: Sequence[Site],
    lrp: LRPConfig | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Forward on ``ids`` with every site spliced (features and error as grad leaves, output
    bit-identical to the model's), with the LRP rules of ``lrp`` active. Returns the leaves and
    the logits (with their graph)."""
    lm = loaded.lm
    leaves: dict[str, tuple[Tensor, Tensor]] = {}
    with lrp_context(loaded, lrp), lm.trace(ids.to(loaded.device)):
        for s in sites:
            out, f, err = splice_with_grad_leaves(dictionaries[s.name], get_activation(lm, s))
            set_activation(lm, s, out)
            leaves[s.name] = (save(f), save(err))
        logits = save(lm.output.logits)
    return leaves, logits


def patch_states(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    sites: Sequence[Site],
    clean: Mapping[str, SiteState],
    metric: Metric,
    counterfactual: bool,
) -> tuple[dict[str, SiteState], Tensor]:
    """Patch states of every site and the metric on the patch input (no-counterfactual: zero states
    and the metric with every node zeroed)."""
    if counterfactual:
        states, logits = collect_states(loaded, dictionaries, batch.patch, sites)
    else:
        states = {k: SiteState(torch.zeros_like(v.f), torch.zeros_like(v.err)) for k, v in clean.items()}
        logits = zero_last_resid_logits(loaded, batch.clean)
    with torch.no_grad():
        m = metric(logits, batch).detach()
    return states, m


@dataclass(frozen=True, kw_only=True)
class CleanPatch:
    """Clean and patch states of every site, and the metric on both (``(b,)`` each)."""

    clean: dict[str, SiteState]
    patch: dict[str, SiteState]
    metric_clean: Tensor
    metric_patch: Tensor


def clean_and_patch(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    sites: Sequence[Site],
    metric: Metric,
    counterfactual: bool,
) -> CleanPatch:
    """A plain clean forward (states and metric) and :func:`patch_states`."""
    clean, clean_logits = collect_states(loaded, dictionaries, batch.clean, sites)
    with torch.no_grad():
        metric_clean = metric(clean_logits, batch).detach()
    patch, metric_patch = patch_states(loaded, dictionaries, batch, sites, clean, metric, counterfactual)
    return CleanPatch(clean=clean, patch=patch, metric_clean=metric_clean, metric_patch=metric_patch)
