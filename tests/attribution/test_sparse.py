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
    _active_slots,
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
        assert c.col.numel() == int(((clean_f != 0) | (patch_f != 0)).sum())
        torch.testing.assert_close(as_dense.clean[site].f, clean_f, rtol=1e-12, atol=1e-15)
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


def _flat(f):
    """(row, col, values) of the non-zero entries of f (b, s, F), rows ascending."""
    row, col = (f.reshape(-1, f.shape[-1]) != 0).nonzero().unbind(1)
    return row, col, f.reshape(-1, f.shape[-1])[row, col]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparse_primitives_match_dense_references(dtype):
    """CSR kernels (float32/64) and the gather fallback (half, bfloat16) against dense products."""
    torch.manual_seed(0)
    f = torch.relu(torch.randn(2, 3, 50, dtype=torch.float64) - 1.0)
    f[1, 2] = 0  # a row with no active feature
    f[0, 0, 49] = 2.0  # the last feature
    row, col, vals = _flat(f)
    w = torch.randn(50, 8, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    g = torch.randn(6, 8, dtype=torch.float64)
    rtol, atol = (0.0, 1e-12) if dtype is torch.float64 else (2e-2, 5e-2)
    dec = SparseDecoder(w.to(dtype), bias.to(dtype))
    got = dec.decode(row, col, vals.to(dtype), 6)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), f.reshape(6, 50) @ w + bias, rtol=rtol, atol=atol)
    crow = torch.tensor([0, *torch.bincount(row, minlength=6).cumsum(0).tolist()])
    dots = dec.dot(crow, col, g.to(dtype))
    torch.testing.assert_close(dots.double(), (g @ w.T)[row, col], rtol=rtol, atol=atol)
    # a decoder stored as a (d, F) weight (the usual layout) is read through its transposed view
    w_t = w.T.contiguous().T
    assert not w_t.is_contiguous()
    torch.testing.assert_close(gather_rows(w_t, col), w[col])
    state = SparseSiteState(row, col, vals, torch.zeros(2, 3, 8, dtype=torch.float64), 50)
    assert state.shape == (2, 3, 50) and state.crow.tolist() == crow.tolist()
    torch.testing.assert_close(state.f, f)
    e, p, j = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1, 2, 0, 2]), torch.tensor([3, 7, 7, 49, 49])
    torch.testing.assert_close(state.values_at(e, p, j), f[e, p, j])
    eff = state.node_product(state).to_dense()
    torch.testing.assert_close(eff[..., :50], f * f)


def test_active_slots_in_row_chunks(neox64, monkeypatch):
    """The encoder runs over row chunks (bounded F-wide memory): the same slots and values, in
    row-major order, whatever the chunk size."""
    from feature_circuits.attribution import forward

    _, dicts = neox64
    ae = dicts["resid_0"]
    torch.manual_seed(1)
    x, xp = torch.randn(2, 2, 5, ae.activation_dim, dtype=torch.float64)
    fc, fp = ae.encode(x), ae.encode(xp)
    active = ((fc != 0) | (fp != 0)).reshape(10, -1)
    want_row, want_col = active.nonzero().unbind(1)
    for budget in (1, int(ae.dict_size) * 3, 1 << 22):
        monkeypatch.setitem(forward.ENCODE_BUDGET, "cpu", budget)
        row, col, vc, vp = _active_slots(ae, x, xp)
        assert vp is not None
        assert row.tolist() == want_row.tolist() and col.tolist() == want_col.tolist()
        torch.testing.assert_close(vc, fc.reshape(10, -1)[row, col], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(vp, fp.reshape(10, -1)[row, col], rtol=1e-12, atol=1e-15)


def test_sparse_decoder_is_cached_and_follows_weight_changes(neox64):
    _, dicts = neox64
    ae = dicts["attn_0"]
    x = torch.zeros(1, 1, ae.activation_dim, dtype=torch.float64)
    a, b = SparseDecoder.of(ae, x), SparseDecoder.of(ae, x)
    assert a is b
    assert a.w.is_contiguous()
    torch.testing.assert_close(a.w, ae.decoder_directions(x), rtol=0, atol=0)
    saved = ae.decoder.weight.detach().clone()
    try:
        with torch.no_grad():
            ae.decoder.weight.mul_(2.0)
        c = SparseDecoder.of(ae, x)
        assert c is not a
        torch.testing.assert_close(c.w, 2.0 * saved.T, rtol=0, atol=0)
    finally:
        with torch.no_grad():
            ae.decoder.weight.copy_(saved)


def test_sparse_site_states_error_node_and_zero_patch(neox64):
    _, dicts = neox64
    ae = dicts["mlp_0"]
    x = torch.randn(2, 4, ae.activation_dim, dtype=torch.float64)
    g = torch.randn_like(x)
    c, p, gs = sparse_site_states(ae, x, None, grad=g)
    assert gs is not None
    ref = (g @ ae.decoder_directions(x).T).reshape(-1, int(ae.dict_size))
    torch.testing.assert_close(gs.values, ref[c.row, c.col])
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
