"""Benchmark (experiments.benchmark) in quick mode on tiny Pythia- and Gemma-shaped configs (not the
2.5 GB ones), with the end-to-end discovery in 1 and 2 (torchrun) processes."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.benchmark import PeakMemory, floor_node_effects, random_batch, run_benchmark

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

#: a tiny Gemma 2 (the benchmark's Gemma-2-2B shape, shrunk)
TINY_GEMMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "query_pre_attn_scalar": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.mark.slow
def test_quick_benchmark_tiny(tmp_path):
    report = run_benchmark(
        tmp_path,
        quick=True,
        skip_embedded=True,
        pythia_shape=TINY,
        n_features=64,
        active=8,
        pythia_b=2,
        pythia_s=8,
        discovery_examples=6,
        gemma=True,
        gemma_shape=TINY_GEMMA,
        gemma_features=64,
        log=lambda _m: None,
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert set(data["models"]) == {"pythia-shaped-custom", "gemma-shaped-custom"}
    g = data["models"]["gemma-shaped-custom"]
    assert g["family"] == "gemma2" and g["dict_size"] == 64 and g["n_sites"] == 7, g.get("error")
    for m in data["models"].values():  # discovery end to end, 1 and 2 (torchrun) processes
        d = m["discovery"]
        assert "error" not in d, d.get("error")
        assert d["same_circuit"] and d["speedup"] > 0 and d["n_batches"] == 3
        assert d["one_process"]["num_examples"] == d["data_parallel"]["num_examples"] == 6
        assert len(d["data_parallel"]["peak_rss_mib"]) == 2 and d["one_process"]["ratio_to_floor"] > 0
    r = data["models"]["pythia-shaped-custom"]
    assert r["n_sites"] == 7 and r["dict_size"] == 64 and (r["batch_size"], r["seq_len"]) == (2, 8)
    assert r["floor"]["max_abs_diff_vs_atp"] < 1e-5  # the floor computes atp
    for part in ("nodes", "edges"):
        assert set(r[part]) == {"atp", "relp", "ig"}
        for x in r[part].values():
            assert x["median_s"] > 0 and x["peak_mem_mb"] >= 0 and x["ratio_to_floor"] > 0
    ef = r["exact_features"]  # at most 8 feature nodes per site in quick mode, resumed and full
    assert ef["max_nodes_per_site"] == 8 and ef["patches"] > r["n_sites"] and ef["max_abs_diff"] < 1e-4
    assert ef["resumed"]["forwards"] > 0 and ef["speedup"] > 0 and ef["max_abs_effect"] > 0
    loop = r["edge_loop"]
    assert loop["n_backwards_timed"] > 0 and loop["max_abs_diff"] < 1e-5  # loop and batched agree
    assert sum(r["mean_active_features_per_token"].values()) > 0
    md = (tmp_path / "bench.md").read_text()
    assert "ratio to floor" in md and "## Targets" in md and "| exact features, resumed (" in md
    assert "Data-parallel speedup of 2 processes" in md and "data-parallel discovery" in md
    ex = data["exact_components"]  # experiments/bench_exact.py, tiny in quick mode
    assert "error" not in ex, ex.get("error")
    assert ex["n_layers"] == 4 and ex["max_abs_diff"] < 1e-4 and ex["speedup"] > 0
    assert "resumed vs full re-runs" in md


def test_floor_matches_atp_llama(llama_dir, tmp_path):
    from feature_circuits.attribution import load_for_attribution, node_effects
    from tests.helpers import save_random_saes, tiny_llama

    saes = save_random_saes(tiny_llama(), tmp_path / "saes")
    loaded, dicts = load_for_attribution(llama_dir, saes, device="cpu")
    batch = random_batch(loaded.hf_model.config.vocab_size, 2, 6)
    floor = floor_node_effects(loaded, dicts, batch)
    atp = node_effects(loaded, dicts, batch, "atp")
    for k, v in floor.items():
        torch.testing.assert_close(v, atp.effects[k], atol=1e-5, rtol=1e-5)


def test_peak_memory_sees_allocation():
    with PeakMemory(torch.device("cpu"), interval_s=0.001) as pm:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        x += 1
        import time

        time.sleep(0.02)
        del x
    assert pm.peak >= 32 * 2**20


def test_tensor_peak_bytes_counts_live_tensors():
    """The CPU memory figure: the peak of live tensor bytes, not of what was ever allocated."""
    import torch

    from experiments.benchmark import tensor_peak_bytes

    def two_alive():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(2 << 20)  # 8 MiB, while a lives
        return float(a.sum() + b.sum())

    def one_at_a_time():
        for n in (1 << 20, 2 << 20):
            x = torch.ones(n)
            del x
        return 0.0

    mib = 1 << 20
    assert 12 * mib <= tensor_peak_bytes(two_alive) < 13 * mib
    assert 8 * mib <= tensor_peak_bytes(one_at_a_time) < 9 * mib
