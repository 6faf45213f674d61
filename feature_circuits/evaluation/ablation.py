"""Ablation: the node means, and clean forwards with every node outside a keep mask ablated.

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
  default ``logit_diff``) averaged over the examples; :func:`ablated_metric_values` keeps the
  value of every example as well (for bootstrap intervals).
* **Ablation kinds** (:class:`AblationKind`, docs/algorithms.md, "Integrated scores"): what an
  ablated node takes instead of its value. ``mean``: its mean (above; the standard). ``zero``: 0
  (a feature set to 0; an error node's whole vector set to 0). ``patch``: its value in the plain
  forward on the example's own patch input (the counterfactual). ``resample``: its value in the
  plain forward on the clean input of another example of the same token length (a seeded random
  cyclic permutation: no example is its own source when its length has two or more examples;
  :func:`resample_inputs`). ``patch`` and ``resample`` are :class:`FromInputs` values: one plain
  forward per batch on the source tokens, encoded at every site, replaces the means.

Several mask configurations can share one forward (``stack``): the batch is repeated along the
batch axis, configuration-major.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
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
    "ABLATIONS",
    "AblatedValues",
    "AblationKind",
    "FromInputs",
    "MaskConfig",
    "Progress",
    "SiteMean",
    "ablated_metric",
    "ablated_metric_values",
    "ablated_metrics",
    "compute_means",
    "parse_ablation",
    "positions_aligned",
    "resample_inputs",
    "zero_values",
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


class AblationKind(str, enum.Enum):
    """What an ablated node takes instead of its value (docs/algorithms.md, "Integrated scores")."""

    MEAN = "mean"
    ZERO = "zero"
    PATCH = "patch"
    RESAMPLE = "resample"


#: Every ablation kind with what an ablated node takes.
ABLATIONS: dict[AblationKind, str] = {
    AblationKind.MEAN: "its mean over the patch inputs (per position when aligned; the standard)",
    AblationKind.ZERO: "zero",
    AblationKind.PATCH: "its value on the example's own patch input (counterfactual)",
    AblationKind.RESAMPLE: "its value on another example's clean input (seeded)",
}


def parse_ablation(name: AblationKind | str) -> AblationKind:
    """The ablation kind called ``name``; :class:`EvaluationError` naming the choices otherwise."""
    try:
        return AblationKind(name)
    except ValueError:
        choices = ", ".join(k.value for k in AblationKind)
        raise EvaluationError(f"unknown ablation {name!r}; choose from {choices}") from None


@dataclass(frozen=True)
class FromInputs:
    """Ablated nodes take their value in the plain forward on other tokens: per batch (in order) the
    ``(b, s)`` token ids of the same shape as the batch (``patch``: its patch input; ``resample``:
    :func:`resample_inputs`)."""

    inputs: tuple[Tensor, ...]
    kind: AblationKind = AblationKind.PATCH


#: Per site what ablated nodes take: ``(f, err)`` broadcastable against ``(k, b, s, ·)`` (means
#: ``(P, ·)``, zeros ``()``), or per-batch source tokens.
Values = Mapping[str, tuple[Tensor, Tensor]] | FromInputs


def zero_values(sites: Sequence[Site], device: torch.device | str, dtype: torch.dtype) -> dict[str, SiteMean]:
    """Zero ablation: every ablated feature and error vector becomes 0 (scalars broadcast)."""
    z = torch.zeros((), device=device, dtype=dtype)
    return {s.name: SiteMean(z, z) for s in sites}


def resample_inputs(batches: Sequence[Batch], seed: int) -> FromInputs:
    """Resample ablation sources: the examples of each token length are put in a random order (a
    ``numpy`` generator seeded with ``seed``) and each takes the clean input of the next one in that
    order (cyclically), so no example is its own source unless it is alone at its length."""
    rng = np.random.default_rng(seed)
    rows: dict[int, list[tuple[int, int]]] = {}
    for bi, b in enumerate(batches):
        rows.setdefault(b.seq_len, []).extend((bi, r) for r in range(len(b)))
    source: dict[tuple[int, int], tuple[int, int]] = {}
    for length in sorted(rows):
        members = rows[length]
        order = rng.permutation(len(members))
        for i, j in enumerate(order):
            source[members[int(j)]] = members[int(order[(i + 1) % len(order)])]
    inputs = []
    for bi, b in enumerate(batches):
        picks = [source[(bi, r)] for r in range(len(b))]
        inputs.append(torch.stack([batches[sb].clean[sr] for sb, sr in picks]))
    return FromInputs(tuple(inputs), AblationKind.RESAMPLE)


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
    sites = list(loaded.spliced_sites(dictionaries) if sites is None else sites)
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
    means: Values,
    masks: MaskConfig,
    *,
    metric: Metric = logit_diff,
    progress: Progress | None = None,
) -> float:
    """The metric averaged over examples, in clean forwards where every node outside ``masks`` is
    replaced by its mean (or what ``means`` gives: zeros, :class:`FromInputs`); ablations compose
    in forward order."""
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


class AblatedValues(NamedTuple):
    """The metric of each mask configuration averaged over the examples (``mean``) and per example
    (``per_example``, ``(configs, examples)`` float64, examples in batch order)."""

    mean: list[float]
    per_example: np.ndarray


@torch.no_grad()
def ablated_metrics(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    means: Values,
    configs: Sequence[MaskConfig],
    *,
    metric: Metric = logit_diff,
    stack: int = 1,
    progress: Progress | None = None,
) -> list[float]:
    """:func:`ablated_metric` for several mask configurations; ``stack`` configurations share one
    forward (the batch is repeated along the batch axis, configuration-major)."""
    return ablated_metric_values(
        loaded, dictionaries, batches, means, configs, metric=metric, stack=stack, progress=progress
    ).mean


def _source_values(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    tokens: Tensor,
    sites: Sequence[Site],
) -> dict[str, tuple[Tensor, Tensor]]:
    """Features ``(b, s, F)`` and error ``(b, s, d)`` of every site in the plain forward on ``tokens``."""
    acts: dict[str, Tensor] = {}
    with loaded.lm.trace(tokens.to(loaded.device)):
        for site in sites:
            acts[site.name] = save(get_activation(loaded.lm, site))
    return {name: encode_with_error(dictionaries[name], x) for name, x in acts.items()}


@torch.no_grad()
def ablated_metric_values(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    means: Values,
    configs: Sequence[MaskConfig],
    *,
    metric: Metric = logit_diff,
    stack: int = 1,
    progress: Progress | None = None,
) -> AblatedValues:
    """:func:`ablated_metrics` with every example's value kept. ``means``: per site what an ablated
    node takes (means ``(P, F)`` / ``(P, d)``, zeros, ...), or :class:`FromInputs` (one plain forward
    per batch on its source tokens, whose features and errors replace the ablated nodes)."""
    lm = loaded.lm
    sites = list(loaded.spliced_sites(dictionaries))  # partial coverage: the spliced sites only
    dev = loaded.device
    totals = [0.0] * len(configs)
    n_examples = sum(len(b) for b in batches)
    per_example = np.zeros((len(configs), n_examples), dtype=np.float64)
    stack = max(1, int(stack))
    if isinstance(means, FromInputs) and len(means.inputs) != len(batches):
        raise EvaluationError(f"{len(means.inputs)} source inputs for {len(batches)} batches")
    groups = [(g0, configs[g0 : g0 + stack]) for g0 in range(0, len(configs), stack)]
    stacked_of = [_stack_masks(group, sites, dev) for _, group in groups]
    ablated_sites = [s for s in sites if any(st[s.name] is not None for st in stacked_of)]
    offset = 0
    for bi, batch in enumerate(batches):
        clean = batch.clean.to(dev)
        b = clean.shape[0]
        if isinstance(means, FromInputs):
            src = means.inputs[bi]
            if tuple(src.shape) != tuple(clean.shape):
                raise EvaluationError(
                    f"batch {bi}: source tokens {tuple(src.shape)}, the batch is {tuple(clean.shape)}"
                )
            values: Mapping[str, tuple[Tensor, Tensor]] = _source_values(
                loaded, dictionaries, src, ablated_sites
            )
        else:
            values = means
        for (g0, group), stacked in zip(groups, stacked_of, strict=True):
            k = len(group)
            ids = clean.repeat(k, 1) if k > 1 else clean
            saved: dict[str, Tensor] = {}
            with lm.trace(ids):
                for site in sites:
                    mask = stacked[site.name]
                    if mask is None:
                        continue
                    keep_f, keep_err = mask
                    mean_f, mean_err = values[site.name]
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
            rows = metric(saved["logits"], answers).double().view(k, b)
            m = rows.sum(1)
            per_example[g0 : g0 + k, offset : offset + b] = rows.cpu().numpy()
            for j in range(k):
                totals[g0 + j] += float(m[j])
            if progress is not None:
                progress.update(k)
        offset += b
    return AblatedValues([t / n_examples for t in totals], per_example)
