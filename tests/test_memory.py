"""The memory estimate and ``--batch-size auto`` (feature_circuits/memory.py): monotone in the batch,
the SAE-state term within a factor of the tensors one batch really allocates on a tiny model, the
batch choice against a given free-memory budget, and the option's parsing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from feature_circuits.attribution import load_for_attribution, node_effects
from feature_circuits.cli import build_parser
from feature_circuits.data import Batch
from feature_circuits.errors import ConfigError
from feature_circuits.memory import available_bytes, choose_batch_size, estimate_memory
from feature_circuits.pipeline import DiscoverConfig, discover
from feature_circuits.types import Method
from tests.helpers import write_pairs


@pytest.fixture(scope="module")
def tiny(neox_dir, neox_saes):
    return load_for_attribution(str(neox_dir), str(neox_saes), device="cpu")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_estimate_is_monotone_and_linear_in_batch(tiny):
    loaded, dicts = tiny
    ests = [estimate_memory(loaded, dicts, batch_size=b, seq_len=7) for b in (1, 2, 4, 8)]
    per = [e.per_batch_bytes for e in ests]
    assert per == sorted(per) and len(set(per)) == 4
    assert per[3] == 8 * per[0]  # linear in b
    assert all(e.fixed_bytes == ests[0].fixed_bytes > 0 for e in ests)
    params = sum(p.numel() * p.element_size() for p in loaded.hf_model.parameters())
    assert ests[0].model_bytes >= params
    nodes_only = estimate_memory(loaded, dicts, batch_size=4, seq_len=7, edges=False)
    assert nodes_only.per_batch_bytes < ests[2].per_batch_bytes and nodes_only.edge_bytes == 0
    sparse = estimate_memory(loaded, dicts, batch_size=4, seq_len=7, active_features=2)
    assert sparse.sae_state_bytes < ests[2].sae_state_bytes
    assert "GiB" in ests[0].describe()
    with pytest.raises(ValueError):
        estimate_memory(loaded, dicts, batch_size=0, seq_len=7)


def test_estimate_against_measured_tensors(tiny):
    """The SAE-state term against the tensors node_effects returns for one batch (clean, delta,
    gradient, effect; the estimate also counts the patch state and the encoder's saved pre-activation,
    so it is larger, within a factor of 3)."""
    loaded, dicts = tiny
    b, s = 4, 6
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 60, (b, s), generator=gen)
    patch = clean.clone()
    patch[:, 1] = (patch[:, 1] + 1) % 60
    batch = Batch(
        clean=clean, patch=patch, clean_answer=torch.full((b,), 8), patch_answer=torch.full((b,), 9), pairs=()
    )
    ne = node_effects(loaded, dicts, batch, Method.ATP)
    measured = 0
    for site in ne.effects:
        eff = ne.effects[site]
        measured += _nbytes(eff.to_dense() if eff.is_sparse else eff)
        for states in (ne.clean, ne.deltas, ne.grads or {}):
            st = states[site]
            measured += _nbytes(st.f.to_dense() if st.f.is_sparse else st.f) + _nbytes(st.err)
    est = estimate_memory(loaded, dicts, batch_size=b, seq_len=s)
    assert measured <= est.sae_state_bytes <= 3 * measured


def test_choose_batch_size(tiny):
    loaded, dicts = tiny
    one = estimate_memory(loaded, dicts, batch_size=1, seq_len=5).per_batch_bytes
    pick = choose_batch_size(loaded, dicts, seq_len=5, free_bytes=10 * one, margin=0.5)
    assert pick == 5
    assert estimate_memory(loaded, dicts, batch_size=pick, seq_len=5).per_batch_bytes <= 0.5 * 10 * one
    assert estimate_memory(loaded, dicts, batch_size=pick + 1, seq_len=5).per_batch_bytes > 0.5 * 10 * one
    assert choose_batch_size(loaded, dicts, seq_len=5, free_bytes=10 * one, margin=0.5, limit=3) == 3
    assert choose_batch_size(loaded, dicts, seq_len=5, free_bytes=1) == 1  # never below 1
    longer = choose_batch_size(loaded, dicts, seq_len=50, free_bytes=100 * one)
    assert longer < choose_batch_size(loaded, dicts, seq_len=5, free_bytes=100 * one)
    with pytest.raises(ValueError):
        choose_batch_size(loaded, dicts, seq_len=5, margin=0)
    assert available_bytes("cpu") > 0


def test_batch_size_option():
    ns = build_parser().parse_args(["discover", "--batch-size", "auto"])
    assert ns.batch_size == "auto"
    assert DiscoverConfig(batch_size="auto").batch_size == "auto"
    assert build_parser().parse_args(["discover", "--batch-size", "3"]).batch_size == 3
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="--batch-size"):
            DiscoverConfig(batch_size=build_parser().parse_args(["discover", "--batch-size", bad]).batch_size)


def test_discover_batch_size_auto(tmp_path, neox_dir, neox_saes):
    data = write_pairs(tmp_path / "d.jsonl", 6, clean="the w{i} and", patch="the w{j} and")
    lines: list[str] = []
    common: dict[str, Any] = dict(
        model=str(neox_dir),
        saes=str(neox_saes),
        dataset=str(data),
        num_examples=6,
        node_threshold=1e-3,
        progress=False,
        out=None,
    )
    auto = discover(DiscoverConfig(**common, batch_size="auto"), log=lines.append)
    fixed = discover(DiscoverConfig(**common, batch_size=2))
    assert any(x.startswith("--batch-size auto: 6") for x in lines), lines
    assert any(x.startswith("memory estimate:") for x in lines)
    assert [n.id for n in auto.nodes] == [n.id for n in fixed.nodes]
    assert [pytest.approx(n.effect, rel=1e-4, abs=1e-6) for n in auto.nodes] == [
        n.effect for n in fixed.nodes
    ]


def test_sparse_estimate_probe_and_discover(tmp_path, neox_dir):
    """The sparse path's estimate: the probe counts the active features the path really stores, the
    SAE-state term bounds the slots and d-wide tensors node_effects returns, it is far below the
    dense estimate, and discover prints it (4096-feature SAEs: the sparse path is chosen)."""
    from feature_circuits.attribution.forward import collect_activations, use_sparse
    from feature_circuits.attribution.results import SparseSiteState
    from feature_circuits.dictionaries import MarksAutoEncoder
    from feature_circuits.memory import probe_active_features
    from tests.helpers import save_random_saes, tiny_gpt_neox

    saes = save_random_saes(tiny_gpt_neox(), tmp_path / "s", dict_size=4096, dict_id="10_4096")
    loaded, dicts = load_for_attribution(str(neox_dir), str(saes / "tiny"), device="cpu")
    sites = [s for s in loaded.all_sites if s.name in dicts]
    assert use_sparse(dicts, sites)
    b, s = 4, 6
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 60, (b, s), generator=gen)
    patch = clean.clone()
    patch[:, 1] = (patch[:, 1] + 1) % 60
    # like a trained SAE: ~32 active features per token (a random encoder fires ~half of them)
    acts, _ = collect_activations(loaded, clean, sites)
    with torch.no_grad():
        for site in sites:
            ae = dicts[site.name]
            assert isinstance(ae, MarksAutoEncoder)
            x = acts[site.name].reshape(-1, site.d_model)
            pre = (x - ae.bias) @ ae.encoder.weight.T + ae.encoder.bias
            ae.encoder.bias.sub_(torch.topk(pre.flatten(), 32 * x.shape[0]).values[-1])
    batch = Batch(
        clean=clean, patch=patch, clean_answer=torch.full((b,), 8), patch_answer=torch.full((b,), 9), pairs=()
    )
    ne = node_effects(loaded, dicts, batch, Method.ATP)
    assert ne.is_sparse
    k = probe_active_features(loaded, dicts, clean, patch)
    slots = {name: st.col.numel() for name, st in ne.clean.items() if isinstance(st, SparseSiteState)}
    # the probe (2x the mean per token, the worst site) bounds the union of clean and patch slots
    assert max(slots.values()) <= k * b * s
    assert 16 <= k <= 256
    measured = 0
    for st in ne.clean.values():
        assert isinstance(st, SparseSiteState)
        measured += 4 * _nbytes(st.values) + _nbytes(st.row) + _nbytes(st.col) + 4 * _nbytes(st.err)
    sparse = estimate_memory(loaded, dicts, batch_size=b, seq_len=s, active_features=k, sparse=True)
    dense = estimate_memory(loaded, dicts, batch_size=b, seq_len=s)
    assert measured <= sparse.sae_state_bytes
    assert sparse.sae_state_bytes < dense.sae_state_bytes / 4
    assert "sparse feature path" in sparse.describe() and "sparse" not in dense.describe()
    # the encoder chunk does not grow with the batch: more examples fit than the dense estimate allows
    free = 50 * dense.per_batch_bytes
    assert choose_batch_size(loaded, dicts, seq_len=s, free_bytes=free, active_features=k, sparse=True) > (
        choose_batch_size(loaded, dicts, seq_len=s, free_bytes=free)
    )
    data = write_pairs(tmp_path / "d.jsonl", 4, clean="the w{i} and", patch="the w{j} and")
    lines: list[str] = []
    cfg = DiscoverConfig(
        model=str(neox_dir),
        saes=str(saes / "tiny"),
        dataset=str(data),
        num_examples=4,
        batch_size="auto",
        progress=False,
        out=None,
        nodes_only=True,
        context_top_k=0,
    )
    discover(cfg, log=lines.append)
    assert any("sparse feature path" in x for x in lines if x.startswith("memory estimate:")), lines
