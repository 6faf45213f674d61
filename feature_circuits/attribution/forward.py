"""Shared machinery of the attribution methods: metrics, sub-batches, the clean/patch forwards."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from feature_circuits.attribution.results import SiteState
from feature_circuits.dictionaries.marks import encode_with_error, splice_with_grad_leaves
from feature_circuits.model.lrp import lrp_context
from feature_circuits.model.sites import get_activation, set_activation
from feature_circuits.types import LRPConfig, Site

#: A metric maps the logits (b, s, V) and the batch to one scalar per example (b,).
Metric = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class SubBatch:
    """Duck-typed stand-in for ``feature_circuits.data.Batch`` (the four tensors a metric needs)."""

    clean: Tensor
    patch: Tensor
    clean_answer: Tensor
    patch_answer: Tensor

    def __len__(self) -> int:
        return int(self.clean.shape[0])


def select(batch: Any, idx: Tensor) -> SubBatch:
    """Rows ``idx`` of a batch (repeats allowed), as a SubBatch."""
    return SubBatch(
        clean=batch.clean[idx.to(batch.clean.device)],
        patch=batch.patch[idx.to(batch.patch.device)],
        clean_answer=batch.clean_answer[idx.to(batch.clean_answer.device)],
        patch_answer=batch.patch_answer[idx.to(batch.patch_answer.device)],
    )


def _last_logit(logits: Tensor, tokens: Tensor) -> Tensor:
    last = logits[:, -1, :]
    return last.gather(1, tokens.to(last.device).view(-1, 1)).squeeze(1)


def logit_diff_metric(logits: Tensor, batch: Any) -> Tensor:
    """Spec default: logit(patch answer) - logit(clean answer) at the last position, per example."""
    return _last_logit(logits, batch.patch_answer) - _last_logit(logits, batch.clean_answer)


def neg_answer_logit_metric(logits: Tensor, batch: Any) -> Tensor:
    """No-counterfactual default: -logit(clean answer) at the last position."""
    return -_last_logit(logits, batch.clean_answer)


def default_metric(counterfactual: bool) -> Metric:
    return logit_diff_metric if counterfactual else neg_answer_logit_metric


def attribution_sites(
    loaded: Any, dictionaries: dict[str, nn.Module], sites: Iterable[str] | None = None
) -> list[Site]:
    """Sites (forward order) that have a dictionary, optionally restricted to ``sites`` names."""
    wanted = None if sites is None else set(sites)
    out = [s for s in loaded.sites if s.name in dictionaries and (wanted is None or s.name in wanted)]
    if wanted is not None and len(out) != len(wanted):
        missing = wanted - {s.name for s in out}
        raise KeyError(f"no dictionary / unknown site for {sorted(missing)}")
    return out


def _ids(t: Tensor, loaded: Any) -> Tensor:
    return t.to(loaded.device)


def collect_states(
    loaded: Any, dictionaries: dict[str, nn.Module], ids: Tensor, sites: Sequence[Site]
) -> tuple[dict[str, SiteState], Tensor]:
    """Plain forward on ``ids``: every site's (features, error) and the logits (all detached)."""
    saved: dict[str, Any] = {}
    lm = loaded.lm
    with lm.trace(_ids(ids, loaded)):
        for s in sites:
            saved[s.name] = get_activation(lm, s).save()
        saved["__logits__"] = lm.output.logits.save()
    with torch.no_grad():
        states = {}
        for s in sites:
            f, err = encode_with_error(dictionaries[s.name], saved[s.name].detach())
            states[s.name] = SiteState(f, err)
    return states, saved["__logits__"].detach()


def zero_last_resid_logits(loaded: Any, ids: Tensor) -> Tensor:
    """Logits with the last residual site zeroed: the model's output when every node of every site
    is set to zero (no-counterfactual "patch" state)."""
    lm = loaded.lm
    last = loaded.sites[-1]
    saved: dict[str, Any] = {}
    with lm.trace(_ids(ids, loaded)):
        x = get_activation(lm, last)
        set_activation(lm, last, torch.zeros_like(x))
        saved["logits"] = lm.output.logits.save()
    return saved["logits"].detach()


def spliced_clean_forward(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    ids: Tensor,
    sites: Sequence[Site],
    lrp: LRPConfig | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Forward on ``ids`` with every site spliced (features and error as grad leaves, output
    bit-identical to the model's), with the LRP rules of ``lrp`` active. Returns the leaves and
    the logits (with their graph)."""
    lm = loaded.lm
    leaves: dict[str, Any] = {}
    with lrp_context(loaded, lrp), lm.trace(_ids(ids, loaded)):
        for s in sites:
            out, f, err = splice_with_grad_leaves(dictionaries[s.name], get_activation(lm, s))
            set_activation(lm, s, out)
            leaves[s.name] = (f.save(), err.save())
        leaves["__logits__"] = lm.output.logits.save()
    logits = leaves.pop("__logits__")
    return leaves, logits


def patch_states(
    loaded: Any,
    dictionaries: dict[str, nn.Module],
    batch: Any,
    sites: Sequence[Site],
    clean: dict[str, SiteState],
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
