"""The sparse feature path (docs/algorithms.md, "Sparse feature path"): the same node and edge
effects as the dense path (float64) for atp, relp and ig, with and without a counterfactual; its
states stay sparse; the automatic choice; the primitives against dense references."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.attribution import (
    IGOptions,
    SparseSiteState,
    edge_effects,
    load_for_attribution,
    node_effects,
)
from feature_circuits.attribution.forward import (
    SPARSE_MIN_FEATURES,
    SparseDecoder,
    _row_union,
    gather_dot,
    gather_rows,
    sparse_site_states,
    use_sparse,
)
from feature_circuits.circuit import aggregate_edges, aggregate_nodes
from feature_circuits.dictionaries import IdentityDictionary, encode_with_error
from feature_circuits.errors import ConfigError
from feature_circuits.types import Method
from tests.helpers import patch_batch, save_model, save_random_saes, tiny_gpt_neox


@pytest.fixture(scope="module")
def neox64(tmp_path_factory):
    d = save_model(tiny_gpt_neox(), tmp_path_factory.mktemp("m"))
    saes = save_random_saes(tiny_gpt_neox(), tmp_path_factory.mktemp("s"))
    return load_for_attribution(d, saes / "tiny", "cpu", torch.float64)


def _options(method):
    return IGOptions(steps=4, max_rows=4) if method is Method.IG else None


@pytest.mark.parametrize("counterfactual", [True, False])
@pytest.mark.parametrize("method", [Method.ATP, Method.RELP, Method.IG])
def test_sparse_node_effects_equal_dense(neox64, method, counterfactual):
    loaded, dicts = neox64
    batch = patch_batch()
    kw = {"options": _options(method), "counterfactual": counterfactual}
    dense = node_effects(loaded, dicts, batch, method, feature_path="dense", **kw)
    sparse = node_effects(loaded, dicts, batch, method, feature_path="sparse", **kw)
    assert not dense.is_sparse and sparse.is_sparse
    torch.testing.assert_close(sparse.metric_clean, dense.metric_clean, rtol=0, atol=0)
    torch.testing.assert_close(sparse.metric_patch, dense.metric_patch, rtol=0, atol=0)
    as_dense = sparse.dense()
    assert dense.grads is not None and as_dense.grads is not None
    for site, eff in dense.effects.items():
        got = sparse.effects[site]
        assert got.is_sparse and got.shape == eff.shape
        torch.testing.assert_close(got.to_dense(), eff, rtol=1e-12, atol=1e-14)
        c = sparse.clean[site]
        assert isinstance(c, SparseSiteState)
        # every feature that is active in the clean or patch input is a slot; nothing else is
        clean_f, patch_f = dense.clean[site].f, dense.clean[site].f + dense.deltas[site].f
        assert int(c.mask.sum()) == int(((clean_f != 0) | (patch_f != 0)).sum())
        torch.testing.assert_close(as_dense.clean[site].f, clean_f, rtol=0, atol=0)
        torch.testing.assert_close(as_dense.deltas[site].f, dense.deltas[site].f, rtol=0, atol=1e-15)
        torch.testing.assert_close(as_dense.deltas[site].err, dense.deltas[site].err, rtol=0, atol=1e-14)
        # gradients are stored at the active slots only, equal to the dense gradient there
        active = (clean_f != 0) | (patch_f != 0)
        torch.testing.assert_close(
            as_dense.grads[site].f, dense.grads[site].f * active, rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(as_dense.grads[site].err, dense.grads[site].err, rtol=1e-12, atol=1e-14)
    agg_d, agg_s = aggregate_nodes([dense]), aggregate_nodes([sparse])
    for site, t in agg_d.effects.items():
        torch.testing.assert_close(agg_s.effects[site], t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", [Method.ATP, Method.RELP, Method.IG])
def test_sparse_edge_effects_equal_dense(neox64, method):
    loaded, dicts = neox64
    batch = patch_batch()
    dense = node_effects(loaded, dicts, batch, method, feature_path="dense", options=_options(method))
    sparse = node_effects(loaded, dicts, batch, method, feature_path="sparse", options=_options(method))
    ed = edge_effects(loaded, dicts, batch, dense, node_threshold=0.01, chunk_size=3)
    es = edge_effects(loaded, dicts, batch, sparse, node_threshold=0.01, chunk_size=3)
    assert set(ed.edges) == set(es.edges)
    n_edges = 0
    for key, t in ed.edges.items():
        got = es.edges[key]
        assert got.shape == t.shape
        torch.testing.assert_close(got.to_dense(), t.to_dense(), rtol=1e-12, atol=1e-14)
        if key[1] != "logit":
            assert got._nnz() == t._nnz()  # the same entries are stored (exact zeros dropped)
            n_edges += t._nnz()
    assert n_edges > 100
    for key, t in aggregate_edges([ed]).items():
        torch.testing.assert_close(aggregate_edges([es])[key].to_dense(), t.to_dense())


def test_sparse_primitives_match_dense_references():
    torch.manual_seed(0)
    f = torch.relu(torch.randn(2, 3, 50, dtype=torch.float64) - 1.0)
    f[1, 2] = 0  # a row with no active feature
    index, mask = _row_union(f != 0)
    assert index.shape[-1] == int((f != 0).sum(-1).max())
    for e in range(2):
        for p in range(3):
            assert index[e, p][mask[e, p]].tolist() == (f[e, p] != 0).nonzero().squeeze(1).tolist()
    vals = f.gather(-1, index) * mask
    w = torch.randn(50, 8, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    dec = SparseDecoder(w, bias)
    torch.testing.assert_close(dec.decode(index, vals), f @ w + bias)
    g = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(gather_dot(w, index, g), (g @ w.T).gather(-1, index))
    # a decoder stored as a (d, F) weight (the usual layout) is read through its transposed view
    w_t = w.T.contiguous().T
    assert not w_t.is_contiguous()
    torch.testing.assert_close(gather_rows(w_t, index.reshape(-1)), w[index.reshape(-1)])
    torch.testing.assert_close(SparseDecoder(w_t, bias).decode(index, vals), f @ w + bias)
    state = SparseSiteState(index, mask, vals, torch.zeros(2, 3, 8, dtype=torch.float64), 50)
    torch.testing.assert_close(state.f, f)
    e, p, j = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), torch.tensor([3, 7, 7])
    torch.testing.assert_close(state.values_at(e, p, j), f[e, p, j])


def test_sparse_site_states_error_node_and_zero_patch(neox64):
    _, dicts = neox64
    ae = dicts["mlp_0"]
    x = torch.randn(2, 4, ae.activation_dim, dtype=torch.float64)
    g = torch.randn_like(x)
    c, p, gs = sparse_site_states(ae, x, None, grad=g)
    assert gs is not None
    torch.testing.assert_close(gs.values, (g @ ae.decoder_directions(x).T).gather(-1, c.index) * c.mask)
    assert sparse_site_states(ae, x, None)[2] is None
    f_ref, err_ref = encode_with_error(ae, x)
    torch.testing.assert_close(c.f, f_ref, rtol=0, atol=0)
    torch.testing.assert_close(c.err, err_ref, rtol=1e-12, atol=1e-13)
    assert torch.equal(p.values, torch.zeros_like(c.values)) and torch.equal(p.err, torch.zeros_like(x))


def test_use_sparse_chooses_by_size_and_is_overridable(neox64):
    loaded, dicts = neox64
    sites = loaded.sites
    assert not use_sparse(dicts, sites)  # 64 features: dense is cheaper
    assert use_sparse(dicts, sites, "sparse") and not use_sparse(dicts, sites, "dense")
    big = {s.name: IdentityDictionary(SPARSE_MIN_FEATURES) for s in sites}
    assert not use_sparse(big, sites)  # identity dictionaries (neurons) are dense by construction

    class Big:
        dict_size = SPARSE_MIN_FEATURES
        activation_dim = 8

    assert use_sparse({s.name: Big() for s in sites}, sites)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ConfigError, match="feature_path"):
        use_sparse(dicts, sites, "fast")
