"""The sparse-vs-dense benchmark (experiments.bench_sparse) on a tiny Pythia-shaped config: it runs
both feature paths and the floor, reports their ratios, and the two paths agree."""

from __future__ import annotations

import json

from experiments.bench_sparse import run_bench_sparse

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def test_bench_sparse_tiny(tmp_path):
    report = run_bench_sparse(
        tmp_path,
        n_features=256,
        active=8,
        batch_size=2,
        seq_len=6,
        shape=TINY,
        repeats=1,
        warmup=0,
        log=lambda _: None,
    )
    assert report["n_sites"] == 4 and report["dict_size"] == 256  # embed + attn, mlp, resid of 1 layer
    for name in ("floor", "dense", "sparse"):
        assert report[name]["median_s"] > 0 and report[name]["peak_mem_mb"] >= 0
    assert report["time_sparse_over_dense"] == report["sparse"]["median_s"] / report["dense"]["median_s"]
    # same numbers on both paths (float32), and only a few of the 256 features kept per row
    assert report["max_abs_diff_sparse_vs_dense"] <= 1e-5 * max(report["max_abs_effect"], 1e-6)
    assert 0 < report["active_per_row_mean"] < 256 / 2
    written = json.loads((tmp_path / "sparse.json").read_text())
    assert written["dense"]["median_s"] == report["dense"]["median_s"]
    assert "sparse path" in (tmp_path / "sparse.md").read_text()
