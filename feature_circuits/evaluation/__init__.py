"""Faithfulness and completeness of a circuit by mean ablation."""

from feature_circuits.evaluation.sweep import *  # noqa: F403
from feature_circuits.evaluation.sweep import __all__  # noqa: F401
