"""The embedded default as package data: one copy of each file, regenerated exactly by the toy code,
and the training scripts writing to the package directories by default."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from feature_circuits import toy
from feature_circuits.toy import datasets, train_model, train_saes

REPO = Path(__file__).resolve().parents[2]


def test_paths_are_package_resources():
    root = Path(str(files("feature_circuits.toy")))
    assert root.resolve() == Path(toy.__file__).resolve().parent
    for path in (toy.MODEL_DIR, toy.SAE_ROOT / toy.MODEL_NAME, toy.DATA_DIR):
        assert path.is_dir() and path.resolve().is_relative_to(root.resolve())
    assert (toy.MODEL_DIR / "model.safetensors").is_file()
    assert toy.METRICS_PATH.is_file() and {"model", "saes"} <= set(json.loads(toy.METRICS_PATH.read_text()))


def test_shipped_datasets_are_what_the_grammar_generates():
    built = datasets.build_datasets()
    shipped = {p.stem: p for p in toy.DATA_DIR.glob("*.jsonl")}
    assert set(shipped) == set(built)
    for name, rows in built.items():
        assert [json.loads(line) for line in shipped[name].read_text().splitlines()] == rows, name


def test_write_datasets_round_trip(tmp_path):
    paths = datasets.write_datasets(tmp_path, n_train=3, n_test=2)
    assert {p.stem for p in paths} == set(datasets.build_datasets(n_train=3, n_test=2))
    assert all(len(p.read_text().splitlines()) in (2, 3) for p in paths)


def test_training_defaults_write_to_the_package():
    model_args = train_model.build_parser().parse_args([])
    assert model_args.out == toy.MODEL_DIR and model_args.metrics is None
    assert model_args.out.parent / "metrics.json" == toy.METRICS_PATH
    sae_args = train_saes.build_parser().parse_args([])
    assert sae_args.model == toy.MODEL_DIR and sae_args.out == toy.SAE_ROOT
    assert sae_args.model_name == toy.MODEL_NAME


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs a source checkout")
def test_top_level_links_point_into_the_package():
    """data/ and saes/embedded/ are links to the package data (one source of truth, no copies)."""
    for link, target in ((REPO / "data", toy.DATA_DIR), (REPO / "saes" / "embedded", toy.SAE_ROOT)):
        assert link.is_symlink(), f"{link} should be a link to {target}"
        assert link.resolve() == target.resolve()
