"""The explorer page in headless Chromium, used the way a person uses it (selenium; one browser for
the module): load it, move both sliders, click a node and read its panel, follow an edge, hover,
search, trace from the answer, select nodes and group them, edit a label, download the
labels/groups file and read it back with ``load_labels``, compare two circuits. Every test also
checks that the page raised no JavaScript error and made no network request."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from feature_circuits.render import (
    edge_thresholds,
    load_labels,
    render_circuit_html,
    render_compare_html,
    slider_thresholds,
)
from feature_circuits.render.page import SLIDER_STEPS
from tests.render_helpers import rich_circuit, traced_nodes, visible_counts

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
DRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:  # pragma: no cover - the dev extra has it
    HAVE_SELENIUM = False
if not (CHROMIUM and DRIVER and HAVE_SELENIUM) and not os.environ.get("CI"):
    pytest.skip(
        "chromium, chromium-driver or selenium missing (tests/setup_chromium.sh, the dev extra); "
        "in CI these tests always run",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, TimeoutException  # noqa: E402
from selenium.webdriver import Chrome as WebDriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads) -> Iterator[WebDriver]:
    assert CHROMIUM and DRIVER, "chromium and chromium-driver are required in CI: run tests/setup_chromium.sh"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(DRIVER))  # no driver download (Selenium Manager)
    drv.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield drv
    finally:
        drv.quit()


# ---------------------------------------------------------------------------------------- helpers


def open_page(driver: WebDriver, page: Path) -> None:
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get_log("performance")
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: status(d).get("done") == "1" or errors(d))
    assert errors(driver) == []


def status(driver: WebDriver) -> dict[str, str]:
    return driver.execute_script(
        "var s = document.getElementById('fc-status'); return s ? Object.assign({}, s.dataset) : {};"
    )


def errors(driver: WebDriver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#fc-errors .fc-error')).map(e => e.textContent);"
    )


def check_clean(driver: WebDriver, page: Path) -> None:
    """No JavaScript error (page hook and console) and no request but the page itself."""
    assert errors(driver) == []
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    assert all(u == page.resolve().as_uri() or u.startswith("blob:") for u in urls), urls


def node_offset(driver: WebDriver, node_id: str) -> tuple[int, int]:
    """Where node ``node_id`` is drawn, relative to the centre of the graph's container."""
    x, y, w, h = driver.execute_script(
        "var n = fcExplorer.cy.getElementById(arguments[0]); var p = n.renderedPosition();"
        "var c = document.getElementById('fc-cy'); return [p.x, p.y, c.clientWidth, c.clientHeight];",
        node_id,
    )
    return round(x - w / 2), round(y - h / 2)


def click_node(driver: WebDriver, node_id: str, shift: bool = False) -> None:
    box = driver.find_element(By.ID, "fc-cy")
    dx, dy = node_offset(driver, node_id)
    chain = ActionChains(driver)
    if shift:
        chain.key_down(Keys.SHIFT)
    chain.move_to_element_with_offset(box, dx, dy).pause(0.05).click()
    if shift:
        chain.key_up(Keys.SHIFT)
    chain.perform()


def set_slider(driver: WebDriver, slider_id: str, step: int) -> None:
    """Move a slider like a person with the keyboard: click it, Home, then Right ``step`` times."""
    el = driver.find_element(By.ID, slider_id)
    el.click()
    el.send_keys(Keys.HOME, *([Keys.ARROW_RIGHT] * step))
    assert el.get_attribute("value") == str(step)


