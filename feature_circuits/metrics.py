"""The metrics: what attribution explains and evaluation measures, one definition each.

A metric maps the logits ``(b, s, V)`` of a forward and the batch's answer tokens to one number per
example ``(b,)``. Attribution estimates how patching a node (clean -> counterfactual) changes it;
evaluation measures how much of its clean-vs-patch gap a circuit recovers. Both take the metric as
a parameter, and a circuit records which one it was discovered with (``Circuit.metric``), so the
evaluation uses the same one by default.

* ``logit_diff`` (the default): ``logit(patch answer) - logit(clean answer)`` at the last position.
  Patching the whole clean input to the patch input raises it; node effects are its change.
* ``answer_logit``: ``-logit(clean answer)`` at the last position, for runs without a
  counterfactual (zero ablation: the "patch" state is every node set to zero).

Evaluation reports faithfulness as a ratio of differences of the metric, so its sign convention
cancels (see :mod:`feature_circuits.evaluation.sweep`).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

from feature_circuits.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by the callers; keep this module import-free for --help
    from torch import Tensor

__all__ = [
    "METRICS",
    "Answers",
    "Metric",
    "MetricName",
    "answer_logit",
    "default_metric_name",
    "get_metric",
    "logit_diff",
]


class Answers(Protocol):
    """What a metric reads of a batch: the answer token of each example, ``(b,)`` each."""

    @property
    def clean_answer(self) -> Tensor: ...

    @property
    def patch_answer(self) -> Tensor: ...


class Metric(Protocol):
    """``metric(logits (b, s, V), answers) -> (b,)``."""

    def __call__(self, logits: Tensor, answers: Answers, /) -> Tensor: ...


class MetricName(str, enum.Enum):
    """The metrics a circuit can record (its ``metric`` field)."""

    LOGIT_DIFF = "logit_diff"
    ANSWER_LOGIT = "answer_logit"


def _last_logit(logits: Tensor, tokens: Tensor) -> Tensor:
    last = logits[:, -1, :]
    return last.gather(1, tokens.to(last.device).view(-1, 1)).squeeze(1)


def logit_diff(logits: Tensor, answers: Answers, /) -> Tensor:
    """``logit(patch answer) - logit(clean answer)`` at the last position, per example."""
    return _last_logit(logits, answers.patch_answer) - _last_logit(logits, answers.clean_answer)


def answer_logit(logits: Tensor, answers: Answers, /) -> Tensor:
    """``-logit(clean answer)`` at the last position, per example (no-counterfactual runs)."""
    return -_last_logit(logits, answers.clean_answer)


#: Metric by name.
METRICS: dict[MetricName, Metric] = {MetricName.LOGIT_DIFF: logit_diff, MetricName.ANSWER_LOGIT: answer_logit}


def get_metric(name: MetricName | str) -> Metric:
    """The metric called ``name`` (``logit_diff`` or ``answer_logit``)."""
    try:
        return METRICS[MetricName(name)]
    except ValueError:
        raise ConfigError(f"unknown metric {name!r}; choose one of {[m.value for m in MetricName]}") from None


def default_metric_name(counterfactual: bool) -> MetricName:
    """``logit_diff`` with a counterfactual input, ``answer_logit`` without one."""
    return MetricName.LOGIT_DIFF if counterfactual else MetricName.ANSWER_LOGIT
