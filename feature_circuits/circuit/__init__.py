"""The circuit: aggregation of effects, thresholds, circuit.json, the effects file, networkx export."""

from feature_circuits.circuit.graph import *  # noqa: F403
from feature_circuits.circuit.graph import __all__  # noqa: F401
