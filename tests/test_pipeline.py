"""Discovery end to end: on a tiny random GPT-NeoX with random SAEs (always), and on the embedded
default model and SAEs (relp and ig): valid circuit.json, non-empty graph, deterministic per seed,
one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feature_circuits.circuit.graph import LOGIT_ID, load_circuit, load_effects, validate_circuit_dict
from feature_circuits.pipeline import DiscoverConfig, discover, main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "discover.py"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    rows = [
        {
            "clean_prefix": f"the w{i} and w{i + 1}",
            "patch_prefix": f"the w{i + 2} and w{i + 1}",
            "clean_answer": " is",
            "patch_answer": " are",
        }
        for i in range(8)
    ]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _graph(circuit):
    return (
        [(n.id, round(n.effect, 6)) for n in circuit.nodes],
        [(e.source, e.target, round(e.weight, 6)) for e in circuit.edges],
    )


@pytest.mark.parametrize("method", ["relp", "ig", "atp"])
def test_discover_tiny(tmp_path, neox_dir, neox_saes, tiny_data, method):
    def run(out: str):
        return discover(
            DiscoverConfig(
                method=method,
                model=str(neox_dir),
                saes=str(neox_saes),
                dataset=str(tiny_data),
                num_examples=8,
                batch_size=3,
                node_threshold=1e-4,
                edge_threshold=1e-6,
                seed=1,
                progress=False,
                steps=3,
                out=str(tmp_path / out),
            )
        )

    c1, c2 = run("a"), run("b")
    assert c1.nodes and c1.edges
    assert _graph(c1) == _graph(c2)
    d = json.loads((tmp_path / "a" / "circuit.json").read_text())
    validate_circuit_dict(d)
    assert d["num_examples"] == 8 and d["method"] == method
    assert load_circuit(tmp_path / "a" / "circuit.json").nodes == c1.nodes
    assert (tmp_path / "a" / "circuit.html").stat().st_size > 1_000_000
    # the dense effects of every node, beside circuit.json; the kept nodes are those above the threshold
    assert d["effects_file"] == "effects.safetensors" and c1.effects_file == "effects.safetensors"
    eff = load_effects(tmp_path / "a" / "effects.safetensors", "sum")
    kept = {(n.site, n.feature): n.effect for n in c1.nodes}
    dense = {}
    for site, t in eff.items():
        assert t.dim() == 1 and t.dtype == torch.float32
        for i in torch.nonzero(t.abs() > 1e-4).flatten().tolist():
            dense[(site, None if i == t.shape[0] - 1 else i)] = float(t[i])
    assert dense == kept


def test_discover_tiny_none_and_nodes_only(tmp_path, neox_dir, neox_saes, tiny_data):
    c = discover(
        DiscoverConfig(
            method="atp",
            model=str(neox_dir),
            saes=str(neox_saes),
            dataset=str(tiny_data),
            num_examples=4,
            aggregation="none",
            nodes_only=True,
            node_threshold=1e-4,
            progress=False,
            out=str(tmp_path),
        )
    )
    assert c.tokens == ("the", "w0", "and", "w1")
    eff = load_effects(tmp_path / "effects.safetensors", "none")
    assert all(t.shape[0] == 4 for t in eff.values())  # (s, F+1): positions kept
    assert c.nodes and all(n.position is not None for n in c.nodes)
    assert all(e.target == LOGIT_ID for e in c.edges)  # nodes only: just the logit sink's edges


def test_cli_user_errors(tmp_path, neox_dir, neox_saes, tiny_data, capsys):
    base = ["--quiet", "--out", str(tmp_path)]
    cases = [
        (["--model", str(tmp_path / "nope")], "model directory"),
        (["--model", str(neox_dir), "--saes", str(tmp_path / "nosaes")], "SAE root"),
        (["--model", str(neox_dir), "--saes", str(neox_saes), "--dataset", "no_such_set"], "unknown dataset"),
        (
            ["--model", str(neox_dir), "--saes", str(neox_saes), "--dataset", str(tmp_path / "x.jsonl")],
            "not found",
        ),
        (["--labels", str(tmp_path / "nolabels.jsonl")], "labels file not found"),
        (["--num-examples", "0"], "--num-examples"),
        (["--node-threshold", "nan"], "--node-threshold must be a finite number"),
        (["--edge-threshold", "-1"], "--edge-threshold must be a finite number"),
    ]
    for args, msg in cases:
        assert main(base + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: ") and msg in err[-1], err
        assert not any("Traceback" in line for line in err)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean_prefix": "the w1"}\n')
    assert main(base + ["--model", str(neox_dir), "--saes", str(neox_saes), "--dataset", str(bad)]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--method", "magic"])
    assert info.value.code == 2


def test_script_help():
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False, timeout=120
    )
    assert res.returncode == 0
    for opt in (
        "--method",
        "--model",
        "--saes",
        "--dataset",
        "--split",
        "--num-examples",
        "--batch-size",
        "--node-threshold",
        "--edge-threshold",
        "--aggregation",
        "--nodes-only",
        "--seed",
        "--device",
        "--dtype",
        "--labels",
        "--out",
    ):
        assert opt in res.stdout


@pytest.mark.parametrize("method", ["relp", "ig"])
def test_discover_embedded_cli(tmp_path, method):
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        res = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--method",
                method,
                "--num-examples",
                "8",
                "--seed",
                "0",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "total effect" in res.stdout
        outs.append(out)
    c = load_circuit(outs[0] / "circuit.json")  # validates against the schema
    assert c.model == "embedded" and c.saes == "embedded" and c.dataset == "sva_rc" and c.num_examples == 8
    assert c.nodes, "empty circuit"
    assert any(e.target != LOGIT_ID for e in c.edges), "no edges besides the logit sink's"
    d1 = json.loads((outs[0] / "circuit.json").read_text())
    d2 = json.loads((outs[1] / "circuit.json").read_text())
    assert d1["nodes"] == d2["nodes"] and d1["edges"] == d2["edges"]
    assert (outs[0] / "circuit.html").is_file()
