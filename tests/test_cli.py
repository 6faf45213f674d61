"""The command line (feature_circuits.cli): help lists every subcommand and imports no torch, parsers
generated from the configs, one-line errors with exit status 2, discover and evaluate end to end
(in-process), the other subcommands' dispatch, and one subprocess smoke test of the embedded default."""

from __future__ import annotations

import dataclasses
import json
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feature_circuits import cli
from feature_circuits.circuit import LOGIT_ID, load_circuit, save_effects
from feature_circuits.errors import ConfigError
from feature_circuits.evaluation import VARIANTS
from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig
from feature_circuits.types import ERROR_TOKEN, Site

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("discover", "evaluate", "render", "compare", "bench", "download-saes", "train-toy")


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of a failed command: the last stderr line, the only one starting ``error: ``
    (progress bars of the model loader may come before it), no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in err) == 1 and not any("Traceback" in x for x in err)
    return err[-1]


# ---------------------------------------------------------------------------------- help, parsers


def test_help_lists_subcommands_without_measured_numbers(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    for command, config in (("discover", DiscoverConfig), ("evaluate", EvaluateConfig)):
        assert cli.main([command, "--help"]) == 0
        text = capsys.readouterr().out
        for f in dataclasses.fields(config):
            assert str(f.metadata.get("flag", "--" + f.name.replace("_", "-"))) in text.replace("--no-", "--")
        assert "~" not in text and " s on " not in text  # measurements live in docs/methods.md


@pytest.mark.slow
def test_help_imports_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "import feature_circuits as fc\n"
        "dir(fc); fc.Method; fc.DiscoverConfig\n"
        "from feature_circuits.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(['--help']), main(['discover', '--help']), main(['evaluate', '--help'])]\n"
        "assert codes == [0, 0, 0], codes\n"
        "heavy = {'torch', 'transformers', 'nnsight', 'dictionary_learning'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr


def test_parser_generated_from_config():
    parser = cli.build_parser()
    ns = parser.parse_args(["discover"])
    assert cli.config_from_args(DiscoverConfig, ns) == DiscoverConfig()  # defaults: the dataclass's
    ns = parser.parse_args(
        shlex.split("discover --method ig --aggregation none --no-html --nodes-only --device cuda")
    )
    cfg = cli.config_from_args(DiscoverConfig, ns)
    assert (cfg.method.value, cfg.aggregation.value, cfg.html, cfg.nodes_only, cfg.device) == (
        "ig",
        "none",
        False,
        True,
        "cuda",
    )
    ns = parser.parse_args(["evaluate", "--circuit", "a", "--circuit", "b", "--thresholds", "0.1,1"])
    cfg = cli.config_from_args(EvaluateConfig, ns)
    assert cfg.circuits == ("a", "b") and cfg.thresholds == (0.1, 1.0) and cfg.variants is None


def test_bad_options_one_line_exit_2(capsys):
    cases = [
        (["discover", "--method", "magic"], "invalid choice"),
        (["discover", "--num-examples", "0"], "--num-examples must be >= 1, got 0"),
        (["discover", "--node-threshold", "nan"], "--node-threshold must be a finite number"),
        (["discover", "--edge-threshold", "-1"], "--edge-threshold must be a finite number"),
        (["discover", "--batch-size", "x"], "--batch-size"),
        (["evaluate"], "--circuit"),
        (["evaluate", "--circuit", "c.json", "--thresholds", "a,b"], "--thresholds"),
        (["evaluate", "--circuit", "c.json", "--variants", "nope"], "unknown variant"),
        (["no-such-command"], "invalid choice"),
        ([], "required"),
        (["train-toy", "nope"], "invalid choice"),
    ]
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        assert msg in _err_line(capsys), argv


def test_configs_reject_bad_values():
    for kwargs, msg in [
        ({"num_examples": 0}, "--num-examples must be >= 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"node_threshold": float("nan")}, "--node-threshold must be a finite number >= 0"),
        ({"edge_threshold": -1.0}, "--edge-threshold must be a finite number >= 0"),
        ({"method": "magic"}, "--method must be one of"),
        ({"aggregation": "mean"}, "--aggregation must be one of"),
        ({"metric": "loss"}, "--metric must be one of"),
        ({"split": "dev"}, "--split must be one of"),
        ({"dtype": "int8"}, "--dtype must be one of"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            DiscoverConfig(**kwargs)
    assert DiscoverConfig(method="exact").computes_edges is False  # pyright: ignore[reportArgumentType]
    for kwargs, msg in [
        ({"circuits": ()}, "--circuit is required"),
        ({"num_examples": 0}, "--num-examples must be >= 1"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"free_layers": -1}, "--free-layers must be >= 0"),
        ({"thresholds": (float("inf"),)}, "--thresholds must be finite numbers >= 0"),
        ({"thresholds": ()}, "--thresholds must be finite numbers >= 0"),
        ({"variants": ("all_errors_ablated", "x")}, "unknown variant"),
        ({"metric": "loss"}, "--metric must be one of"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            EvaluateConfig(**{"circuits": ("c.json",), **kwargs})
    assert EvaluateConfig(circuits="c.json").circuits == ("c.json",)  # pyright: ignore[reportArgumentType]


def test_interrupt_exit_130(monkeypatch, capsys):
    def interrupted(_ns):
        raise KeyboardInterrupt

    command = dataclasses.replace(cli._CONFIG_COMMANDS["discover"], run=interrupted)
    monkeypatch.setitem(cli._CONFIG_COMMANDS, "discover", command)
    assert cli.main(["discover"]) == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_scripts_are_shims(monkeypatch, capsys):
    expected = {
        "discover.py": "feature-circuits discover",
        "evaluate.py": "feature-circuits evaluate",
        "download_saes.py": "feature-circuits download-saes",
        "make_datasets.py": "feature-circuits train-toy datasets",
    }
    for script, prog in expected.items():
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
        assert info.value.code == 0
        assert f"usage: {prog}" in capsys.readouterr().out
    assert {p.name for p in (ROOT / "scripts").glob("*.py")} >= {
        "benchmark.py",
        "compare_methods.py",
        "train_embedded_model.py",
        "train_saes.py",
        *expected,
    }


# ------------------------------------------------------------------------------- other subcommands


def test_experiment_subcommands_dispatch(capsys):
    assert cli.main(["compare", "--help"]) == 0
    assert "--task" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def test_experiment_subcommands_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """Installed without the source tree (no experiments/ on the path, in the current directory or
    beside the package): one line saying where to run it, exit 2."""
    for name in [m for m in sys.modules if m == "experiments" or m.startswith("experiments.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "experiments").is_dir()])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "feature_circuits" / "cli.py"))
    assert cli.main(["compare", "--task", "ioi"]) == 2
    assert "source checkout" in _err_line(capsys)


def test_download_saes_verify_only(tmp_path, capsys):
    assert cli.main(["download-saes", "--verify-only", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "19 dictionary file(s) missing" in err and "resid_out_layer5" in err


def test_train_toy_datasets(tmp_path, capsys):
    assert cli.main(["train-toy", "datasets", "--out", str(tmp_path), "--n-train", "3", "--n-test", "2"]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert len(written) == 10 and "sva_rc_train.jsonl" in written
    assert len((tmp_path / "ioi_test.jsonl").read_text().splitlines()) == 2
    assert cli.main(["train-toy", "--help"]) == 0
    assert "datasets" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- discover


def test_discover_user_errors(tmp_path, neox_dir, neox_saes, capsys):
    base = ["discover", "--quiet", "--out", str(tmp_path)]
    tiny = ["--model", str(neox_dir), "--saes", str(neox_saes)]
    cases = [
        (["--model", str(tmp_path / "nope")], "model directory"),
        (["--model", str(neox_dir), "--saes", str(tmp_path / "nosaes")], "SAE root"),
        ([*tiny, "--dataset", "no_such_set"], "unknown dataset"),
        ([*tiny, "--dataset", str(tmp_path / "x.jsonl")], "not found"),
        (["--labels", str(tmp_path / "nolabels.jsonl")], "labels file not found"),
    ]
    for args, msg in cases:
        assert cli.main(base + args) == 2
        assert msg in _err_line(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean_prefix": "the w1"}\n')
    assert cli.main([*base, *tiny, "--dataset", str(bad)]) == 2
    assert f"{bad}:1:" in _err_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["relp", "ig"])
def test_discover_embedded(tmp_path, method, capsys):
    """Both runs give the same circuit (fixed seed); ``--steps`` (ig only) kept small for time."""
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["discover", "--method", method, "--num-examples", "8", "--steps", "4", "--out", str(out)]
        assert cli.main([*argv, "--seed", "0", "--no-progress"]) == 0
        assert "total effect" in capsys.readouterr().out
        outs.append(out)
    c = load_circuit(outs[0] / "circuit.json")  # validates against the schema
    assert c.model == "embedded" and c.saes == "embedded" and c.dataset == "sva_rc" and c.num_examples == 8
    assert c.nodes, "empty circuit"
    assert any(e.target != LOGIT_ID for e in c.edges), "no edges besides the logit sink's"
    d1 = json.loads((outs[0] / "circuit.json").read_text())
    d2 = json.loads((outs[1] / "circuit.json").read_text())
    assert d1["nodes"] == d2["nodes"] and d1["edges"] == d2["edges"]
    assert (outs[0] / "circuit.html").is_file()


@pytest.mark.slow
def test_smoke_subprocess_embedded_default(tmp_path):
    """The one subprocess run: ``python -m feature_circuits discover`` on the embedded default."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "feature_circuits",
            "discover",
            "--num-examples",
            "16",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    c = load_circuit(tmp_path / "circuit.json")
    assert c.model == "embedded" and c.method.value == "relp" and c.nodes and c.edges
    assert (tmp_path / "circuit.html").is_file() and (tmp_path / "effects.safetensors").is_file()


# ---------------------------------------------------------------------------------------- evaluate


def _pairs(n: int) -> list[dict[str, str]]:
    """``n`` distinct, equal-length pairs for the tiny model (the first ``k`` of ``_pairs(n)`` are
    ``_pairs(k)``)."""
    out = []
    for i in range(n):
        a, b = 1 + (i % 40), 2 + (i * 7) % 45
        out.append(
            {
                "clean_prefix": f"the w{a} w{b} and w{a + 1}",
                "patch_prefix": f"a w{a} w{b + 3} and w{a + 1}",
                "clean_answer": " is",
                "patch_answer": " are",
            }
        )
    return out


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _node(site: str, feature: int | None, effect: float) -> dict[str, object]:
    kind, layer = Site.parse(site)
    return {
        "id": f"{site}/{ERROR_TOKEN if feature is None else feature}",
        "site": site,
        "kind": kind.value,
        "layer": layer,
        "position": None,
        "feature": feature,
        "is_error": feature is None,
        "effect": effect,
    }


def _circuit_file(cdir: Path, neox_dir: Path, neox_saes: Path, data: Path, **extra: object) -> dict:
    """A two-node circuit.json of the tiny model, discovered (nominally) on ``data``."""
    circ = {
        "schema_version": 1,
        "model": str(neox_dir),
        "saes": str(neox_saes / "tiny"),
        "method": "atp",
        "dataset": str(data),
        "split": "train",
        "num_examples": 6,
        "aggregation": "sum",
        "node_threshold": 0.01,
        "edge_threshold": 0.01,
        "total_effect": 0.5,
        "edges": [],
        "timing_s": {},
        "nodes": [_node("resid_1", None, 0.4), _node("mlp_1", 3, 0.02)],
        **extra,
    }
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "circuit.json").write_text(json.dumps(circ))
    return circ


@pytest.fixture
def eval_data(tmp_path) -> Path:
    """tiny_train.jsonl (discovery) and tiny_test.jsonl (disjoint from it); returns the train file."""
    _write_jsonl(tmp_path / "tiny_train.jsonl", _pairs(6))
    _write_jsonl(tmp_path / "tiny_test.jsonl", _pairs(12)[6:])
    return tmp_path / "tiny_train.jsonl"


def test_evaluate_end_to_end(neox_dir, neox_saes, eval_data, tmp_path, capsys):
    cdir = tmp_path / "circ"
    _circuit_file(cdir, neox_dir, neox_saes, eval_data)
    # own dataset + split: refused, one line, exit 2
    assert cli.main(["evaluate", "--circuit", str(cdir / "circuit.json"), "--split", "train", "--quiet"]) == 2
    assert "allow-discovery-split" in _err_line(capsys)
    assert cli.main(["evaluate", "--circuit", str(cdir / "circuit.json"), "--thresholds", "a,b"]) == 2
    assert "--thresholds" in _err_line(capsys)
    assert cli.main(["evaluate", "--circuit", str(tmp_path / "missing.json")]) == 2
    assert "not found" in _err_line(capsys)
    # default: the sibling test file
    argv = ["evaluate", "--circuit", str(cdir), "--thresholds", "0.001,0.1,1", "--quiet", "--batch-size", "6"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "m(M) =" in out and "wrote" in out
    res = json.loads((cdir / "eval.json").read_text())
    assert res["n_nodes"] == [2, 1, 0] and res["eval_dataset"].endswith("tiny_test.jsonl")
    assert res["num_examples"] == 6 and res["below_discovery_threshold"] == [True, False, False]
    assert set(res["variants"]) == set(VARIANTS)
    assert res["variants"]["all_errors_ablated"]["faithfulness"] == res["faithfulness"]
    html = (cdir / "eval.html").read_text()
    assert "<script src=" not in html and "Faithfulness" in html and len(html) > 1_000_000
    # explicitly allowed on the discovery split, into another directory
    argv = ["evaluate", "--circuit", str(cdir / "circuit.json"), "--out", str(tmp_path / "o")]
    argv += shlex.split(
        "--split train --allow-discovery-split --thresholds 0.1 --quiet --variants all_errors_ablated"
    )
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["num_examples"] == 6
    # the discovery examples under another name (a copy, or a file that contains some of them): refused
    _write_jsonl(tmp_path / "renamed.jsonl", _pairs(12)[4:])  # shares examples 4 and 5 with the train file
    capsys.readouterr()
    argv = ["evaluate", "--circuit", str(cdir), "--dataset", str(tmp_path / "renamed.jsonl"), "--quiet"]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 8 evaluation examples" in last and "allow-discovery-split" in last


def test_evaluate_over_effects_file(neox, neox_dir, neox_saes, eval_data, tmp_path, capsys):
    """A circuit.json with an effects file: the sweep covers every node (more than the stored ones at
    low thresholds, no below-discovery flag), faithfulness 1 / completeness 0 with everything kept and
    0 / 1 with nothing; without the effects file only the stored nodes; a missing or corrupt effects
    file is a one-line error naming it."""
    from feature_circuits.dictionaries import load_dictionaries

    aes = load_dictionaries(neox.sites, neox_saes / "tiny")
    gen = torch.Generator().manual_seed(0)
    # every node has a nonzero effect in (0.001, 0.5]; two stored nodes above the discovery threshold 0.6
    eff = {s.name: 0.001 + 0.499 * torch.rand(aes[s.name].dict_size + 1, generator=gen) for s in neox.sites}
    eff["resid_1"][-1], eff["mlp_1"][3] = 0.9, -0.7
    cdir = tmp_path / "circ"
    save_effects(eff, cdir / "effects.safetensors", "sum")
    circ = _circuit_file(
        cdir, neox_dir, neox_saes, eval_data, node_threshold=0.6, effects_file="effects.safetensors"
    )
    circ["nodes"] = [_node("resid_1", None, 0.9), _node("mlp_1", 3, float(torch.tensor(-0.7)))]
    (cdir / "circuit.json").write_text(json.dumps(circ))
    argv = ["evaluate", "--circuit", str(cdir)]
    argv += shlex.split("--thresholds 0,0.25,0.6,1 --quiet --batch-size 6 --variants all_errors_ablated")
    assert cli.main(argv) == 0
    assert "every node's effect" in capsys.readouterr().out
    res = json.loads((cdir / "eval.json").read_text())
    ablatable = sum(aes[s.name].dict_size + 1 for s in neox.sites if s.name != "embed")
    assert res["n_nodes"][0] == ablatable > 2  # every node (embed is free), not just the 2 stored
    assert 2 < res["n_nodes"][1] < ablatable and res["n_nodes"][2:] == [2, 0]
    assert res["below_discovery_threshold"] == [False] * 4 and res["sweep_nodes"] == "all"
    assert res["faithfulness"][0] == 1.0 and res["completeness"][0] == 0.0
    assert res["faithfulness"][-1] == 0.0 and res["completeness"][-1] == 1.0
    # without the effects file key: only the stored nodes, flagged below the discovery threshold
    (cdir / "circuit.json").write_text(json.dumps({k: v for k, v in circ.items() if k != "effects_file"}))
    assert cli.main(argv) == 0
    res = json.loads((cdir / "eval.json").read_text())
    assert res["n_nodes"] == [2, 2, 2, 0] and res["below_discovery_threshold"] == [True, True, True, False]
    capsys.readouterr()
    # missing / corrupt / mismatched effects file: exit 2, one line naming the file
    (cdir / "circuit.json").write_text(json.dumps(circ))
    for damage, msg in (
        (lambda p: p.unlink(), "not found"),
        (lambda p: p.write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda p: save_effects({**eff, "mlp_1": -eff["mlp_1"]}, p, "sum"), "from another run"),
    ):
        damage(cdir / "effects.safetensors")
        assert cli.main(argv) == 2
        line = _err_line(capsys)
        assert msg in line and str(cdir / "effects.safetensors") in line, line