def text(driver: WebDriver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


@pytest.fixture(scope="module")
def circuit():
    return rich_circuit()


@pytest.fixture(scope="module")
def page(circuit, tmp_path_factory) -> Path:
    labels = {("resid_1", 3): "plural subject", ("mlp_0", 13): HOSTILE}
    return render_circuit_html(circuit, tmp_path_factory.mktemp("page") / "circuit.html", labels=labels)


# ------------------------------------------------------------------------------------------ tests


def test_loads_with_everything_shown(driver, page, circuit):
    open_page(driver, page)
    st = status(driver)
    assert int(st["visibleNodes"]) == len(circuit.nodes)
    assert int(st["visibleEdges"]) == len(circuit.edges)
    assert driver.execute_script("return fcExplorer.cy.nodes('.fc:visible').length") == len(circuit.nodes)
    assert driver.execute_script("return fcExplorer.cy.edges(':visible').length") == len(circuit.edges)
    assert "all: 35 nodes" in text(driver, "#fc-node-slider-value")
    check_clean(driver, page)


def test_both_sliders_change_what_is_shown(driver, page, circuit):
    open_page(driver, page)
    node_t = slider_thresholds(circuit, SLIDER_STEPS)
    edge_t = edge_thresholds(circuit, SLIDER_STEPS)
    seen = set()
    for step in (3, 10, len(node_t) - 1):
        set_slider(driver, "fc-node-slider", step)
        st = status(driver)
        want = visible_counts(circuit, node_t[step], None)
        assert (int(st["visibleNodes"]), int(st["visibleEdges"])) == want
        assert f"{want[0]} nodes" in text(driver, "#fc-node-slider-value")
        seen.add(want)
    assert len(seen) == 3  # each step showed a different part of the circuit
    set_slider(driver, "fc-node-slider", 0)
    for step in (5, 15):
        set_slider(driver, "fc-edge-slider", step)
        st = status(driver)
        want = visible_counts(circuit, None, edge_t[step])
        assert (int(st["visibleNodes"]), int(st["visibleEdges"])) == want
        assert want[1] < len(circuit.edges)
        assert driver.execute_script("return fcExplorer.cy.edges(':visible').length") == want[1]
    check_clean(driver, page)


def test_click_a_node_and_read_its_panel(driver, page, circuit):
    open_page(driver, page)
    node = next(n for n in circuit.nodes if n.id == "resid_1/3")
    click_node(driver, node.id)
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"] == node.id)
    assert text(driver, "#fc-panel-title") == "plural subject"
    table = text(driver, "#fc-panel-table")
    assert "resid_1 (resid, layer 1)" in table and "feature 3" in table
    assert f"{node.effect:+.3g}" in table
    assert node.activation is not None
    assert f"{node.activation.mean_clean:+.3g}" in table
    ctx = driver.find_elements(By.CSS_SELECTOR, "#fc-contexts .fc-ctx")
    assert len(ctx) == len(node.activation.contexts)
    first = node.activation.contexts[0]
    assert ctx[0].find_element(By.TAG_NAME, "mark").text == first.tokens[first.index]
    assert f"{first.activation:+.3g}" in ctx[0].text
    # the strongest incoming edge is listed first; clicking it opens its source
    inc = sorted((e for e in circuit.edges if e.target == node.id), key=lambda e: -abs(e.weight))
    buttons = driver.find_elements(By.CSS_SELECTOR, "#fc-in-edges button.fc-jump")
    assert len(buttons) == min(len(inc), 10)
    assert buttons[0].get_attribute("data-node") == inc[0].source
    assert f"{inc[0].weight:+.3g}" in buttons[0].text
    out = driver.find_elements(By.CSS_SELECTOR, "#fc-out-edges button.fc-jump")
    assert [b.get_attribute("data-node") for b in out] == ["logit"]
    buttons[0].click()
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"] == inc[0].source)
    assert inc[0].source in text(driver, "#fc-panel-table")
    check_clean(driver, page)


def test_hover_highlights_neighbours(driver, page, circuit):
    open_page(driver, page)
    node_id = "mlp_0/3"
    box = driver.find_element(By.ID, "fc-cy")
    dx, dy = node_offset(driver, node_id)
    ActionChains(driver).move_to_element_with_offset(box, dx, dy).perform()
    WebDriverWait(driver, 10).until(lambda d: status(d).get("hover") == node_id)
    nbrs = {e.source for e in circuit.edges if e.target == node_id} | {
        e.target for e in circuit.edges if e.source == node_id
    }
    assert int(status(driver)["highlighted"]) == len(nbrs) + 1
    faded = driver.execute_script("return fcExplorer.cy.nodes('.fc.faded').length")
    assert faded == len(circuit.nodes) - len(nbrs) - 1
    ActionChains(driver).move_to_element_with_offset(box, -box.rect["width"] // 2 + 5, 0).perform()
    WebDriverWait(driver, 10).until(lambda d: status(d).get("hover") == "")
    check_clean(driver, page)


def test_search_finds_labels_and_ids(driver, page):
    open_page(driver, page)
    box = driver.find_element(By.ID, "fc-search")
    box.send_keys("plural")
    assert status(driver)["searchMatches"] == "1"
    hits = driver.find_elements(By.CSS_SELECTOR, "#fc-search-results button")
    assert [h.get_attribute("data-node") for h in hits] == ["resid_1/3"]
    box.clear()
    box.send_keys("attn_1/")
    assert status(driver)["searchMatches"] == "5"
    box.send_keys(Keys.ENTER)  # jumps to the first hit
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"].startswith("attn_1/"))
    check_clean(driver, page)


def _visible_once(driver: WebDriver, want: set[str]) -> set[str]:
    """The visible node ids once they equal ``want`` (the page applies a trace asynchronously), or
    as they are after 10 s."""
    script = "return fcExplorer.cy.nodes('.fc:visible').map(n => n.id())"
    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, 10).until(lambda d: set(d.execute_script(script)) == want)
    return set(driver.execute_script(script))


def test_trace_from_the_answer(driver, page, circuit):
    open_page(driver, page)
    driver.find_element(By.ID, "fc-trace").click()
    want = traced_nodes(circuit, 2)
    shown = _visible_once(driver, want)
    assert shown == want and 0 < len(want) < len(circuit.nodes)
    k = driver.find_element(By.ID, "fc-trace-k")
    k.clear()
    k.send_keys("1", Keys.TAB)
    shown1 = _visible_once(driver, traced_nodes(circuit, 1))
    assert shown1 == traced_nodes(circuit, 1) and shown1 < want
    driver.find_element(By.ID, "fc-trace").click()
    assert int(status(driver)["visibleNodes"]) == len(circuit.nodes)
    check_clean(driver, page)


def test_group_label_and_download(driver, page, downloads, circuit):
    open_page(driver, page)
    for f in downloads.glob("*"):
        f.unlink()
    members = ["attn_0/3", "mlp_0/13", "resid_0/23"]
    click_node(driver, members[0])
    for m in members[1:]:
        click_node(driver, m, shift=True)
    WebDriverWait(driver, 10).until(lambda d: status(d)["selected"] == "3")
    driver.find_element(By.ID, "fc-group-name").send_keys("early <b>number</b>")
    driver.find_element(By.ID, "fc-group-make").click()
    names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#fc-groups .fc-group-name")]
    assert names == ["early <b>number</b>"]
    # collapse it into one supernode, then expand it again
    driver.find_element(By.CSS_SELECTOR, "#fc-groups .fc-group-collapse").click()
    assert status(driver)["supernodes"] == "1"
    assert int(status(driver)["visibleNodes"]) == len(circuit.nodes)  # counts stay those of the circuit
    assert driver.execute_script("return fcExplorer.cy.nodes('.fc:visible').length") == len(circuit.nodes) - 3
    driver.find_element(By.CSS_SELECTOR, "#fc-groups .fc-group-collapse").click()
    assert status(driver)["supernodes"] == "0"
    # label a node in its panel
    click_node(driver, "embed/3")
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"] == "embed/3")
    inp = driver.find_element(By.ID, "fc-label-input")
    inp.send_keys("the subject noun", Keys.ENTER)
    assert text(driver, "#fc-panel-title") == "the subject noun"
    driver.find_element(By.ID, "fc-download").click()
    target = downloads / "labels.jsonl"
    deadline = time.time() + 15
    while not target.is_file() and time.time() < deadline:
        time.sleep(0.1)
    assert target.is_file(), list(downloads.iterdir())
    sizes = {s: 100 for s in ("embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1")}
    back = load_labels(target, sizes)
    assert back[("embed", 3)] == "the subject noun"
    assert back[("resid_1", 3)] == "plural subject" and back[("mlp_0", 13)] == HOSTILE
    assert [(g.name, set(g.nodes)) for g in back.groups] == [("early <b>number</b>", set(members))]
    # the file renders again with its group
    again = render_circuit_html(circuit, downloads / "again.html", labels=target)
    open_page(driver, again)
    assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#fc-groups .fc-group-name")] == [
        "early <b>number</b>"
    ]
    check_clean(driver, again)


