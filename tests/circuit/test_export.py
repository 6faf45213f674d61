"""networkx and GraphML export: attributes, the logit sink, one error-node encoding (feature None in
networkx, no ``feature`` attribute in GraphML)."""

from __future__ import annotations

import networkx as nx
import pytest

from feature_circuits.circuit import LOGIT_ID, export_graphml, to_networkx
from tests.helpers import small_circuit


def test_networkx_attributes():
    c = small_circuit("sum")
    g = to_networkx(c)
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == len(c.nodes) + 1
    assert g.number_of_edges() == len(c.edges)
    assert g.nodes["resid_0/err"] == {
        "site": "resid_0",
        "kind": "resid",
        "layer": 0,
        "position": None,
        "feature": None,
        "is_error": True,
        "effect": pytest.approx(0.7),
    }
    assert type(g.nodes["resid_0/err"]["kind"]) is str  # the enum's value, not the enum
    assert g.nodes[LOGIT_ID]["kind"] == "logit" and g.nodes[LOGIT_ID]["layer"] == 2
    assert g.edges["resid_1/0", LOGIT_ID]["weight"] == pytest.approx(1.5)
    assert g.graph["method"] == "relp" and type(g.graph["method"]) is str
    assert g.graph["metric"] == "logit_diff" and g.graph["num_examples"] == 1
    assert g.graph["timing_s"] == {"nodes": 1.0}
    assert nx.is_directed_acyclic_graph(g)


def test_graphml_export(tmp_path):
    for agg in ("sum", "none"):
        c = small_circuit(agg)
        p = export_graphml(c, tmp_path / f"{agg}.graphml")
        g = nx.read_graphml(p)
        assert g.number_of_nodes() == len(c.nodes) + 1
        assert g.number_of_edges() == len(c.edges)
        err = g.nodes["resid_0/err" if agg == "sum" else "resid_0@1/err"]
        assert "feature" not in err and err["is_error"] is True  # GraphML has no null: left out
        feat = g.nodes["resid_0/1" if agg == "sum" else "resid_0@1/1"]
        assert feat["feature"] == 1 and feat["is_error"] is False
        if agg == "sum":
            assert all("position" not in a for _, a in g.nodes(data=True))
        else:
            assert err["position"] == 1 and "position" not in g.nodes[LOGIT_ID]
        assert g.graph["model"] == "tiny <b>model</b>"
        assert g.graph["timing_nodes"] == 1.0 and g.graph["effects_file"] == ""


def test_dictionary_info_and_activation_reach_the_graph():
    from feature_circuits.circuit import Circuit
    from feature_circuits.circuit.schema import Context, DictionaryInfo, NodeActivation

    c = small_circuit("sum")
    act = NodeActivation(
        mean_clean=2.0,
        mean_patch=0.5,
        contexts=(Context(tokens=("a", "b"), index=1, activation=3.0, source="discovery"),),
    )
    nodes = tuple(n.model_copy(update={"activation": act}) if n.id == "resid_1/0" else n for n in c.nodes)
    info = DictionaryInfo(kind="saelens", source="rel/sae", n_features=8, neuronpedia="m/1-res")
    c = Circuit.model_validate({**dict(c), "nodes": nodes, "dictionaries": {"resid_1": info}})
    g = to_networkx(c)
    assert g.nodes["resid_1/0"]["neuronpedia"] == "https://www.neuronpedia.org/m/1-res/0"
    assert g.nodes["resid_1/0"]["mean_clean"] == 2.0 and g.nodes["resid_1/0"]["mean_patch"] == 0.5
    assert "neuronpedia" not in g.nodes["resid_0/err"]  # no dictionary info for resid_0, and an error node
