"""circuit.json: node ids and constructors, the round trip, the generated JSON Schema (checked with the
``jsonschema`` package), and errors naming the file and the field for invalid documents."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jsonschema
import pytest
from pydantic import ValidationError

from feature_circuits.circuit import (
    LOGIT_ID,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    Circuit,
    CircuitError,
    Node,
    circuit_from_dict,
    circuit_to_dict,
    load_circuit,
    save_circuit,
)
from feature_circuits.circuit.schema import schema_text
from feature_circuits.metrics import MetricName
from feature_circuits.types import SiteKind
from tests.helpers import small_circuit

SCHEMA = json.loads(SCHEMA_PATH.read_text())


def test_node_ids_and_constructors():
    assert Node.make_id("resid_3", 123) == "resid_3/123"
    assert Node.make_id("resid_3", 123, 4) == "resid_3@4/123"
    assert Node.make_id("resid_3", None) == "resid_3/err"
    assert Node.make_id("embed", None, 0) == "embed@0/err"
    n = Node.feature_node("attn_2", 7, effect=0.5, position=3)
    assert (n.id, n.kind, n.layer, n.position, n.feature, n.is_error) == (
        "attn_2@3/7",
        SiteKind.ATTN,
        2,
        3,
        7,
        False,
    )
    e = Node.error_node("embed", effect=-1.0)
    assert (e.id, e.kind, e.layer, e.position, e.feature, e.is_error) == (
        "embed/err",
        SiteKind.EMBED,
        -1,
        None,
        None,
        True,
    )
    assert Node.from_index("mlp_0", 4, n_features=4, effect=1.0) == Node.error_node("mlp_0", effect=1.0)
    assert Node.from_index("mlp_0", 3, n_features=4, effect=1.0) == Node.feature_node("mlp_0", 3, effect=1.0)
    with pytest.raises(ValueError, match="not a site name"):
        Node.make_id("layer3", 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "mlp"}, "do not match site 'resid_3'"),
        ({"layer": 2}, "do not match site 'resid_3'"),
        ({"site": "resid3"}, "not a site name"),
        ({"feature": None}, "is_error must be true exactly when feature is null"),
        ({"id": "resid_3/124"}, "does not match its site, position and feature"),
        ({"effect": math.nan}, "finite number"),
    ],
)
def test_node_rules(change, message):
    good = Node.feature_node("resid_3", 123, effect=0.5).model_dump()
    with pytest.raises(ValidationError, match=message):
        Node(**{**good, **change})


def test_json_round_trip(tmp_path):
    for agg in ("sum", "none"):
        c = small_circuit(agg)
        p = save_circuit(c, tmp_path / agg / "circuit.json")
        back = load_circuit(p)
        assert back == c
        d = json.loads(p.read_text())
        assert d["schema_version"] == SCHEMA_VERSION == 2
        assert list(d) == [
            "schema_version",
            "model",
            "saes",
            "method",
            "metric",
            "dataset",
            "split",
            "num_examples",
            "aggregation",
            "node_threshold",
            "edge_threshold",
            "total_effect",
            "nodes",
            "edges",
            "timing_s",
            *(["tokens"] if agg == "none" else []),  # optional fields: left out when None
            "n_layers",
            "max_abs_effect",
            "dictionaries",
            "sites_without_dictionary",
        ]
        assert all("activation" not in nd for nd in d["nodes"])  # not recorded: left out
        assert d["metric"] == "logit_diff" and d["method"] == "relp" and d["aggregation"] == agg
        assert set(d["nodes"][0]) == {
            "id",
            "site",
            "kind",
            "layer",
            "position",
            "feature",
            "is_error",
            "effect",
        }
        err = next(n for n in d["nodes"] if n["is_error"])
        assert err["feature"] is None and err["id"].endswith("/err")
        if agg == "sum":
            assert all(n["position"] is None for n in d["nodes"])
            assert "tokens" not in d and "effects_file" not in d  # optional: left out, not null
        else:
            assert d["tokens"] == ["The", " keys"]


def test_nan_total_effect_is_null(tmp_path):
    c = small_circuit("sum").replace(total_effect=math.nan)
    p = save_circuit(c, tmp_path / "circuit.json")
    assert json.loads(p.read_text())["total_effect"] is None
    assert math.isnan(load_circuit(p).total_effect)
    jsonschema.validate(json.loads(p.read_text()), SCHEMA)


def test_older_file_without_metric_loads_with_the_default(tmp_path):
    d = circuit_to_dict(small_circuit("sum"))
    del d["metric"]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    assert load_circuit(p).metric is MetricName.LOGIT_DIFF
    d["metric"] = "answer_logit"
    assert circuit_from_dict(d).metric is MetricName.ANSWER_LOGIT


def test_committed_schema_is_the_generated_one():
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "circuit.schema.json is stale: python -m feature_circuits.circuit.schema > "
        "feature_circuits/circuit/circuit.schema.json"
    )
    assert Circuit.model_json_schema() | {"$defs": SCHEMA["$defs"]} == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["required"][0] == "schema_version"
    assert SCHEMA["properties"]["schema_version"]["enum"] == [1, 2] and SCHEMA_VERSION == 2


def test_saved_circuits_pass_jsonschema(tmp_path):
    for agg in ("sum", "none"):
        p = save_circuit(
            small_circuit(agg).replace(effects_file="effects.safetensors"), tmp_path / f"{agg}.json"
        )
        jsonschema.validate(json.loads(p.read_text()), SCHEMA)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("nodes"), r"nodes: Field required"),
        (lambda d: d.update(method="magic"), r"method: Input should be 'exact', 'atp', 'ig' or 'relp'"),
        (lambda d: d.update(metric="accuracy"), r"metric: Input should be 'logit_diff' or 'answer_logit'"),
        (lambda d: d["nodes"][0].update(effect="big"), r"nodes\[0\]\.effect: Input should be a valid number"),
        (lambda d: d["nodes"][0].update(layer="3"), r"nodes\[0\]\.layer: Input should be a valid integer"),
        (lambda d: d["nodes"][0].update(kind="logit"), r"nodes\[0\]\.kind: Input should be"),
        (
            lambda d: d["nodes"][0].update(feature=-2),
            r"nodes\[0\]\.feature: Input should be greater than or equal",
        ),
        (lambda d: d["nodes"][0].pop("site"), r"nodes\[0\]\.site: Field required"),
        (lambda d: d["edges"][0].update(weight=None), r"edges\[0\]\.weight: Input should be a valid number"),
        (lambda d: d.update(extra=1), r"extra: Extra inputs are not permitted"),
        (lambda d: d["nodes"][0].update(colour="red"), r"nodes\[0\]\.colour: Extra inputs are not permitted"),
        (lambda d: d.update(effects_file=3), r"effects_file: Input should be a valid string"),
        (lambda d: d.update(tokens="The keys"), r"tokens: Input should be a valid (array|tuple|list)"),
        (lambda d: d.update(num_examples=-1), r"num_examples: Input should be greater than or equal to 0"),
    ],
)
def test_invalid_documents_rejected_by_pydantic_and_jsonschema(tmp_path, mutate, message):
    d = circuit_to_dict(small_circuit("sum"))
    mutate(d)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, SCHEMA)
    p = tmp_path / "circuit.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitError, match=message) as info:
        load_circuit(p)
    assert str(info.value).startswith(f"{p}: invalid circuit")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=99), "unsupported schema_version 99 .*reads 1, 2"),
        (lambda d: d.pop("schema_version"), "missing 'schema_version'"),
        (lambda d: d["edges"][0].update(source="nope/1"), r"edges\[0\]\.source: unknown node 'nope/1'"),
        (lambda d: d["edges"][0].update(target="resid_1/3"), r"edges\[0\]\.target: unknown node 'resid_1/3'"),
        (lambda d: d["edges"][-1].update(source=LOGIT_ID), r"edges\[\d+\]\.source: unknown node 'logit'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), r"nodes\[5\]: duplicate node id 'embed/0'"),
        (lambda d: d["nodes"][0].update(feature=None), r"nodes\[0\]: .*is_error must be true exactly when"),
        (lambda d: d["nodes"][0].update(position=3), r"nodes\[0\]: .*id 'embed/0' does not match"),
        (
            lambda d: d["nodes"][0].update(position=3, id="embed@3/0"),
            r"nodes\[0\]\.position: must be null under aggregation 'sum'",
        ),
        (lambda d: d["nodes"][0].update(kind="mlp"), r"nodes\[0\]: .*do not match site 'embed'"),
        (lambda d: d.update(aggregation="none"), r"nodes\[0\]\.position: required under aggregation 'none'"),
    ],
)
def test_graph_rules_and_version(tmp_path, mutate, message):
    d = circuit_to_dict(small_circuit("sum"))
    mutate(d)
    p = tmp_path / "circuit.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitError, match=message) as info:
        load_circuit(p)
    assert str(p) in str(info.value)


def test_version_1_files_still_read(tmp_path):
    d = circuit_to_dict(small_circuit("sum"))
    d["schema_version"] = 1
    del d["dictionaries"], d["sites_without_dictionary"]
    c = circuit_from_dict(d, "old.json")
    assert c.schema_version == 1 and c.dictionaries == {} and c.sites_without_dictionary == ()


def test_write_is_checked(tmp_path):
    c = small_circuit("sum")
    with pytest.raises(ValidationError, match="unsupported schema_version 3"):
        c.replace(schema_version=3)
    with pytest.raises(ValidationError, match="unknown node"):
        c.replace(nodes=c.nodes[1:])
    with pytest.raises(ValidationError, match="Instance is frozen"):
        setattr(c, "model", "other")  # noqa: B010 (pyright does not see pydantic's frozen)
    bad = Circuit.model_construct(**{**dict(c), "schema_version": 3})  # bypasses validation
    with pytest.raises(CircuitError, match="unsupported schema_version 3") as info:
        save_circuit(bad, tmp_path / "circuit.json")
    assert str(tmp_path / "circuit.json") in str(info.value)
    assert not (tmp_path / "circuit.json").exists()


def test_load_errors(tmp_path):
    with pytest.raises(CircuitError, match="not found"):
        load_circuit(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CircuitError, match=r"bad\.json: not valid JSON"):
        load_circuit(tmp_path / "bad.json")
    with pytest.raises(CircuitError, match="expected a JSON object"):
        circuit_from_dict([1, 2])  # pyright: ignore[reportArgumentType]


def test_summary_and_views():
    c = small_circuit("sum")
    text = c.summary()
    assert "resid_1" in text and "total: 5 nodes, 5 edges" in text
    assert text.splitlines()[1].startswith("embed")  # sites in execution order, the logit last
    assert text.splitlines()[-3].startswith(LOGIT_ID)
    assert [n.id for n in c.nodes_by_site()["resid_0"]] == ["resid_0/1", "resid_0/err"]
    assert c.num_layers == 2 and c.replace(n_layers=None).num_layers == 2  # from the nodes' layers


@pytest.mark.slow
def test_import_does_not_load_torch():
    code = (
        "import sys, feature_circuits.circuit.schema as s, feature_circuits.circuit as c; c.Circuit; "
        "assert not {'torch', 'dictionary_learning'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
