"""Edge effects (docs/algorithms.md, "Edges"): batched VJPs equal a plain
one-backward-per-node loop."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.attribution import edge_effects, load_for_attribution, method_spec, node_effects
from feature_circuits.attribution.edges import edge_forward, select_nodes, site_pairs
from feature_circuits.types import LRPConfig
from tests.helpers import patch_batch as _batch
from tests.helpers import save_model, save_random_saes, tiny_gpt_neox, tiny_llama


def _load(tmp_path, make, saes="random"):
    d = save_model(make(), tmp_path / "m")
    src = save_random_saes(make(), tmp_path / "s") / "tiny" if saes == "random" else saes
    return load_for_attribution(d, src, "cpu", torch.float64)


def _loop_edges(loaded, dicts, batch, nodes, pair, threshold, lrp):
    """Reference: one backward per selected downstream node."""
    saved = edge_forward(loaded, dicts, batch.clean, pair, lrp=lrp)
    fu, eu, fd, ed = saved["fu"], saved["eu"], saved["fd"], saved["ed"]
    gd, du = nodes.grads[pair.down], nodes.deltas[pair.up]
    n_fd = fd.shape[-1]
    e, p, j, _ = select_nodes(nodes.effects[pair.down], threshold)
    b, s = fd.shape[:2]
    out = torch.zeros(b, s, n_fd + 1, s, fu.shape[-1] + 1, dtype=fd.dtype)
    for ei, pi, ji in zip(e.tolist(), p.tolist(), j.tolist(), strict=True):
        feature = ji < n_fd
        scalar = gd.f[ei, pi, ji] * fd[ei, pi, ji] if feature else (gd.err[ei, pi] * ed[ei, pi]).sum()
        gf, ge = torch.autograd.grad(scalar, [fu, eu], retain_graph=True, allow_unused=True)
        gf = torch.zeros_like(fu) if gf is None else gf
        ge = torch.zeros_like(eu) if ge is None else ge
        row = torch.cat([gf[ei] * du.f[ei], (ge[ei] * du.err[ei]).sum(-1, keepdim=True)], -1)
        row[pi + 1 :] = 0
        out[ei, pi, ji] = row
    return out, e.numel()


# ig edges differ from atp only in the node gradients: checked on GPT-NeoX, not repeated on Llama
@pytest.mark.parametrize(
    ("make", "method"),
    [
        (tiny_gpt_neox, "atp"),
        (tiny_gpt_neox, "relp"),
        (tiny_gpt_neox, "ig"),
        (tiny_llama, "atp"),
        (tiny_llama, "relp"),
    ],
    ids=["neox-atp", "neox-relp", "neox-ig", "llama-atp", "llama-relp"],
)
def test_batched_edges_equal_loop(make, method, tmp_path):
    loaded, dicts = _load(tmp_path, make)
    batch = _batch()
    nodes = node_effects(loaded, dicts, batch, method, options=method_spec(method).options_from({"steps": 3}))
    threshold = 1e-4
    lrp = LRPConfig() if method == "relp" else None
    res = edge_effects(loaded, dicts, batch, nodes, node_threshold=threshold, chunk_size=5)
    pairs = site_pairs(loaded)
    names = {(p.up, p.down) for p in pairs}
    assert set(res.edges) == names | {("resid_1", "logit")}
    assert (("attn_0", "mlp_0") in names) == (make is tiny_llama)
    assert torch.equal(res.edges[("resid_1", "logit")], nodes.effects["resid_1"])
    n_checked = 0
    for pair in pairs:
        got = res.edges[(pair.up, pair.down)]
        assert got.is_sparse and got.shape == (2, 5, 65, 5, 65)
        ref, n_sel = _loop_edges(loaded, dicts, batch, nodes, pair, threshold, lrp)
        n_checked += n_sel
        assert torch.allclose(got.to_dense(), ref, atol=1e-12, rtol=1e-9), pair
        # no future positions, no stored zeros
        idx = got.indices()
        assert (idx[3] <= idx[1]).all() and (got.values() != 0).all()
    assert n_checked > 20


def test_identity_dictionaries_mlp_to_resid_is_diagonal(tmp_path):
    """With identity dictionaries, resid_l = ... + mlp_l, so edge(mlp_l k -> resid_l j) = g_j [j = k] dmlp_k
    at the same position, and error nodes get nothing."""
    loaded, dicts = _load(tmp_path, tiny_gpt_neox, saes="neurons")
    batch = _batch()
    nodes = node_effects(loaded, dicts, batch, "atp")
    res = edge_effects(loaded, dicts, batch, nodes, node_threshold=0.0)
    dense = res.edges[("mlp_1", "resid_1")].to_dense()
    assert nodes.grads is not None  # atp records gradients
    g, dm = nodes.grads["resid_1"].f, nodes.deltas["mlp_1"].f
    expect = torch.zeros_like(dense)
    for e in range(2):
        for p in range(5):
            expect[e, p, :32, p, :32] = torch.diag(g[e, p] * dm[e, p]) * (
                nodes.effects["resid_1"][e, p, :32].abs() > 0
            )
    assert torch.allclose(dense, expect, atol=1e-12)


def test_edges_deterministic_and_exact_rejected(tmp_path):
    loaded, dicts = _load(tmp_path, tiny_gpt_neox)
    batch = _batch()
    nodes = node_effects(loaded, dicts, batch, "relp")
    a = edge_effects(loaded, dicts, batch, nodes, node_threshold=1e-3)
    b = edge_effects(loaded, dicts, batch, nodes, node_threshold=1e-3)
    for k in a.edges:
        assert torch.equal(a.edges[k].to_dense(), b.edges[k].to_dense())
    with pytest.raises(ValueError, match="exact"):
        edge_effects(
            loaded,
            dicts,
            batch,
            node_effects(loaded, dicts, batch, "exact", sites=["resid_1"]),
            node_threshold=0.1,
        )


def test_decoder_directions_match_decode():
    """Row k of decoder_directions is decode(e_k) - decode(0): read from the weights (the Marks
    adapter), derived from decode by a VJP (any affine decode), and the identity for neurons."""
    from feature_circuits.dictionaries import (
        Dictionary,
        IdentityDictionary,
        MarksAutoEncoder,
        decoder_directions_by_vjp,
    )

    torch.manual_seed(0)
    ae = MarksAutoEncoder(6, 10).double()
    like = torch.zeros(1, dtype=torch.float64)
    expect = ae.decode(torch.eye(10, dtype=torch.float64)) - ae.decode(
        torch.zeros(1, 10, dtype=torch.float64)
    )
    assert isinstance(ae, Dictionary) and isinstance(IdentityDictionary(4), Dictionary)
    assert torch.allclose(ae.decoder_directions(like), expect, atol=1e-14)
    assert torch.allclose(decoder_directions_by_vjp(ae.decode, ae.dict_size, like), expect, atol=1e-14)
    assert torch.equal(IdentityDictionary(4).decoder_directions(like), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("make", [tiny_gpt_neox, tiny_llama], ids=["neox", "llama"])
@pytest.mark.parametrize("lrp", [None, LRPConfig()], ids=["grad", "lrp"])
def test_position_wise_probe_finds_the_attention_pairs(make, lrp, tmp_path):
    """The probe that lets a VJP row carry one node per (example, position): the direct path into
    a site mixes positions exactly when it crosses attention (the layer input -> attn_z_l, or ->
    attn_l without attn_z), with plain gradients and with the LRP rules."""
    from feature_circuits.attribution.edges import leaf_forward, pair_sites, position_wise
    from feature_circuits.types import SiteKind

    loaded, _ = _load(tmp_path, make)
    kinds = {s.name: s.kind for s in loaded.all_sites}
    for with_z in (False, True):
        names = {n for n, k in kinds.items() if with_z or k is not SiteKind.ATTN_Z}
        pairs = site_pairs(loaded, names)
        leaves, outs = leaf_forward(loaded, _batch().clean, pair_sites(pairs), lrp)
        assert any(kinds[p.down] is SiteKind.ATTN_Z for p in pairs) == with_z
        for down in dict.fromkeys(p.down for p in pairs):
            ups = [p.up for p in pairs if p.down == down]
            mixes = kinds[down] is SiteKind.ATTN_Z or (kinds[down] is SiteKind.ATTN and not with_z)
            assert position_wise(outs[down], [leaves[u] for u in ups]) == (not mixes), (down, ups)


def test_marks_feature_gradients_equal_autograd():
    """The edge cotangent's shortcut for Marks autoencoders: d f_j / dx equals autograd through
    encode, for active and inactive features (the cotangents then equal the full-encode path)."""
    from feature_circuits.attribution.edges import _node_cotangents
    from feature_circuits.dictionaries import FeatureGradients, MarksAutoEncoder

    torch.manual_seed(0)
    ae = MarksAutoEncoder(8, 32).double()
    assert isinstance(ae, FeatureGradients)
    x = torch.randn(40, 8, dtype=torch.float64)
    j = torch.randint(0, 33, (40,))  # 32: the error node
    j[:3] = 32
    xr = x.clone().requires_grad_(True)
    f = ae.encode(xr)
    feat = j < 32
    picked = f[torch.arange(40)[feat], j[feat]]
    active = picked > 0
    assert active.any() and (~active).any()
    (want,) = torch.autograd.grad(picked.sum(), xr)
    got = ae.feature_gradients(x[feat], j[feat])
    torch.testing.assert_close(got, want[feat], atol=1e-14, rtol=0)
    g_f, g_err = torch.randn(40, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)

    class Plain:  # the same dictionary without the shortcut
        dict_size, activation_dim = 32, 8
        encode, decode = ae.encode, ae.decode

    fast = _node_cotangents(ae, x, j, g_f, g_err, 32)
    slow = _node_cotangents(Plain(), x, j, g_f, g_err, 32)  # type: ignore[arg-type]
    torch.testing.assert_close(fast, slow, atol=1e-13, rtol=0)
