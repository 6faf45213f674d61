"""A circuit as a networkx graph and as GraphML.

    g = to_networkx(circuit); export_graphml(circuit, "out/circuit.graphml")

:func:`to_networkx` gives a ``networkx.DiGraph`` with one node per circuit node (attributes
``site``, ``kind``, ``layer``, ``position``, ``feature``, ``is_error``, ``effect``; enums as their
string values) plus the sink ``logit`` (kind ``logit``, layer = the number of layers, effect = the
circuit's total effect), and one edge per circuit edge (attribute ``weight``). The graph attributes
hold the circuit's scalar metadata (schema_version, model, saes, method, metric, ...) and
``timing_s``.

The error node keeps the one encoding of :mod:`feature_circuits.types`: ``feature`` is None and its
id is ``<site>/err``; ``position`` is None under aggregation ``sum``. GraphML has no null, so
:func:`export_graphml` leaves the attribute out instead (an error node has no ``feature`` attribute,
a node of a ``sum`` circuit no ``position``; read ``is_error`` to tell error nodes apart), writes a
non-finite effect as 0.0, flattens ``timing_s`` into ``timing_<stage>`` graph attributes and writes
a missing graph attribute as the empty string.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING

from feature_circuits.circuit.schema import Circuit, Node
from feature_circuits.types import LOGIT_ID

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["LOGIT_KIND", "export_graphml", "to_networkx"]

#: ``kind`` of the sink node in the networkx graph.
LOGIT_KIND = "logit"
_NOT_METADATA = frozenset(
    {"nodes", "edges", "timing_s", "tokens", "dictionaries", "sites_without_dictionary"}
)

Scalar = str | int | float | bool | None


def _plain(value: object) -> Scalar:
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"not a scalar graph attribute: {value!r}")


def to_networkx(circuit: Circuit) -> nx.DiGraph:
    """The circuit as a ``networkx.DiGraph`` (see the module docstring)."""
    import networkx as nx

    g = nx.DiGraph()
    g.graph.update({k: _plain(getattr(circuit, k)) for k in Circuit.model_fields if k not in _NOT_METADATA})
    g.graph["timing_s"] = dict(circuit.timing_s)
    g.graph["sites_without_dictionary"] = ",".join(circuit.sites_without_dictionary)
    for n in circuit.nodes:
        attrs = {k: _plain(getattr(n, k)) for k in Node.model_fields if k not in ("id", "activation")}
        if url := circuit.neuronpedia_url(n):
            attrs["neuronpedia"] = url
        if n.activation is not None:  # the contexts stay in circuit.json (GraphML holds scalars)
            attrs["mean_clean"] = n.activation.mean_clean
            attrs["mean_patch"] = n.activation.mean_patch
        g.add_node(n.id, **attrs)
    g.add_node(
        LOGIT_ID,
        site=LOGIT_ID,
        kind=LOGIT_KIND,
        layer=circuit.num_layers,
        position=None,
        feature=None,
        is_error=False,
        effect=circuit.total_effect,
    )
    for e in circuit.edges:
        g.add_edge(e.source, e.target, weight=e.weight)
    return g


def export_graphml(circuit: Circuit, path: str | Path) -> Path:
    """Write the :func:`to_networkx` graph as GraphML (nulls left out, see the module docstring)."""
    import networkx as nx

    g = to_networkx(circuit)
    for _, attrs in g.nodes(data=True):
        for k in [k for k, v in attrs.items() if v is None]:
            del attrs[k]
        if not math.isfinite(attrs["effect"]):
            attrs["effect"] = 0.0
    timing = g.graph.pop("timing_s")
    for k, v in timing.items():
        g.graph[f"timing_{k}"] = float(v)
    for k, v in list(g.graph.items()):
        if v is None:
            g.graph[k] = ""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(g, path)
    return path
