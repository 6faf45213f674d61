"""The circuit explorer: a self-contained offline HTML page of a circuit, and the labels/groups file.

    render_circuit_html(circuit, "out/circuit.html", labels="labels.jsonl")
    render_compare_html(circuit_a, circuit_b, "out/compare.html", names=("relp", "ig"))
    labels = load_labels("labels.jsonl")          # a dict (site, feature) -> label, with .groups

The page (drawn with cytoscape.js, inlined with its license in ``assets/``) and what it does are
described in ``docs/explorer.md``; :mod:`feature_circuits.render.page` builds it and
:mod:`feature_circuits.render.labels` reads and writes the labels/groups file.
"""

from feature_circuits.errors import LabelsError
from feature_circuits.render.labels import Group, Labels, dump_labels, load_labels, parse_node_id
from feature_circuits.render.page import (
    edge_thresholds,
    layout,
    neuronpedia_url,
    page_data,
    render_circuit_html,
    render_compare_html,
    slider_thresholds,
)

__all__ = [
    "Group",
    "Labels",
    "LabelsError",
    "dump_labels",
    "edge_thresholds",
    "layout",
    "load_labels",
    "neuronpedia_url",
    "page_data",
    "parse_node_id",
    "render_circuit_html",
    "render_compare_html",
    "slider_thresholds",
]
