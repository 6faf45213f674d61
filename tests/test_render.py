"""The explorer page without a browser: the labels/groups file, the page's data (layout, thresholds,
contexts, links), self-containment and escaping, compare, and ``feature-circuits render``. The page
in a browser: tests/test_explorer_browser.py."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from feature_circuits import cli
from feature_circuits.circuit import Node, save_circuit
from feature_circuits.circuit.schema import DictionaryInfo
from feature_circuits.errors import CircuitError
from feature_circuits.render import (
    Group,
    Labels,
    LabelsError,
    dump_labels,
    edge_thresholds,
    load_labels,
    neuronpedia_url,
    page_data,
    parse_node_id,
    render_circuit_html,
    render_compare_html,
    slider_thresholds,
)
from feature_circuits.render.page import DEFAULT_MAX_EDGES
from feature_circuits.types import LOGIT_ID
from tests.helpers import small_circuit
from tests.render_helpers import SITES, rich_circuit, visible_counts
from tests.test_pipeline import tiny_data  # noqa: F401 (the pairs file fixture, shared)

BAD = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def _embedded_data(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="fc-data">(.*?)</script>', text, re.DOTALL)
    assert m, "no #fc-data in the page"
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------ labels and groups


def test_labels_file(tmp_path):
    p = tmp_path / "labels.jsonl"
    p.write_text(
        '{"site": "resid_0", "feature": 1, "label": "plural"}\n\n{"site": "resid_0", "feature": null, '
        '"label": "err", "note": "keys beyond these are allowed in label lines"}\n'
    )
    labels = load_labels(p)
    assert labels == {("resid_0", 1): "plural", ("resid_0", None): "err"} and labels.groups == []
    render_circuit_html(small_circuit("sum"), tmp_path / "c.html", labels=p)
    assert "plural" in (tmp_path / "c.html").read_text()
    for content, msg in [
        ('{"site": "resid_0", "feature": 1}\n', ":1: missing key"),
        ('{"site": "resid_0", "feature": 1, "label": "a"}\nnot json\n', ":2: not valid JSON"),
        ('{"site": "resid_0", "feature": -1, "label": "a"}\n', ":1: 'feature' must be"),
        ('{"site": 3, "feature": 1, "label": "a"}\n', ":1: 'site' must be"),
        ('{"site": "x", "feature": 1, "label": 5}\n', ":1: 'label' must be a string"),
        ("[1]\n", ":1: expected an object"),
    ]:
        p.write_text(content)
        with pytest.raises(LabelsError, match=re.escape(str(p)) + msg):
            load_labels(p)
    with pytest.raises(LabelsError, match="not found"):
        load_labels(tmp_path / "nope.jsonl")


def test_groups_round_trip_and_errors(tmp_path):
    labels = Labels({("resid_0", 1): "plural <b>", ("embed", None): "e"})
    groups = [Group("subject", ("resid_0/1", "embed/err")), Group("per position", ("resid_0@3/1",))]
    p = tmp_path / "labels.jsonl"
    p.write_text(dump_labels(labels, groups))
    back = load_labels(p, {"resid_0": 4, "embed": 4})
    assert dict(back) == dict(labels) and back.groups == groups
    assert parse_node_id("resid_0@3/1") == ("resid_0", 1, 3) and parse_node_id("embed/err") == (
        "embed",
        None,
        None,
    )
    sizes = {"resid_0": 4}
    for content, msg in [
        ('{"group": "", "nodes": ["resid_0/1"]}\n', ":1: 'group' must be a non-empty string"),
        ('{"group": "g", "nodes": []}\n', ":1: 'nodes' must be a non-empty list"),
        ('{"group": "g", "nodes": ["resid_0/x"]}\n', r":1: nodes\[0\]: not a node id"),
        ('{"group": "g", "nodes": ["resid_0/1"], "colour": 1}\n', r":1: unknown key\(s\) \['colour'\]"),
        (
            '{"group": "g", "nodes": ["resid_0/1", "resid_0/1"]}\n',
            ":1: group 'g' lists a node more than once",
        ),
        (
            '{"group": "g", "nodes": ["resid_0/1"]}\n{"group": "g", "nodes": ["resid_0/2"]}\n',
            ":2: group 'g' is already",
        ),
        ('{"group": "g", "nodes": ["mlp_0/1"]}\n', r":1: nodes\[0\]: unknown site 'mlp_0'"),
        ('{"group": "g", "nodes": ["resid_0/9"]}\n', r":1: nodes\[0\]: feature 9 is out of range"),
    ]:
        p.write_text(content)
        with pytest.raises(LabelsError, match=re.escape(str(p)) + msg):
            load_labels(p, sizes)


# ------------------------------------------------------------------------------------ page data


def test_page_data_layout_and_contexts():
    c = rich_circuit()
    d = page_data(c, Labels({("resid_1", 3): "plural"}, [Group("g", ("embed/3",))]))
    assert [n["id"] for n in d["nodes"]] == [n.id for n in c.nodes]
    rows = [r[0] for r in d["rows"]]
    assert rows == [*SITES, LOGIT_ID]
    ys = [r[1] for r in d["rows"]]
    assert ys == sorted(ys, reverse=True)  # embed at the bottom (largest y), the logit on top
    by_id = {n["id"]: n for n in d["nodes"]}
    row_y = dict(d["rows"])
    assert all(n["y"] == row_y[n["site"]] for n in d["nodes"])
    for site in SITES:  # nodes of a row do not overlap
        xs = sorted(n["x"] for n in d["nodes"] if n["site"] == site)
        assert all(b - a >= 50 for a, b in itertools.pairwise(xs))
    assert by_id["resid_1/3"]["lab"] == "plural" and d["groups"] == [{"name": "g", "nodes": ["embed/3"]}]
    node = next(n for n in c.nodes if n.id == "resid_1/3")
    assert node.activation is not None
    act = by_id["resid_1/3"]["act"]
    assert act["mc"] == node.activation.mean_clean and act["mp"] == node.activation.mean_patch
    ctx0 = node.activation.contexts[0]
    assert act["ctx"][0] == [list(ctx0.tokens), ctx0.index, ctx0.activation, ctx0.source]
    assert len(d["edges"]) == len(c.edges)


def test_layout_orders_nodes_to_reduce_crossings():
    """A node sits near the nodes it connects to: in a two-row chain, the upper row follows the
    order of the lower row."""
    c = rich_circuit()
    lower = [n for n in c.nodes if n.site == "resid_0" and not n.is_error]
    d = page_data(c)
    x = {n["id"]: n["x"] for n in d["nodes"]}
    assert len({x[n.id] for n in lower}) == len(lower)

    # every edge's mean horizontal run is shorter than with the nodes in id order
    def run(pos: dict[str, float]) -> float:
        return sum(abs(pos[e.source] - pos[e.target]) for e in c.edges if e.target != LOGIT_ID)

    naive: dict[str, float] = {}
    for site in SITES:
        nds = [n for n in c.nodes if n.site == site]
        for i, n in enumerate(nds):
            naive[n.id] = (i - (len(nds) - 1) / 2) * 70
    assert run(x) < run(naive)


def test_thresholds_split_the_circuit_in_steps():
    c = rich_circuit()
    t = slider_thresholds(c, 8)
    assert t[0] == c.node_threshold and t == sorted(t) and len(t) == 8
    counts = [visible_counts(c, x, None)[0] for x in t]
    assert counts[0] == len(c.nodes) and counts == sorted(counts, reverse=True) and counts[-1] >= 1
    assert len(set(counts)) == len(counts)
    e = edge_thresholds(c, 8)
    assert e[0] == c.edge_threshold and len(e) == 8 and e == sorted(e)
    assert slider_thresholds(small_circuit("sum", node_threshold=2.0)) == [2.0]  # no node: one step


def test_the_page_opens_with_a_readable_number_of_edges():
    big = rich_circuit(per_site=12)
    assert len(big.edges) > DEFAULT_MAX_EDGES
    d = page_data(big)
    k = d["initial_edge_step"]
    steps = d["edge_thresholds"]
    assert k > 0
    assert (
        visible_counts(big, None, steps[k])[1]
        <= DEFAULT_MAX_EDGES
        < visible_counts(big, None, steps[k - 1])[1]
    )
    assert page_data(rich_circuit())["initial_edge_step"] == 0  # few edges: all of them


def test_neuronpedia_links(tmp_path):
    base = small_circuit("sum")
    c = base.replace(saes="marks", model="EleutherAI/pythia-70m-deduped")
    node = Node.feature_node("resid_3", 123, effect=1.0)
    assert neuronpedia_url(c, node) == "https://www.neuronpedia.org/pythia-70m-deduped/3-res-sm/123"
    attn = Node.feature_node("attn_0", 7, effect=1.0)
    assert neuronpedia_url(c, attn) == "https://www.neuronpedia.org/pythia-70m-deduped/0-att-sm/7"
    assert neuronpedia_url(c, Node.error_node("resid_3", effect=1.0)) is None
    assert neuronpedia_url(c, Node.feature_node("embed", 5, effect=1.0)) is None  # no layer-indexed page
    assert neuronpedia_url(base, node) is None  # embedded SAEs: no link
    # the circuit's dictionaries name their Neuronpedia id: that wins
    info = DictionaryInfo(kind="saelens", source="r/s", n_features=16384, neuronpedia="gemma-2-2b/3-res-16k")
    g = base.replace(dictionaries={"resid_0": info})
    assert neuronpedia_url(g, Node.feature_node("resid_0", 9, effect=1.0)) == (
        "https://www.neuronpedia.org/gemma-2-2b/3-res-16k/9"
    )
    d = _embedded_data(render_circuit_html(c, tmp_path / "c.html").read_text())
    assert any(
        n["url"] and n["url"].startswith("https://www.neuronpedia.org/pythia-70m-deduped/")
        for n in d["nodes"]
    )


# ---------------------------------------------------------------------------- the HTML document


def test_page_is_self_contained_small_and_escaped(tmp_path):
    c = rich_circuit()
    page = render_circuit_html(c, tmp_path / "c.html", labels={("resid_0", 3): BAD})
    text = page.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", text)  # cytoscape.js and the page's script inlined
    assert not re.search(r"<link[^>]*\shref=", text)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text  # no request can leave
    assert "cytoscape" in text and "fcExplorer" in text
    assert BAD not in text and "<b>model</b>" not in text  # data is escaped everywhere
    assert "<title>relp circuit: tiny &lt;b&gt;model&lt;/b&gt;" in text
    data = _embedded_data(text)
    assert [row[2] for row in data["labels"]] == [BAD]  # ... and decodes back to the text itself
    assert 300_000 < len(text.encode()) < 700_000  # cytoscape.js (~440 kB) + the page


def test_page_shows_enum_values(tmp_path):
    d = _embedded_data(render_circuit_html(small_circuit("none"), tmp_path / "c.html").read_text())
    meta = dict(d["meta"])
    assert meta["method"] == "relp" and meta["aggregation"] == "none" and meta["metric"] == "logit_diff"
    assert d["title"].startswith("relp circuit: tiny")
    assert "tokens (first example)" in meta and d["columns"][0][0] == "'The'"


def test_empty_circuit_says_so(tmp_path):
    c = small_circuit("sum", node_threshold=100.0)
    assert not c.nodes
    d = _embedded_data(render_circuit_html(c, tmp_path / "c.html").read_text())
    assert d["empty"].startswith("no node above threshold") and d["nodes"] == []


def test_compare_marks_shared_and_missing(tmp_path):
    a = rich_circuit()
    b = rich_circuit(drop=frozenset({"mlp_0/3"}))
    d = _embedded_data(render_compare_html(a, b, tmp_path / "cmp.html", names=("relp", "ig")).read_text())
    inn = {n["id"]: n["in"] for n in d["nodes"]}
    assert inn["mlp_0/3"] == "a" and sum(v == "both" for v in inn.values()) == len(b.nodes)
    assert d["compare"]["counts"] == {"both": len(b.nodes), "a": 1, "b": 0}
    n0 = next(n for n in d["nodes"] if n["id"] == "embed/3")
    assert n0["effA"] == n0["effB"] and next(n for n in d["nodes"] if n["id"] == "mlp_0/3")["effB"] is None
    assert {e[3] for e in d["edges"]} <= {"both", "a", "b"}
    with pytest.raises(CircuitError, match="cannot compare circuits of aggregation 'sum' and 'none'"):
        render_compare_html(a, rich_circuit(aggregation="none"), tmp_path / "x.html")


# ---------------------------------------------------------------------------------------- the CLI


def test_render_command(tmp_path, capsys):
    c = rich_circuit().replace(
        dictionaries={s: DictionaryInfo(kind="marks", source="x", n_features=64) for s in SITES}
    )
    save_circuit(c, tmp_path / "a" / "circuit.json")
    save_circuit(rich_circuit(drop=frozenset({"mlp_0/3"})), tmp_path / "b" / "circuit.json")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(dump_labels({("resid_1", 3): "plural"}, [Group("g", ("embed/3", "mlp_0/3"))]))
    assert cli.main(["render", str(tmp_path / "a" / "circuit.json"), "--labels", str(labels)]) == 0
    page = tmp_path / "a" / "circuit.html"
    assert f"wrote {page}" in capsys.readouterr().out
    d = _embedded_data(page.read_text())
    assert d["groups"] == [{"name": "g", "nodes": ["embed/3", "mlp_0/3"]}]
    out = tmp_path / "cmp.html"
    assert cli.main(["render", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    d = _embedded_data(out.read_text())
    assert d["compare"]["names"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    # labels are checked against the circuit's dictionaries, the error names the file and line
    labels.write_text('{"site": "resid_1", "feature": 99, "label": "x"}\n')
    capsys.readouterr()
    assert cli.main(["render", str(tmp_path / "a"), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"error: {labels}:1: feature 99 is out of range for site resid_1" in err
    assert cli.main(["render"]) == 2
    assert "give one CIRCUIT or --compare A B" in capsys.readouterr().err


@pytest.mark.slow
def test_discover_reads_the_labels_groups_file(tmp_path, capsys, neox_dir, neox_saes, tiny_data):  # noqa: F811
    """``discover --labels`` takes the file the page saves: labels and groups land in circuit.html; a
    group member past its dictionary is an error naming the file and line."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        dump_labels({("resid_0", 0): "first <i>feature</i>"}, [Group("g", ("resid_0/0", "embed/err"))])
    )
    argv = ["discover", "--model", str(neox_dir), "--saes", str(neox_saes), "--dataset", str(tiny_data)]
    argv += ["--num-examples", "4", "--batch-size", "2", "--node-threshold", "0.001", "--quiet"]
    assert cli.main([*argv, "--labels", str(labels), "--out", str(tmp_path / "out")]) == 0
    d = _embedded_data((tmp_path / "out" / "circuit.html").read_text())
    assert ["resid_0", 0, "first <i>feature</i>"] in d["labels"]
    assert d["groups"] == [{"name": "g", "nodes": ["resid_0/0", "embed/err"]}]
    labels.write_text('{"group": "g", "nodes": ["resid_0/999999"]}\n')
    capsys.readouterr()
    assert cli.main([*argv, "--labels", str(labels), "--out", str(tmp_path / "out2")]) == 2
    assert f"{labels}:1: nodes[0]: feature 999999 is out of range for site resid_0" in capsys.readouterr().err
