"""Mean ablation: the node means, and clean forwards with every node outside a keep mask ablated.

Definitions (docs/algorithms.md, "Evaluation"):

* **Means** (:func:`compute_means`). The mean of every node -- each dictionary feature and each
  site's error vector -- over the *patch* inputs of the evaluation data, from the unmodified model.
  Whenever every evaluation example has one token length (:func:`positions_aligned`) the mean is
  kept per position, whatever the circuit's aggregation; otherwise it is pooled over every token.
* **Ablated forward** (:func:`ablated_metrics`). One clean forward with the dictionary spliced at
  every site whose keep mask ablates anything: the site's features and error are computed from its
  *actual* activation (which already carries the ablations at earlier sites, so ablations compose in
  forward order), every node outside the keep mask is replaced by its mean, and the site's output
  becomes ``decode(f) + err``. An ablated error node replaces that position's whole error vector.
  Sites where every node is kept are not touched, so keeping everything is the plain forward.
* **Metric.** The value of an ablated forward is the metric (:mod:`feature_circuits.metrics`,
  default ``logit_diff``) averaged over the examples.

Several mask configurations can share one forward (``stack``): the batch is repeated along the
batch axis, configuration-major.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from feature_circuits.dictionaries.splice import encode_with_error
from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.masks import SiteMask
from feature_circuits.metrics import Metric, logit_diff
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import Site

if TYPE_CHECKING:
    from feature_circuits.data import Batch
    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.model import LoadedModel

__all__ = [
    "MaskConfig",
    "Progress",
    "SiteMean",
    "ablated_metric",
    "ablated_metrics",
    "compute_means",
    "positions_aligned",
]

#: Keep masks of every site (``None``: the site is not touched).
MaskConfig = Mapping[str, "SiteMask | None"]


class Progress(Protocol):
    """A progress bar (``tqdm``): advanced by one per forward."""

    def update(self, n: int = 1) -> object: ...


class SiteMean(NamedTuple):
    """Mean features ``(P, F)`` and mean error ``(P, d)`` of one site; ``P = s`` per position, else 1."""

    f: Tensor
    err: Tensor


@dataclass(frozen=True, kw_only=True)
class _Answers:
    """The answers of ``k`` stacked copies of a batch (what a metric reads)."""

    clean_answer: Tensor
    patch_answer: Tensor


def positions_aligned(batches: Sequence[Batch]) -> bool:
    """Whether every evaluation example has the same token length: then means are taken per
    position, whatever the circuit's aggregation."""
    return len({b.seq_len for b in batches}) == 1


@torch.no_grad()
def compute_means(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    *,
    per_position: bool,
    sites: Sequence[Site] | None = None,
    progress: Progress | None = None,
) -> dict[str, SiteMean]:
    """Mean features and error per site over the PATCH inputs of ``batches`` (plain model forward).

    Returns ``{site: SiteMean(f, err)}`` with shapes ``(P, F)`` and ``(P, d)``: ``P = s`` when
    ``per_position`` (every batch must have the same length; see :func:`positions_aligned`), else
    ``P = 1`` (averaged over every token of every example). Sums are accumulated in float64.
    """
    sites = list(loaded.sites if sites is None else sites)
    if not batches:
        raise EvaluationError("no evaluation examples")
    lengths = {b.seq_len for b in batches}
    if per_position and len(lengths) != 1:
        raise EvaluationError(
            "per-position means need evaluation examples of one token length; "
            f"found lengths {sorted(lengths)}"
        )
    sums: dict[str, tuple[Tensor, Tensor]] = {}
    count = 0
    lm = loaded.lm
    for batch in batches:
        patch = batch.patch.to(loaded.device)
        acts: dict[str, Tensor] = {}
        with lm.trace(patch):
            for site in sites:
                acts[site.name] = save(get_activation(lm, site))
        for site in sites:
            f, err = encode_with_error(dictionaries[site.name], acts[site.name])
            f, err = f.double(), err.double()
            if per_position:
                f, err = f.sum(0), err.sum(0)
            else:
                f, err = f.sum((0, 1))[None], err.sum((0, 1))[None]
            if site.name in sums:
                sums[site.name][0].add_(f)
                sums[site.name][1].add_(err)
            else:
                sums[site.name] = (f, err)
        count += patch.shape[0] if per_position else patch.shape[0] * patch.shape[1]
        if progress is not None:
            progress.update(1)
    return {
        name: SiteMean(f.div(count).to(loaded.dtype), e.div(count).to(loaded.dtype))
        for name, (f, e) in sums.items()
    }


