"""First-run reliability (issue 15): every input is checked before the first forward, outputs are
written atomically, the evaluation scores the circuit exactly as stored, model loading fails in one
line (and at once when the hub is offline), ``--threads`` everywhere, and an empty circuit says so.
Tiny random GPT-NeoX and SAEs (tests/conftest.py), no network."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import feature_circuits.attribution as attribution
from feature_circuits import cli
from feature_circuits.circuit import load_circuit
from feature_circuits.errors import ConfigError, ModelLoadError
from feature_circuits.model import load_model
from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig, discover, evaluate
from tests.test_pipeline import tiny_data  # noqa: F401 (the pairs file fixture, shared)


@pytest.fixture
def argv(neox_dir, neox_saes, tiny_data):  # noqa: F811 (the imported fixture)
    """Arguments of a small discovery; the caller adds --out (and whatever it tests)."""
    return [
        "discover",
        "--model",
        str(neox_dir),
        "--saes",
        str(neox_saes),
        "--dataset",
        str(tiny_data),
        "--num-examples",
        "6",
        "--batch-size",
        "3",
        "--node-threshold",
        "0.001",
        "--quiet",
    ]


@pytest.fixture
def no_forward(monkeypatch):
    """Any attribution forward fails the test."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a forward ran before the inputs were checked")

    monkeypatch.setattr(attribution, "node_effects", forbidden)