def test_hostile_label_is_text(driver, page):
    open_page(driver, page)
    box = driver.find_element(By.ID, "fc-search")
    box.send_keys("alert")
    hits = driver.find_elements(By.CSS_SELECTOR, "#fc-search-results button")
    assert len(hits) == 1 and HOSTILE in hits[0].text
    hits[0].click()
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"] == "mlp_0/13")
    assert text(driver, "#fc-panel-title") == HOSTILE
    assert (
        driver.execute_script("return document.querySelectorAll('#fc-app script, #fc-app img').length") == 0
    )
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    assert driver.execute_script("return fcExplorer.cy.getElementById('mlp_0/13').data('label')").startswith(
        "<script>"
    )
    check_clean(driver, page)


def test_aggregation_none_has_token_columns(driver, tmp_path):
    c = rich_circuit(aggregation="none")
    page = render_circuit_html(c, tmp_path / "none.html")
    open_page(driver, page)
    assert int(status(driver)["visibleNodes"]) == len(c.nodes)
    cols = driver.execute_script("return fcExplorer.cy.nodes('.collabel').map(n => n.data('label'))")
    assert cols == ["'The'", "' keys'"]
    # position-0 nodes lie left of position-1 nodes
    xs = driver.execute_script(
        "var o = {}; fcExplorer.cy.nodes('.fc').forEach(n => { o[n.id()] = n.position('x'); }); return o;"
    )
    left = max(x for i, x in xs.items() if "@0/" in i)
    right = min(x for i, x in xs.items() if "@1/" in i)
    assert left < right
    check_clean(driver, page)