@torch.no_grad()
def ablated_metric(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    means: Mapping[str, tuple[Tensor, Tensor]],
    masks: MaskConfig,
    *,
    metric: Metric = logit_diff,
    progress: Progress | None = None,
) -> float:
    """The metric averaged over examples, in clean forwards where every node outside ``masks`` is
    replaced by its mean (ablations compose in forward order)."""
    return ablated_metrics(
        loaded, dictionaries, batches, means, [masks], metric=metric, stack=1, progress=progress
    )[0]


def _stack_masks(
    group: Sequence[MaskConfig], sites: Sequence[Site], device: torch.device
) -> dict[str, tuple[Tensor, Tensor] | None]:
    """Per site the keep masks of ``group`` stacked to ``(k, 1, P, F)`` and ``(k, 1, P, 1)`` (a
    configuration that keeps the whole site keeps every entry), or None when no configuration
    ablates anything there."""
    stacked: dict[str, tuple[Tensor, Tensor] | None] = {}
    for site in sites:
        ms = [cfg.get(site.name) for cfg in group]
        ref = next((m for m in ms if m is not None), None)
        if ref is None:
            stacked[site.name] = None
            continue
        kf = torch.stack([torch.ones_like(ref.f) if m is None else m.f for m in ms]).to(device)
        ke = torch.stack([torch.ones_like(ref.err) if m is None else m.err for m in ms]).to(device)
        stacked[site.name] = (kf[:, None], ke[:, None])
    return stacked


@torch.no_grad()
def ablated_metrics(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    means: Mapping[str, tuple[Tensor, Tensor]],
    configs: Sequence[MaskConfig],
    *,
    metric: Metric = logit_diff,
    stack: int = 1,
    progress: Progress | None = None,
) -> list[float]:
    """:func:`ablated_metric` for several mask configurations; ``stack`` configurations share one
    forward (the batch is repeated along the batch axis, configuration-major)."""
    lm = loaded.lm
    sites = list(loaded.sites)
    dev = loaded.device
    totals = [0.0] * len(configs)
    n_examples = sum(len(b) for b in batches)
    stack = max(1, int(stack))
    for g0 in range(0, len(configs), stack):
        group = configs[g0 : g0 + stack]
        k = len(group)
        stacked = _stack_masks(group, sites, dev)
        for batch in batches:
            clean = batch.clean.to(dev)
            b = clean.shape[0]
            ids = clean.repeat(k, 1) if k > 1 else clean
            saved: dict[str, Tensor] = {}
            with lm.trace(ids):
                for site in sites:
                    mask = stacked[site.name]
                    if mask is None:
                        continue
                    keep_f, keep_err = mask
                    mean_f, mean_err = means[site.name]
                    ae = dictionaries[site.name]
                    x = get_activation(lm, site)
                    f, err = encode_with_error(ae, x)
                    f = torch.where(keep_f, f.view(k, b, *f.shape[1:]), mean_f).view(f.shape)
                    err = torch.where(keep_err, err.view(k, b, *err.shape[1:]), mean_err).view(err.shape)
                    set_activation(lm, site, ae.decode(f) + err)
                saved["logits"] = save(lm.output.logits)
            answers = _Answers(
                clean_answer=batch.clean_answer.to(dev).repeat(k),
                patch_answer=batch.patch_answer.to(dev).repeat(k),
            )
            m = metric(saved["logits"], answers).double().view(k, b).sum(1)
            for j in range(k):
                totals[g0 + j] += float(m[j])
            if progress is not None:
                progress.update(k)
    return [t / n_examples for t in totals]