def _err_line(capsys) -> str:
    """The one error line (transformers may have drawn its weight-loading bar above it)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize(
    "labels, message",
    [
        (
            '{"site": "resid_0", "feature": 1, "label": "ok"}\n{"site": "resid_0"\n',
            "labels.jsonl:2: not valid JSON",
        ),
        ('{"site": "resid_0", "feature": 1}\n', "labels.jsonl:1: missing key(s) ['label']"),
        ('\n{"site": "resid_9", "feature": 1, "label": "x"}\n', "labels.jsonl:2: unknown site 'resid_9'"),
        (
            '{"site": "mlp_1", "feature": 100000, "label": "x"}\n',
            "labels.jsonl:1: feature 100000 is out of range",
        ),
    ],
)
def test_bad_labels_abort_before_any_forward(argv, tmp_path, capsys, no_forward, labels, message):
    (tmp_path / "labels.jsonl").write_text(labels)
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--labels", str(tmp_path / "labels.jsonl")]) == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "out" / "circuit.json").exists()


def test_unusable_output_dir_is_one_line_before_any_forward(argv, tmp_path, capsys, no_forward):
    (tmp_path / "a_file").write_text("x")
    for out, message in (
        (tmp_path / "a_file", "is a file, not a directory"),
        (tmp_path / "a_file" / "sub" / "dir", "which is a file, not a directory"),
    ):
        assert cli.main([*argv, "--out", str(out)]) == 2
        line = _err_line(capsys)
        assert line.startswith("error: --out: ") and message in line, line


def test_unwritable_output_dir(argv, tmp_path, capsys, no_forward, monkeypatch):
    """An existing directory that cannot be written (simulated: the suite may run as root)."""
    import tempfile

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert f"--out: cannot write in the output directory {tmp_path} (Permission denied)" in _err_line(capsys)


def test_evaluate_checks_its_output_dir_before_loading(tmp_path, capsys, monkeypatch):
    from feature_circuits.circuit import save_circuit
    from tests.helpers import small_circuit

    save_circuit(small_circuit(), tmp_path / "c" / "circuit.json")
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr("feature_circuits.model.load_model", lambda *a, **k: pytest.fail("model loaded"))
    argv = ["evaluate", "--circuit", str(tmp_path / "c"), "--out", str(tmp_path / "f" / "x"), "--quiet"]
    argv += ["--allow-discovery-split"]
    assert cli.main(argv) == 2
    assert "--out: " in _err_line(capsys)


def test_interrupted_write_leaves_previous_outputs(argv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"circuit.json", "effects.safetensors", "circuit.html"}
    import feature_circuits.render as render

    def killed(_circuit, path, **_kw):
        Path(path).write_text("half a page")
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "render_circuit_html", killed)
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out), "--seed", "3", "--node-threshold", "0.01"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either


def test_hand_pruned_circuit_evaluates_differently_and_warns(
    neox_dir,
    neox_saes,
    tiny_data,  # noqa: F811 (the imported fixture)
    tmp_path,
):
    cfg = DiscoverConfig(
        model=str(neox_dir),
        saes=str(neox_saes),
        dataset=str(tiny_data),
        num_examples=6,
        batch_size=3,
        node_threshold=0.001,
        progress=False,
        html=False,
        nodes_only=True,
        out=str(tmp_path / "orig"),
    )
    circuit = discover(cfg)
    last = f"resid_{circuit.num_layers - 1}"
    assert any(n.site == last for n in circuit.nodes)
    pruned_dir = tmp_path / "pruned"
    pruned_dir.mkdir()
    doc = json.loads((tmp_path / "orig" / "circuit.json").read_text())
    doc["nodes"] = [n for n in doc["nodes"] if n["site"] != last]
    doc["edges"] = [
        e for e in doc["edges"] if not e["source"].startswith(last) and not e["target"].startswith(last)
    ]
    (pruned_dir / "circuit.json").write_text(json.dumps(doc))
    (pruned_dir / "effects.safetensors").write_bytes((tmp_path / "orig" / "effects.safetensors").read_bytes())
    load_circuit(pruned_dir / "circuit.json")
    kw = {"dataset": str(tiny_data), "num_examples": 6, "batch_size": 6, "allow_discovery_split": True}
    kw |= {"thresholds": (0.001, 0.01), "variants": ("all_errors_ablated",), "progress": False}
    logged: list[str] = []
    (orig,) = evaluate(EvaluateConfig(circuits=(str(tmp_path / "orig"),), **kw))
    (pruned,) = evaluate(EvaluateConfig(circuits=(str(pruned_dir),), **kw), log=logged.append)
    assert orig.standard.stored is not None and pruned.standard.stored is not None
    assert not orig.warnings and orig.all_nodes
    assert orig.standard.stored.n_nodes == orig.n_nodes[0]  # stored at 0.001: the first sweep point
    assert pruned.standard.stored.n_nodes < orig.standard.stored.n_nodes
    assert pruned.standard.stored.faithfulness != orig.standard.stored.faithfulness
    assert pruned.faithfulness != orig.faithfulness and not pruned.all_nodes  # the sweep: stored nodes
    assert pruned.warnings and "not in circuit.json (removed by hand?)" in pruned.warnings[0]
    assert any("removed by hand" in line for line in logged)
    doc = json.loads((pruned_dir / "eval.json").read_text())
    assert list(doc)[:3] == ["version", "circuit", "warnings"] and doc["circuit"]["threshold"] == 0.001
    assert "the circuit as stored" in (pruned_dir / "eval.html").read_text()


def test_corrupt_or_incomplete_model_dirs(neox_dir, tmp_path, argv, capsys):
    bad = {}
    for name, config in (("truncated", '{"model_type": '), ("no_type", "{}"), ("array", "[1]")):
        d = tmp_path / name
        d.mkdir()
        for f in Path(neox_dir).iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(config)
        bad[name] = d
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((Path(neox_dir) / "config.json").read_text())
    cases = {
        bad["truncated"]: "config.json:1: not valid JSON",
        bad["no_type"]: "no 'model_type' (an incomplete config.json?)",
        bad["array"]: "no 'model_type'",
        tmp_path / "empty": "is empty",
        tmp_path / "no_weights": "has no weights",
    }
    for d, message in cases.items():
        with pytest.raises(
            ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
        ):
            load_model(d)
        i = argv.index("--model")
        assert cli.main([*argv[:i], "--model", str(d), *argv[i + 2 :], "--out", str(tmp_path / "o")]) == 2
        assert message in _err_line(capsys)


def test_offline_unknown_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"not in the hub cache \(HF_HUB_OFFLINE is set\)"):
        load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t < 5


def test_threads_option(argv, tmp_path, capsys):
    from feature_circuits.runtime import apply_threads, default_threads

    before = torch.get_num_threads()
    try:
        assert cli.main([*argv, "--out", str(tmp_path / "o"), "--threads", "1", "--nodes-only"]) == 0
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="--threads must be >= 1"):
            DiscoverConfig(threads=0)
        with pytest.raises(ConfigError, match="--threads must be >= 1"):
            EvaluateConfig(circuits=("c.json",), threads=0)
        assert cli.main(["download-saes", "--threads", "x", "--verify-only"]) == 2
        assert "--threads must be an integer >= 1, got 'x'" in _err_line(capsys)
        assert cli.main(["train-toy", "datasets", "--threads", "1", "--help"]) == 0
        default = default_threads()
        assert default is None or 1 <= default <= before
    finally:
        apply_threads(before)


def test_empty_circuit_says_so(argv, tmp_path, capsys):
    out = tmp_path / "o"
    argv = [a for a in argv if a != "--quiet"]
    i = argv.index("--node-threshold")
    argv[i + 1] = "1000"
    assert cli.main([*argv, "--out", str(out), "--nodes-only", "--no-progress"]) == 0
    circuit = load_circuit(out / "circuit.json")
    assert not circuit.nodes and circuit.max_abs_effect is not None and 0 < circuit.max_abs_effect < 1000
    note = f"no node above threshold 1000 (largest |effect| is {circuit.max_abs_effect:.4g})"
    assert note in capsys.readouterr().out
    assert note in circuit.summary()
    page = (out / "circuit.html").read_text()
    assert 'id="fc-empty"' in page and note.replace("|", "|") in page
