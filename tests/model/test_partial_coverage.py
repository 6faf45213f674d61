"""Partial dictionary coverage (docs/algorithms.md, "Sites"): only the sites with a dictionary are
spliced, the others pass their effect through; edges are the direct paths between spliced sites and
equal the one-backward-per-node loop; attn_z sites (the input of the attention output projection)
are spliced like any other."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from feature_circuits.attribution import edge_effects, load_for_attribution, method_spec, node_effects
from feature_circuits.attribution.edges import SitePair, check_direct_pairs, site_pairs
from feature_circuits.dictionaries import splice_with_grad_leaves
from feature_circuits.dictionaries.marks import MarksAutoEncoder
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import LRPConfig, Site, SiteKind
from tests.attribution.test_edges import _loop_edges
from tests.helpers import patch_batch, save_model, tiny_gpt_neox
from tests.model.archs import BUILDERS

#: spliced on a 3-layer model: attn_z of layers 0 and 2, mlp_0, two residual sites
PARTIAL = ("attn_z_0", "mlp_0", "resid_1", "attn_z_2", "resid_2")


def _legacy_pairs(n_layers: int, parallel: bool) -> list[SitePair]:
    """The per-layer table of docs/algorithms.md, "Edges" (every default site spliced)."""
    pairs = []
    for layer in range(n_layers):
        prev = "embed" if layer == 0 else f"resid_{layer - 1}"
        attn, mlp, resid = f"attn_{layer}", f"mlp_{layer}", f"resid_{layer}"
        pairs.append(SitePair(prev, attn))
        if not parallel:
            pairs.append(SitePair(attn, mlp))
        pairs += [
            SitePair(prev, mlp, (attn,)),
            SitePair(mlp, resid),
            SitePair(attn, resid, (mlp,)),
            SitePair(prev, resid, (attn, mlp)),
        ]
    return pairs


def _partial_dicts(loaded, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in PARTIAL:
        site = loaded.site(name)
        ae = MarksAutoEncoder(site.d_model, 48)
        with torch.no_grad():
            for p in ae.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        out[name] = ae.to(dtype=loaded.dtype)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "gemma2"])
def partial(request, tmp_path_factory):
    d = save_model(BUILDERS[request.param](1), tmp_path_factory.mktemp(request.param))
    loaded, _ = load_for_attribution(d, "neurons", "cpu", torch.float64)
    return loaded, _partial_dicts(loaded)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt_neox_sequential", "llama", "gemma3"])
def test_full_coverage_pairs_are_the_table(family, tmp_path):
    loaded, _ = load_for_attribution(save_model(BUILDERS[family](0), tmp_path), "neurons", "cpu")
    want = _legacy_pairs(loaded.n_layers, loaded.parallel_residual)
    assert site_pairs(loaded) == want
    assert site_pairs(loaded, [s.name for s in loaded.sites]) == want
    # residual dictionaries every second layer: the pairs skip the layers in between
    assert site_pairs(loaded, ["embed", "resid_0", "resid_2"]) == [
        SitePair("embed", "resid_0"),
        SitePair("resid_0", "resid_2"),
    ]


def test_partial_pairs_skip_sites_without_dictionary(partial):
    loaded, dicts = partial
    pairs = site_pairs(loaded, dicts)
    check_direct_pairs(loaded, pairs)
    want = {
        ("attn_z_0", "resid_1"): ("mlp_0",),  # through attn_0, resid_0 and all of layer 1
        ("mlp_0", "resid_1"): (),  # through resid_0 and layer 1
        ("resid_1", "attn_z_2"): (),
        ("resid_1", "resid_2"): ("attn_z_2",),  # the skip and the MLP of layer 2
        ("attn_z_2", "resid_2"): (),  # through attn_2 (and mlp_2 when sequential)
    }
    if not loaded.parallel_residual:
        want[("attn_z_0", "mlp_0")] = ()  # through attn_0 (not spliced)
    assert {(p.up, p.down): p.stop for p in pairs} == want
    # forward order of the downstream site
    ranks = [Site.rank_of(p.down) for p in pairs]
    assert ranks == sorted(ranks)


def test_attn_z_splice_is_exact_and_unspliced_sites_pass_through(partial):
    """Splicing the partial set (error node kept) leaves the logits unchanged; the attn_z dictionary
    reads the o_proj/dense input (its reconstruction differs from it, the error node closes the gap)."""
    loaded, dicts = partial
    ids = patch_batch().clean
    with torch.no_grad():
        plain = loaded.hf_model(input_ids=ids).logits
    errs = {}
    with torch.no_grad(), loaded.lm.trace(ids):
        for site in loaded.spliced_sites(dicts):
            x = get_activation(loaded.lm, site)
            out, _f, err = splice_with_grad_leaves(dicts[site.name], x)
            errs[site.name] = save(err.abs().max())
            set_activation(loaded.lm, site, out)
        logits = save(loaded.lm.output.logits)
    assert all(e > 1e-2 for e in errs.values()), errs  # the dictionaries do not reconstruct exactly
    assert (logits - plain).abs().max() < 1e-10


@pytest.mark.parametrize("method", ["atp", "relp", "ig"])
def test_partial_edges_equal_loop(partial, method):
    loaded, dicts = partial
    batch = patch_batch()
    nodes = node_effects(loaded, dicts, batch, method, options=method_spec(method).options_from({"steps": 2}))
    assert set(nodes.effects) == set(PARTIAL)
    threshold = 1e-5
    lrp = LRPConfig() if method == "relp" else None
    res = edge_effects(loaded, dicts, batch, nodes, node_threshold=threshold, chunk_size=3)
    pairs = site_pairs(loaded, dicts)
    assert {k for k in res.edges if k[1] != "logit"} == {(p.up, p.down) for p in pairs}
    n_checked = 0
    for pair in pairs:
        ref, n_sel = _loop_edges(loaded, dicts, batch, nodes, pair, threshold, lrp)
        n_checked += n_sel
        got = res.edges[(pair.up, pair.down)].to_dense()
        assert torch.allclose(got, ref, atol=1e-12, rtol=1e-9), pair
        assert ref.abs().max() > 0, pair  # the pair carries something: the skipped sites pass effects
    assert n_checked > 10


def test_exact_node_effects_with_partial_coverage(partial):
    """exact on the partial set: each node's effect is the metric change of patching that one node
    (checked for one feature of attn_z_0 by hand)."""
    loaded, dicts = partial
    batch = patch_batch()
    nodes = node_effects(loaded, dicts, batch, "exact")
    assert set(nodes.effects) == set(PARTIAL)
    atp = node_effects(loaded, dicts, batch, "atp")
    # exact and atp agree in sign on most strong nodes (a sanity check that the same sites are patched)
    ex, ap = nodes.effects["resid_2"].flatten(), atp.effects["resid_2"].flatten()
    strong = ex.abs() > ex.abs().max() * 0.1
    assert (torch.sign(ex[strong]) == torch.sign(ap[strong])).float().mean() > 0.6


def test_site_kinds_and_lookup(tmp_path):
    loaded, _ = load_for_attribution(save_model(tiny_gpt_neox(), tmp_path), "neurons", "cpu")
    assert [s.name for s in loaded.attn_z_sites] == ["attn_z_0", "attn_z_1"]
    assert all(s.reads_input and s.kind is SiteKind.ATTN_Z for s in loaded.attn_z_sites)
    assert loaded.site("attn_z_1").module_path == "gpt_neox.layers.1.attention.dense"
    assert [s.name for s in loaded.spliced_sites(["resid_1", "attn_z_0", "embed"])] == [
        "embed",
        "attn_z_0",
        "resid_1",
    ]
    assert Site.rank_of("attn_z_0") < Site.rank_of("attn_0")
    with pytest.raises(ValueError, match="Marks"):
        _ = loaded.site("attn_z_0").marks_dir


def test_evaluation_over_partial_sites(partial):
    """The evaluation ablates nodes of the spliced sites only: the full partial circuit is the model
    (faithfulness 1), the empty one scores 0, and the node counts are over the spliced sites."""
    from feature_circuits.circuit import aggregate_nodes
    from feature_circuits.evaluation.sweep import evaluate_circuit

    loaded, dicts = partial
    batch = patch_batch()
    agg = aggregate_nodes([node_effects(loaded, dicts, batch, "atp")])
    assert set(agg.effects) == set(PARTIAL)
    # every node non-zero, so that threshold 0 keeps all of them (atp gives exactly 0 to a feature
    # with no clean/patch difference, which mean ablation would still move)
    agg = dataclasses.replace(agg, effects={k: v.abs() + 1e-3 for k, v in agg.effects.items()})
    res = evaluate_circuit(
        loaded, dicts, agg, [batch], thresholds=(0.0, 1e9), bootstrap=0, baseline_draws=0, free_layers=0
    )
    total = sum(int(d.dict_size) + 1 for d in dicts.values())
    assert res.n_nodes_total == total
    assert res.n_nodes[0] == total and res.n_nodes[-1] == 0
    assert abs(res.faithfulness[0] - 1.0) < 1e-6 and abs(res.faithfulness[-1]) < 1e-6
