"""The circuit: per-batch effects -> aggregated effects -> thresholded circuit -> files.

* :mod:`~feature_circuits.circuit.schema` -- ``circuit.json`` as pydantic models (:class:`Node`,
  :class:`Edge`, :class:`Circuit`), read and written by :func:`load_circuit` / :func:`save_circuit`;
  the JSON Schema is generated from them;
* :mod:`~feature_circuits.circuit.aggregate` -- :func:`aggregate_nodes`, :func:`aggregate_edges` and
  their streaming form :class:`NodeAccumulator`, :class:`EdgeAccumulator`;
* :mod:`~feature_circuits.circuit.build` -- :func:`build_circuit` (thresholds, the logit sink);
* :mod:`~feature_circuits.circuit.effects` -- the dense effects file (:data:`EFFECTS_FILE`);
* :mod:`~feature_circuits.circuit.export` -- networkx and GraphML.

The names below are imported on first use, so ``import feature_circuits.circuit.schema`` (reading a
circuit, printing ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feature_circuits.circuit.aggregate import (
        AggregatedNodes,
        EdgeAccumulator,
        NodeAccumulator,
        aggregate_edges,
        aggregate_nodes,
    )
    from feature_circuits.circuit.build import build_circuit
    from feature_circuits.circuit.effects import EFFECTS_FILE, load_effects, save_effects
    from feature_circuits.circuit.export import export_graphml, to_networkx
    from feature_circuits.circuit.schema import (
        SCHEMA_PATH,
        SCHEMA_VERSION,
        Circuit,
        Edge,
        Node,
        circuit_from_dict,
        circuit_to_dict,
        load_circuit,
        save_circuit,
    )
    from feature_circuits.errors import CircuitError
    from feature_circuits.types import LOGIT_ID

#: Public name -> the module that defines it.
_SOURCE = {
    "AggregatedNodes": "feature_circuits.circuit.aggregate",
    "EdgeAccumulator": "feature_circuits.circuit.aggregate",
    "NodeAccumulator": "feature_circuits.circuit.aggregate",
    "aggregate_edges": "feature_circuits.circuit.aggregate",
    "aggregate_nodes": "feature_circuits.circuit.aggregate",
    "build_circuit": "feature_circuits.circuit.build",
    "EFFECTS_FILE": "feature_circuits.circuit.effects",
    "load_effects": "feature_circuits.circuit.effects",
    "save_effects": "feature_circuits.circuit.effects",
    "export_graphml": "feature_circuits.circuit.export",
    "to_networkx": "feature_circuits.circuit.export",
    "SCHEMA_PATH": "feature_circuits.circuit.schema",
    "SCHEMA_VERSION": "feature_circuits.circuit.schema",
    "Circuit": "feature_circuits.circuit.schema",
    "Edge": "feature_circuits.circuit.schema",
    "Node": "feature_circuits.circuit.schema",
    "circuit_from_dict": "feature_circuits.circuit.schema",
    "circuit_to_dict": "feature_circuits.circuit.schema",
    "load_circuit": "feature_circuits.circuit.schema",
    "save_circuit": "feature_circuits.circuit.schema",
    "CircuitError": "feature_circuits.errors",
    "LOGIT_ID": "feature_circuits.types",
}

__all__ = [
    "EFFECTS_FILE",
    "LOGIT_ID",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "AggregatedNodes",
    "Circuit",
    "CircuitError",
    "Edge",
    "EdgeAccumulator",
    "Node",
    "NodeAccumulator",
    "aggregate_edges",
    "aggregate_nodes",
    "build_circuit",
    "circuit_from_dict",
    "circuit_to_dict",
    "export_graphml",
    "load_circuit",
    "load_effects",
    "save_circuit",
    "save_effects",
    "to_networkx",
]


def __getattr__(name: str) -> object:
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
