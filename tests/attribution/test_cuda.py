"""CUDA: every method gives the same node and edge effects on the GPU as on the CPU (float64), and the
discovery CLI runs end to end with ``--device cuda``. Skipped where torch sees no GPU (CI's machine);
run on a GPU machine with ``pytest tests/attribution/test_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch

from feature_circuits.attribution import edge_effects, load_for_attribution, method_spec, node_effects
from tests.helpers import patch_batch, save_model, save_random_saes, tiny_gpt_neox, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _batch(device):
    return patch_batch(device=device)


@pytest.mark.parametrize("make", [tiny_gpt_neox, tiny_llama], ids=["neox", "llama"])
@pytest.mark.parametrize("method", ["exact", "atp", "relp", "ig"])
def test_cuda_matches_cpu(make, method, tmp_path):
    d = save_model(make(), tmp_path / "m")
    saes = save_random_saes(make(), tmp_path / "s") / "tiny"
    results = {}
    for dev in ("cpu", "cuda"):
        loaded, dicts = load_for_attribution(d, saes, dev, torch.float64)
        assert loaded.device.type == dev
        modules = [ae for ae in dicts.values() if isinstance(ae, torch.nn.Module)]
        assert len(modules) == len(dicts)  # every dictionary is a module, so has parameters to check
        assert all(p.device.type == dev for ae in modules for p in ae.parameters())
        batch = _batch(loaded.device)
        nodes = node_effects(
            loaded, dicts, batch, method, options=method_spec(method).options_from({"steps": 3})
        )
        assert all(v.device.type == dev for v in nodes.effects.values())
        edges = None if method == "exact" else edge_effects(loaded, dicts, batch, nodes, node_threshold=1e-3)
        results[dev] = (nodes, edges)
    (n_cpu, e_cpu), (n_gpu, e_gpu) = results["cpu"], results["cuda"]
    # float64 throughout, except that transformers' Llama computes its rotary cos/sin in float32, whose
    # CPU and CUDA kernels differ in the last bits (measured: |diff| <= 4e-8 on effects of ~1e-2).
    rtol, atol = (1e-7, 1e-9) if make is tiny_gpt_neox else (1e-5, 1e-6)
    assert set(n_cpu.effects) == set(n_gpu.effects)
    for k in n_cpu.effects:
        torch.testing.assert_close(n_gpu.effects[k].cpu(), n_cpu.effects[k], rtol=rtol, atol=atol)
    if e_cpu is not None:
        assert set(e_cpu.edges) == set(e_gpu.edges)
        for k in e_cpu.edges:
            a, b = e_cpu.edges[k], e_gpu.edges[k].cpu()
            a, b = (a.to_dense(), b.to_dense()) if a.is_sparse else (a, b)
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
        assert any(t._nnz() for k, t in e_cpu.edges.items() if k[1] != "logit")  # the test compared something


@pytest.mark.parametrize("method", ["atp", "relp", "ig"])
def test_cuda_sparse_feature_path_matches_cpu_dense(method, tmp_path):
    d = save_model(tiny_gpt_neox(), tmp_path / "m")
    saes = save_random_saes(tiny_gpt_neox(), tmp_path / "s") / "tiny"
    options = method_spec(method).options_from({"steps": 3})
    got = {}
    for dev, path in (("cpu", "dense"), ("cuda", "sparse")):
        loaded, dicts = load_for_attribution(d, saes, dev, torch.float64)
        batch = _batch(loaded.device)
        nodes = node_effects(loaded, dicts, batch, method, options=options, feature_path=path)
        edges = edge_effects(loaded, dicts, batch, nodes, node_threshold=1e-3)
        got[dev] = (nodes.dense(), edges)
    (n_cpu, e_cpu), (n_gpu, e_gpu) = got["cpu"], got["cuda"]
    for k in n_cpu.effects:
        torch.testing.assert_close(n_gpu.effects[k].cpu(), n_cpu.effects[k], rtol=1e-7, atol=1e-9)
    for k in e_cpu.edges:
        a, b = e_cpu.edges[k], e_gpu.edges[k].cpu()
        a, b = (a.to_dense(), b.to_dense()) if a.is_sparse else (a, b.to_dense() if b.is_sparse else b)
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


def test_discover_cli_on_cuda(tmp_path):
    from feature_circuits.cli import main

    rc = main(
        [
            "discover",
            "--method",
            "relp",
            "--num-examples",
            "8",
            "--batch-size",
            "8",
            "--device",
            "cuda",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    circuit = json.loads((tmp_path / "circuit.json").read_text())
    assert circuit["nodes"] and circuit["edges"]