def test_compare_marks_shared_and_missing(driver, tmp_path):
    a = rich_circuit()
    b = rich_circuit(drop=frozenset({"mlp_0/3", "attn_1/13"}))
    b = b.replace(nodes=tuple(n.model_copy(update={"effect": n.effect * 2}) for n in b.nodes))
    a = a.replace(
        nodes=tuple(n for n in a.nodes if n.id != "resid_0/3"),
        edges=tuple(e for e in a.edges if "resid_0/3" not in (e.source, e.target)),
    )
    page = render_compare_html(a, b, tmp_path / "compare.html", names=("relp", "ig"))
    open_page(driver, page)
    cls: dict[str, Any] = driver.execute_script(
        "var o = {}; fcExplorer.cy.nodes('.fc').forEach(n => { o[n.id()] = n.classes(); }); return o;"
    )
    assert "only-a" in cls["mlp_0/3"] and "only-a" in cls["attn_1/13"]
    assert "only-b" in cls["resid_0/3"]
    assert not any(k in cls["embed/3"] for k in ("only-a", "only-b"))
    click_node(driver, "mlp_0/3")
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"] == "mlp_0/3")
    assert "only A (relp)" in text(driver, "#fc-panel-table")
    click_node(driver, "embed/3")
    WebDriverWait(driver, 10).until(lambda d: status(d)["panel"] == "embed/3")
    t = text(driver, "#fc-panel-table")
    eff = next(n.effect for n in a.nodes if n.id == "embed/3")
    assert "both circuits" in t and f"{eff:+.3g}" in t and f"{2 * eff:+.3g}" in t
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "fc-show")).select_by_value("b")
    assert set(driver.execute_script("return fcExplorer.cy.nodes('.fc:visible').map(n => n.id())")) == {
        "resid_0/3"
    }
    check_clean(driver, page)


def test_error_hook_reports_errors(driver, tmp_path):
    """The page's error hook itself: a page with a broken script reports it in #fc-errors."""
    page = render_circuit_html(rich_circuit(), tmp_path / "broken.html")
    page.write_text(page.read_text().replace("</body>", "<script>this is not javascript</script></body>"))
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: errors(d))
    assert any("SyntaxError" in e for e in errors(driver))
    driver.get_log("browser")


def test_empty_circuit_says_so(driver, tmp_path):
    from tests.helpers import small_circuit

    c = small_circuit("sum", node_threshold=100.0)
    page = render_circuit_html(c, tmp_path / "empty.html")
    open_page(driver, page)
    assert text(driver, "#fc-empty").startswith("no node above threshold 100")
    assert status(driver)["visibleNodes"] == "0"
    check_clean(driver, page)
