"""The circuit page: self-contained, renders in headless Chromium without JavaScript errors, shows the
expected number of nodes, and shows a hostile label as text instead of running it."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from feature_circuits.circuit import Node
from feature_circuits.render import (
    LabelsError,
    load_labels,
    neuronpedia_url,
    render_circuit_html,
    slider_thresholds,
)
from tests.helpers import small_circuit

BAD = (
    "<script>document.body.setAttribute('data-pwned','1')</script>"
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"
)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium not installed (run tests/setup_chromium.sh); in CI this test always runs",
)


def dump_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    assert CHROMIUM is not None, "chromium is required in CI: run tests/setup_chromium.sh"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        page.resolve().as_uri() + fragment,
    ]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def status(dom: str) -> dict[str, str]:
    m = re.search(r'<div id="fc-status"([^>]*)>', dom)
    assert m, "no #fc-status in the rendered page"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


def errors(dom: str) -> list[str]:
    return re.findall(r'<div class="fc-error">(.*?)</div>', dom)


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_page_renders_without_errors(tmp_path, aggregation):
    c = small_circuit(aggregation)
    page = render_circuit_html(c, tmp_path / "circuit.html")
    dom = dump_dom(page, tmp_path)
    assert errors(dom) == []
    st = status(dom)
    assert st["data-done"] == "1"
    assert int(st["data-rendered-points"]) == len(c.nodes) + 1  # + the logit sink
    assert int(st["data-expected-nodes"]) == len(c.nodes) + 1


@pytest.mark.browser
@needs_chromium
def test_hostile_label_is_text(tmp_path):
    c = small_circuit("none")
    page = render_circuit_html(c, tmp_path / "circuit.html", labels={("resid_0", 1): BAD})
    dom = dump_dom(page, tmp_path, "#fc-hover")
    assert errors(dom) == []
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None and "data-pwned" not in body.group(0)
    # the table cell shows the label as text
    assert f'<td class="fc-label">{html.escape(BAD, quote=False)}</td>' in dom
    # hovering every marker shows the label as text in the hover box
    found = re.findall(r'<pre id="fc-hovertexts">(.*?)</pre>', dom, re.DOTALL)  # the last one is the element
    assert found and not found[-1].lstrip().startswith("//"), "hover test hook did not run"
    hover = html.unescape(found[-1])
    assert "label: " + BAD in hover
    assert hover.count("\n") == len(c.nodes)  # one line per node marker + logit


@pytest.mark.browser
@needs_chromium
def test_error_reporting_works(tmp_path):
    """The page's error hook itself: a page with a broken script reports it in #fc-errors."""
    c = small_circuit("sum")
    page = render_circuit_html(c, tmp_path / "circuit.html")
    text = page.read_text().replace("</body>", "<script>this is not javascript</script></body>")
    page.write_text(text)
    assert errors(dump_dom(page, tmp_path))


def test_page_is_self_contained_and_escaped(tmp_path):
    c = small_circuit("none")
    page = render_circuit_html(c, tmp_path / "c.html", labels={("resid_0", 1): BAD})
    text = page.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", text)  # no external scripts (plotly.js inlined)
    assert not re.search(r"<link[^>]*\shref=", text)
    assert "tiny <b>" not in text and "tiny &lt;b&gt;model" in text  # model name escaped everywhere
    assert BAD not in text
    assert len(text) > 1_000_000  # plotly.js inlined


def test_labels_file(tmp_path):
    p = tmp_path / "labels.jsonl"
    p.write_text(
        '{"site": "resid_0", "feature": 1, "label": "plural"}\n\n{"site": "resid_0", "feature": null, '
        '"label": "err"}\n'
    )
    assert load_labels(p) == {("resid_0", 1): "plural", ("resid_0", None): "err"}
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


def test_neuronpedia_links(tmp_path):
    base = small_circuit("sum")
    c = base.replace(saes="marks", model="EleutherAI/pythia-70m-deduped")
    node = Node.feature_node("resid_3", 123, effect=1.0)
    assert neuronpedia_url(c, node) == "https://www.neuronpedia.org/pythia-70m-deduped/3-res-sm/123"
    attn = Node.feature_node("attn_0", 7, effect=1.0)
    assert neuronpedia_url(c, attn) == "https://www.neuronpedia.org/pythia-70m-deduped/0-att-sm/7"
    assert neuronpedia_url(c, Node.feature_node("mlp_1", 2, effect=1.0)) == (
        "https://www.neuronpedia.org/pythia-70m-deduped/1-mlp-sm/2"
    )
    assert neuronpedia_url(c, Node.error_node("resid_3", effect=1.0)) is None
    assert neuronpedia_url(c, Node.feature_node("embed", 5, effect=1.0)) is None  # no layer-indexed page
    assert neuronpedia_url(base, node) is None  # embedded SAEs: no link
    text = render_circuit_html(c, tmp_path / "c.html").read_text()
    assert 'href="https://www.neuronpedia.org/pythia-70m-deduped/' in text


def test_page_shows_enum_values(tmp_path):
    text = render_circuit_html(small_circuit("none"), tmp_path / "c.html").read_text()
    assert "<b>method</b>: relp" in text and "<b>aggregation</b>: none" in text
    assert "<b>metric</b>: logit_diff" in text and "relp circuit: tiny" in text
    assert not any(e in text for e in ("Method.RELP", "Aggregation.NONE", "MetricName.LOGIT_DIFF"))


def test_slider_thresholds():
    c = small_circuit("sum", node_threshold=0.5)
    t = slider_thresholds(c)
    assert t[0] == 0.5 and t == sorted(t) and t[-1] < 1.5
    assert slider_thresholds(small_circuit("sum", node_threshold=2.0)) == [2.0]
