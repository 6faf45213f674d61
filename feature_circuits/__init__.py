"""feature-circuits: sparse feature circuits in language models.

The public API, imported lazily (``import feature_circuits`` imports no torch; each name loads its
module on first use)::

    import feature_circuits as fc

    loaded, saes = fc.load("embedded", "embedded")          # model with LRP rules installed + dictionaries
    nodes = fc.node_effects(loaded, saes, batch, fc.Method.RELP)
    edges = fc.edge_effects(loaded, saes, batch, nodes, node_threshold=0.1, method=fc.Method.RELP)
    circuit = fc.discover(fc.DiscoverConfig(method=fc.Method.RELP, out="out"))
    results = fc.evaluate(fc.EvaluateConfig(circuits=("out/circuit.json",)))

The stages and their definitions: docs/algorithms.md; the data flow is the package layout
(``model``, ``dictionaries``, ``data`` -> ``attribution`` -> ``circuit`` -> ``evaluation``,
``render``; ``pipeline`` runs them, ``cli`` is the command line).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "node_effects": "feature_circuits.attribution",
    "edge_effects": "feature_circuits.attribution",
    "discover": "feature_circuits.pipeline",
    "evaluate": "feature_circuits.pipeline",
    "DiscoverConfig": "feature_circuits.pipeline",
    "EvaluateConfig": "feature_circuits.pipeline",
    "Circuit": "feature_circuits.circuit",
    "load_circuit": "feature_circuits.circuit",
    "Method": "feature_circuits.types",
    "Aggregation": "feature_circuits.types",
    "LRPConfig": "feature_circuits.types",
    "MetricName": "feature_circuits.metrics",
    "FeatureCircuitsError": "feature_circuits.errors",
}

__all__ = [
    "Aggregation",
    "Circuit",
    "DiscoverConfig",
    "EvaluateConfig",
    "FeatureCircuitsError",
    "LRPConfig",
    "Method",
    "MetricName",
    "__version__",
    "discover",
    "edge_effects",
    "evaluate",
    "load",
    "load_circuit",
    "node_effects",
]

if TYPE_CHECKING:
    import torch

    from feature_circuits.attribution import edge_effects, node_effects
    from feature_circuits.circuit import Circuit, load_circuit
    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.errors import FeatureCircuitsError
    from feature_circuits.metrics import MetricName
    from feature_circuits.model import LoadedModel
    from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig, discover, evaluate
    from feature_circuits.types import Aggregation, LRPConfig, Method


def load(
    model: str = "embedded",
    saes: str = "embedded",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
) -> tuple[LoadedModel, dict[str, Dictionary]]:
    """The model (HF id, short name or local directory) with the LRP rules installed (all off until
    relp turns them on) and its dictionaries (``embedded``, ``marks``, ``neurons`` or a Marks-layout
    root): ``(loaded, {site name: dictionary})``. ``device`` None: CUDA when available."""
    from feature_circuits.attribution import load_for_attribution

    return load_for_attribution(model, saes, device=device, dtype=dtype)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'feature_circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
