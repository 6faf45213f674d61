"""Gemma 2 and Gemma 3 (docs/hooks.md; docs/algorithms.md, "LRP rules"): sites, the LRP rules on
every norm / the tanh GELU / the GeGLU gate, conservation, every method and edges with random
dictionaries, and discover + evaluate end to end through the pipeline API."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.attribution import edge_effects, load_for_attribution, method_spec, node_effects
from feature_circuits.attribution.edges import site_pairs
from feature_circuits.dictionaries import splice_with_grad_leaves
from feature_circuits.model.loading import load_model
from feature_circuits.model.lrp import get_lrp_controller, install_lrp
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import Architecture, LRPConfig, Method
from tests.attribution.test_edges import _loop_edges
from tests.helpers import patch_batch, save_model, save_random_saes, write_pairs
from tests.model.archs import tiny_gemma2, tiny_gemma3
from tests.model.test_lrp import _embed_grad

BUILD = {"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}
ALL_RULES = LRPConfig(ln_rule=True, identity_rule=True, half_rule=True, ah_rule=True)
IDS = torch.tensor([[4, 12, 13, 6, 14, 8, 20]])


@pytest.mark.parametrize("family", sorted(BUILD))
def test_lrp_rules_installed_forward_identical(family, tmp_path):
    loaded = load_model(
        save_model(BUILD[family](2), tmp_path), device="cpu", dtype=torch.float64, before_wrap=install_lrp
    )
    assert loaded.architecture is Architecture(family)
    ctrl = get_lrp_controller(loaded)
    n = loaded.n_layers
    # four (1+w) RMSNorms per layer and the final one; Gemma 3 adds q_norm and k_norm per layer
    assert len(ctrl.patched["ln"]) == 4 * n + 1 + (2 * n if family == "gemma3" else 0)
    assert any(name.endswith("post_feedforward_layernorm") for name in ctrl.patched["ln"])
    assert any(name.endswith("self_attn.q_norm") for name in ctrl.patched["ln"]) == (family == "gemma3")
    assert len(ctrl.patched["identity"]) == n and all(p.endswith("act_fn") for p in ctrl.patched["identity"])
    assert len(ctrl.patched["half"]) == n
    ids = torch.tensor([[4, 12, 13, 6, 14, 8], [5, 15, 16, 7, 17, 9]])
    base, _, g0 = _embed_grad(loaded, ids, 8, LRPConfig.off())
    with torch.no_grad():
        assert torch.equal(base, loaded.hf_model(ids).logits)
    for cfg in (
        LRPConfig(),
        ALL_RULES,
        LRPConfig(identity_rule=False, half_rule=False),  # LN-rule alone
        LRPConfig(ln_rule=False, half_rule=False),  # Identity-rule alone
        LRPConfig(ln_rule=False, identity_rule=False),  # Half-rule alone
    ):
        logits, _, g = _embed_grad(loaded, ids, 8, cfg)
        assert torch.equal(logits, base), cfg
        assert (g - g0).abs().max() > 1e-6, cfg


def _rmsnorm_ln_rule_backward(family, tmp_path):
    """The LN-rule of a (1+w) RMSNorm: grad = g (1 + w) / rms(x)."""
    loaded = load_model(
        save_model(BUILD[family](2), tmp_path), device="cpu", dtype=torch.float64, before_wrap=install_lrp
    )
    norm = loaded.hf_model.model.layers[0].post_attention_layernorm
    x = torch.randn(2, 3, loaded.d_model, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, loaded.d_model, dtype=torch.float64)
    with get_lrp_controller(loaded).use(LRPConfig()):
        (got,) = torch.autograd.grad(norm(x), x, g)
    rms = (x.detach().pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    return got, g * (1 + norm.weight.detach()) / rms


@pytest.mark.parametrize("family", sorted(BUILD))
def test_rmsnorm_ln_rule_uses_one_plus_w(family, tmp_path):
    got, want = _rmsnorm_ln_rule_backward(family, tmp_path)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", sorted(BUILD))
def test_relevance_conservation(family, tmp_path):
    """Gemma has no biases; with LN-, Identity-, Half- and AH-rules the relevance at the (scaled)
    embedding sums to the target logit. With the final logit soft-cap y = c tanh(z/c) the backward
    starts from dy/dz, so the sum is (1 - (y/c)^2) z (docs/algorithms.md, "LRP rules")."""
    for cap in (None, 0.05):  # a cap of the order of the tiny model's logits, so that it matters
        path = save_model(BUILD[family](4, final_logit_softcapping=cap), tmp_path / str(cap))
        loaded = load_model(path, device="cpu", dtype=torch.float64, before_wrap=install_lrp)
        assert not any(n.endswith("bias") for n, _ in loaded.hf_model.named_parameters())
        target = 9
        logits, emb, rho = _embed_grad(loaded, IDS, target, ALL_RULES)
        y = logits[0, -1, target]
        total = (emb * rho).sum()
        assert abs(y) > 1e-3
        # rtol 1e-5: Gemma's RMSNorms and eager softmax compute in float32 even in a float64 model
        want = y if cap is None else (1 - (y / cap) ** 2) * cap * torch.atanh(y / cap)
        assert torch.allclose(total, want, rtol=1e-5, atol=0), (total.item(), want.item())
        if cap is not None:
            assert not torch.allclose(total, y, rtol=1e-3)
        # not conserved without the LN-rule (the check above is not loose)
        _, _, rho_plain = _embed_grad(
            loaded, IDS, target, LRPConfig(ln_rule=False, half_rule=True, ah_rule=True)
        )
        assert not torch.allclose((emb * rho_plain).sum(), want, rtol=1e-3)


@pytest.fixture(scope="module", params=sorted(BUILD))
def gemma(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = BUILD[request.param](5)
    d = save_model(model, root / "m")
    saes = save_random_saes(model, root / "s", dict_size=48) / "tiny"
    loaded, dicts = load_for_attribution(d, saes, "cpu", torch.float64)
    return request.param, loaded, dicts, d, saes


def test_splice_exact(gemma):
    _family, loaded, dicts, _d, _s = gemma
    ids = patch_batch().clean
    with torch.no_grad():
        plain = loaded.hf_model(input_ids=ids).logits
    with torch.no_grad(), loaded.lm.trace(ids):
        for site in loaded.spliced_sites(dicts):
            out, _f, _err = splice_with_grad_leaves(dicts[site.name], get_activation(loaded.lm, site))
            set_activation(loaded.lm, site, out)
        logits = save(loaded.lm.output.logits)
    assert (logits - plain).abs().max() < 1e-10


def test_every_method_runs_and_exact_matches_a_hand_patch(gemma):
    _family, loaded, dicts, _d, _s = gemma
    batch = patch_batch()
    res = {
        m: node_effects(loaded, dicts, batch, m, options=method_spec(m).options_from({"steps": 3}))
        for m in ("exact", "atp", "ig", "relp")
    }
    for m, nodes in res.items():
        assert set(nodes.effects) == {s.name for s in loaded.sites}, m
        assert all(torch.isfinite(e).all() for e in nodes.effects.values()), m
    # exact on the error node of mlp_1: patch that error term by hand, take the metric change
    site = loaded.site("mlp_1")
    ae = dicts["mlp_1"]
    err_idx = ae.dict_size
    got = res["exact"].effects["mlp_1"][..., err_idx]
    ref = _hand_error_patch(loaded, ae, site, batch)
    assert torch.allclose(got, ref, atol=1e-9), (got, ref)
    # relp differs from atp (the rules are on), ig differs from atp (the path is integrated)
    assert not torch.allclose(res["relp"].effects["mlp_1"], res["atp"].effects["mlp_1"])


def _hand_error_patch(loaded, ae, site, batch):
    """Per example and position: the metric with mlp_1's error term at that position set to its
    patch value, minus the clean metric (the patch error from a patch-run)."""
    from feature_circuits.dictionaries import encode_with_error

    def run(ids, replace=None):
        with torch.no_grad(), loaded.lm.trace(ids):
            x = get_activation(loaded.lm, site)
            saved_x = save(x)
            if replace is not None:
                set_activation(loaded.lm, site, replace)
            logits = save(loaded.lm.output.logits)
        return saved_x, logits

    x_clean, logits_clean = run(batch.clean)
    x_patch, _ = run(batch.patch)
    _, err_c = encode_with_error(ae, x_clean)
    _, err_p = encode_with_error(ae, x_patch)
    b, s = batch.clean.shape

    def metric(logits):
        last = logits[torch.arange(b), -1]
        return last[torch.arange(b), batch.patch_answer] - last[torch.arange(b), batch.clean_answer]

    base = metric(logits_clean)
    out = torch.zeros(b, s, dtype=x_clean.dtype)
    for p in range(s):
        x = x_clean.clone()
        x[:, p] = x_clean[:, p] - err_c[:, p] + err_p[:, p]
        out[:, p] = metric(run(batch.clean, x)[1]) - base
    return out


@pytest.mark.parametrize("method", ["atp", "relp"])
def test_edges_equal_loop(gemma, method):
    _family, loaded, dicts, _d, _s = gemma
    batch = patch_batch()
    nodes = node_effects(loaded, dicts, batch, method)
    threshold = 1e-4
    res = edge_effects(loaded, dicts, batch, nodes, node_threshold=threshold, chunk_size=4)
    lrp = LRPConfig() if method == "relp" else None
    pairs = site_pairs(loaded)
    assert (("attn_0", "mlp_0") in {(p.up, p.down) for p in pairs}) is True  # Gemma is sequential
    n = 0
    for pair in pairs:
        ref, k = _loop_edges(loaded, dicts, batch, nodes, pair, threshold, lrp)
        n += k
        assert torch.allclose(res.edges[(pair.up, pair.down)].to_dense(), ref, atol=1e-12, rtol=1e-9), pair
    assert n > 20


def test_discover_and_evaluate_end_to_end(gemma, tmp_path):
    """The pipeline API on a tiny Gemma saved to a local directory, with random SAEs: a circuit with
    nodes and edges (relp), deterministic, and its evaluation."""

    from feature_circuits.pipeline import DiscoverConfig, EvaluateConfig, discover, evaluate

    family, loaded, _dicts, model_dir, saes = gemma
    data = write_pairs(tmp_path / "pairs.jsonl", 6)

    def run(out):
        return discover(
            DiscoverConfig(
                method=Method.RELP,
                model=str(model_dir),
                saes=str(saes.parent),
                dataset=str(data),
                num_examples=6,
                batch_size=3,
                node_threshold=1e-4,
                edge_threshold=1e-6,
                seed=1,
                progress=False,
                html=False,
                out=str(tmp_path / out),
            )
        )

    c1 = run("a")
    assert c1.nodes and any(e.target != "logit" for e in c1.edges), family
    assert {n.site for n in c1.nodes} <= {s.name for s in loaded.sites}
    assert c1.sites_without_dictionary == ()
    c2 = run("b")
    assert [(n.id, n.effect) for n in c1.nodes] == [(n.id, n.effect) for n in c2.nodes]
    results = evaluate(
        EvaluateConfig(
            circuits=(str(tmp_path / "a"),),
            split="train",
            allow_discovery_split=True,
            num_examples=6,
            thresholds=(0.0, 1e6),
            progress=False,
        ),
        echo=lambda _line: None,
    )
    assert len(results) == 1 and results[0].n_nodes[0] > 0 and results[0].n_nodes[-1] == 0
    assert results[0].faithfulness[-1] == 0.0
