#!/usr/bin/env python
"""Screenshots of the circuit explorer for docs/, and the page's size and load time.

    python -m experiments.screenshots              # discover on the embedded default (relp), then shoot
    python -m experiments.screenshots --circuit out/circuit.json --labels labels.jsonl

Writes ``docs/explorer.png`` (the whole circuit) and ``docs/explorer-panel.png`` (the side panel of
the node with the largest |effect| at the last residual site, the answer's strongest input, open),
and prints the page's size and its load time in headless Chromium (``performance.timing``: navigation
start to the load event, and to the explorer being drawn; the median of ``--loads`` loads). Needs
Chromium, chromium-driver (tests/setup_chromium.sh) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def _wait_ready(driver, timeout: float = 60.0) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = driver.execute_script("return Object.assign({}, document.getElementById('fc-status').dataset)")
        errs = driver.execute_script("return document.getElementById('fc-errors').textContent")
        if errs:
            raise SystemExit(f"the page reported JavaScript errors: {errs}")
        if st.get("done") == "1":
            return st
        time.sleep(0.05)
    raise SystemExit("the page did not finish drawing")


_LOAD_MS = "var t = performance.timing; return t.loadEventEnd - t.navigationStart;"
_NODE_XY = (
    "var p = fcExplorer.cy.getElementById(arguments[0]).renderedPosition();"
    "var c = document.getElementById('fc-cy'); return [p.x, p.y, c.clientWidth, c.clientHeight];"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.screenshots", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument(
        "--circuit", type=Path, help="circuit.json (default: run discovery on the embedded default)"
    )
    ap.add_argument("--labels", type=Path, help="labels/groups file for the page")
    ap.add_argument("--method", default="relp", help="discovery method when no --circuit is given")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=950)
    ap.add_argument("--loads", type=int, default=5, help="page loads to time (median reported)")
    args = ap.parse_args(argv)

    from feature_circuits import cli
    from feature_circuits.circuit import load_circuit
    from feature_circuits.render import render_circuit_html

    with tempfile.TemporaryDirectory(prefix="fc-shots-") as tmp:
        if args.circuit is None:
            rc = cli.main(["discover", "--method", args.method, "--out", tmp, "--quiet"])
            if rc != 0:
                return rc
            circuit_path = Path(tmp) / "circuit.json"
        else:
            circuit_path = args.circuit / "circuit.json" if args.circuit.is_dir() else args.circuit
        circuit = load_circuit(circuit_path)
        page = render_circuit_html(circuit, Path(tmp) / "explorer.html", labels=args.labels)
        with_ctx = sum(1 for n in circuit.nodes if n.activation is not None and n.activation.contexts)
        size = page.stat().st_size
        driver = _driver(args.width, args.height)
        try:
            loads, ready, cpu = [], [], []
            for _ in range(max(args.loads, 1)):
                # main-thread CPU time of the load (less sensitive to a busy machine than wall time)
                driver.execute_cdp_cmd("Performance.disable", {})
                driver.execute_cdp_cmd("Performance.enable", {"timeDomain": "threadTicks"})
                driver.get(page.resolve().as_uri())
                st = _wait_ready(driver)
                load = 0
                while load <= 0:  # the load event may end just after the explorer is drawn
                    load = driver.execute_script(_LOAD_MS)
                    time.sleep(0.02)
                time.sleep(0.5)  # the first frames drawn after the load
                metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
                cpu.append(round(1000 * next(m["value"] for m in metrics if m["name"] == "ThreadTime")))
                loads.append(load)
                ready.append(int(st["readyMs"]))
            args.out_dir.mkdir(parents=True, exist_ok=True)
            time.sleep(0.3)
            full = args.out_dir / "explorer.png"
            driver.save_screenshot(str(full))
            last = f"resid_{circuit.num_layers - 1}"
            cands = [n for n in circuit.nodes if n.site == last and not n.is_error] or list(circuit.nodes)
            if cands:
                node = max(cands, key=lambda n: abs(n.effect))
                from selenium.webdriver.common.action_chains import ActionChains
                from selenium.webdriver.common.by import By

                box = driver.find_element(By.ID, "fc-cy")
                x, y, w, h = driver.execute_script(_NODE_XY, node.id)
                ActionChains(driver).move_to_element_with_offset(
                    box, round(x - w / 2), round(y - h / 2)
                ).click().perform()
                time.sleep(0.4)
                panel = args.out_dir / "explorer-panel.png"
                driver.save_screenshot(str(panel))
                print(f"wrote {full} and {panel} (panel of {node.id})")
        finally:
            driver.quit()
    med = statistics.median
    print(f"circuit: {len(circuit.nodes)} nodes, {len(circuit.edges)} edges, {with_ctx} nodes with contexts")
    print(f"page size: {size / 1024:.0f} KiB ({size} bytes)")
    print(f"load time (navigation start -> load event), median of {len(loads)}: {med(loads):.0f} ms {loads}")
    print(f"explorer drawn (navigation start -> graph ready), median: {med(ready):.0f} ms {ready}")
    print(f"main-thread CPU time of a load (first frames included), median: {med(cpu):.0f} ms {cpu}")
    print(f"load average while measuring: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
