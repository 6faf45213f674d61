"""Node effects (docs/algorithms.md, "Methods"): exact, atp, ig, relp, zero-ablation mode; the
method registry and its options."""

from __future__ import annotations

import pytest
import torch

from feature_circuits.attribution import (
    METHODS,
    ExactOptions,
    IGOptions,
    RelPOptions,
    load_for_attribution,
    method_spec,
    node_effects,
)
from feature_circuits.errors import ConfigError
from feature_circuits.types import LRPConfig, Method
from tests.helpers import CLEAN, save_model, save_random_saes, tiny_gpt_neox, tiny_llama
from tests.helpers import patch_batch as _batch


@pytest.fixture(scope="module")
def neox64(tmp_path_factory):
    d = save_model(tiny_gpt_neox(), tmp_path_factory.mktemp("m"))
    saes = save_random_saes(tiny_gpt_neox(), tmp_path_factory.mktemp("s"))
    return load_for_attribution(d, saes / "tiny", "cpu", torch.float64)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    d = save_model(tiny_llama(), tmp_path_factory.mktemp("m"))
    saes = save_random_saes(tiny_llama(), tmp_path_factory.mktemp("s"))
    return load_for_attribution(d, saes / "tiny", "cpu", torch.float64)


@pytest.mark.parametrize("which", ["neox64", "llama64"])
def test_relp_with_rules_off_equals_atp_and_shapes(which, request):
    loaded, dicts = request.getfixturevalue(which)
    batch = _batch()
    atp = node_effects(loaded, dicts, batch, Method.ATP)
    off = node_effects(loaded, dicts, batch, Method.RELP, options=RelPOptions(lrp=LRPConfig.off()))
    relp = node_effects(loaded, dicts, batch, Method.RELP)
    assert set(atp.effects) == {s.name for s in loaded.sites}
    assert atp.grads is not None and off.grads is not None  # gradient methods record them
    for name, eff in atp.effects.items():
        assert eff.shape == (2, 5, 65) and eff.dtype == torch.float64
        assert torch.equal(off.effects[name], eff)
        assert torch.equal(off.grads[name].f, atp.grads[name].f)
        assert torch.equal(atp.effects[name], atp.grads[name].node_product(atp.deltas[name]))
    assert torch.equal(atp.metric_clean, relp.metric_clean)
    assert any(not torch.allclose(relp.effects[k], atp.effects[k]) for k in atp.effects)
    # metric: logit(patch answer) - logit(clean answer) at the last position
    with torch.no_grad():
        logits = loaded.hf_model(CLEAN).logits[:, -1]
    assert torch.allclose(atp.metric_clean, logits[[0, 1], [9, 8]] - logits[[0, 1], [8, 9]])


def test_all_methods_equal_exact_when_linear(tmp_path):
    """Construction: every LayerNorm has eps = 1e12 (sigma is constant to ~1e-12 relative, so LayerNorm
    is affine; every LN weight is scaled by 1e6 to keep activations O(1)). In the parallel-residual
    GPT-NeoX the metric is then affine in the outputs of attn_1, mlp_1 and resid_1 (residual add ->
    final LN -> unembedding), and a site's output is affine in its features and error, so exact,
    atp, ig and relp (LN-rule) node effects all coincide at those sites."""
    model = tiny_gpt_neox(layer_norm_eps=1e12, initializer_range=0.2).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.mul_(1e6)
    d = save_model(model, tmp_path / "m")
    saes = save_random_saes(model, tmp_path / "s")
    loaded, dicts = load_for_attribution(d, saes / "tiny", "cpu", torch.float64)
    batch = _batch()
    sites = ["attn_1", "mlp_1", "resid_1"]
    exact = node_effects(loaded, dicts, batch, "exact", sites=sites)
    scale = max(exact.effects[s].abs().max().item() for s in sites)
    assert scale > 1e-3
    for method in ("atp", "relp", "ig"):
        options = method_spec(method).options_from({"steps": 3})
        res = node_effects(loaded, dicts, batch, method, sites=sites, options=options)
        for s in sites:
            assert torch.allclose(res.effects[s], exact.effects[s], atol=1e-7 * scale, rtol=0), (method, s)


def _one_dim_embedding_model(tmp_path, llama=False):
    """Tokens 20 and 21 have embeddings equal to those of 12 and 15 except in one dimension, so with
    identity dictionaries a clean -> patch swap changes exactly one embed node."""
    model = (tiny_llama(seed=1) if llama else tiny_gpt_neox(seed=1)).double()
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, torch.nn.Embedding)
    emb = embedding.weight
    with torch.no_grad():
        emb[20] = emb[12]
        emb[20, 3] += 2.0
        emb[21] = emb[15]
        emb[21, 7] -= 2.0
    return load_for_attribution(save_model(model, tmp_path), "neurons", "cpu", torch.float64)


def test_ig_approaches_exact_single_node(tmp_path):
    loaded, dicts = _one_dim_embedding_model(tmp_path)
    batch = _batch()
    exact = node_effects(loaded, dicts, batch, "exact", sites=["embed"])
    # a single node changes: its exact effect is the total effect
    assert torch.allclose(exact.effects["embed"][0, 1, 3], exact.total_effect[0])
    assert torch.allclose(exact.effects["embed"][1, 1, 7], exact.total_effect[1])
    nodes = [(0, 1, 3), (1, 1, 7)]
    ex = torch.stack([exact.effects["embed"][n] for n in nodes])
    atp = node_effects(loaded, dicts, batch, "atp", sites=["embed"])
    errs = {}
    for steps in (2, 10, 50):
        ig = node_effects(loaded, dicts, batch, "ig", sites=["embed"], options=IGOptions(steps=steps))
        errs[steps] = (torch.stack([ig.effects["embed"][n] for n in nodes]) - ex).abs()
    atp_err = (torch.stack([atp.effects["embed"][n] for n in nodes]) - ex).abs()
    assert (errs[50] < atp_err).all(), (errs, atp_err)
    assert (errs[50] < errs[10]).all() and (errs[10] < errs[2]).all(), errs


def test_zero_ablation_mode(neox64):
    loaded, dicts = neox64
    batch = _batch()
    res = node_effects(loaded, dicts, batch, "atp", counterfactual=False)
    with torch.no_grad():
        logits = loaded.hf_model(CLEAN).logits[:, -1]
    assert torch.allclose(res.metric_clean, -logits[[0, 1], [8, 9]])
    for name, d in res.deltas.items():
        assert torch.equal(d.f, -res.clean[name].f) and torch.equal(d.err, -res.clean[name].err)
    ex = node_effects(
        loaded,
        dicts,
        batch,
        "exact",
        counterfactual=False,
        sites=["resid_1"],
        options=ExactOptions(max_nodes=20),
    )
    eff = ex.effects["resid_1"]
    assert torch.isnan(eff).sum() > 0 and torch.isfinite(eff[..., -1]).all()


def test_exact_matches_manual_patch(neox64):
    loaded, dicts = neox64
    batch = _batch()
    ex = node_effects(loaded, dicts, batch, "exact", sites=["mlp_0"], options=ExactOptions(chunk_size=7))
    d = ex.deltas["mlp_0"]
    e, p, j = (d.f != 0).nonzero()[0].tolist()
    ae = dicts["mlp_0"]
    f1 = ex.clean["mlp_0"].f.clone()
    f1[e, p, j] += d.f[e, p, j]
    out = {}
    site = next(s for s in loaded.sites if s.name == "mlp_0")
    from feature_circuits.model.sites import save, set_activation

    with loaded.lm.trace(CLEAN):
        set_activation(loaded.lm, site, ae.decode(f1) + ex.clean["mlp_0"].err)
        out["logits"] = save(loaded.lm.output.logits)
    lg = out["logits"][:, -1]
    m = lg[[0, 1], [9, 8]] - lg[[0, 1], [8, 9]]
    assert torch.allclose(ex.effects["mlp_0"][e, p, j], m[e] - ex.metric_clean[e], atol=1e-10)
    # positions before the patched token are unaffected
    assert ex.effects["mlp_0"][:, 0].abs().max() < 1e-12


def test_determinism_and_float32(neox64, tmp_path):
    loaded, dicts = neox64
    batch = _batch()
    for method in ("relp", "ig"):
        options = method_spec(method).options_from({"steps": 4})
        a = node_effects(loaded, dicts, batch, method, options=options)
        b = node_effects(loaded, dicts, batch, method, options=options)
        assert all(torch.equal(a.effects[k], b.effects[k]) for k in a.effects)
    d = save_model(tiny_gpt_neox(), tmp_path / "m")
    saes = save_random_saes(tiny_gpt_neox(), tmp_path / "s")
    l32, d32 = load_for_attribution(d, saes / "tiny", "cpu", torch.float32)
    r32 = node_effects(l32, d32, batch, "relp")
    r64 = node_effects(loaded, dicts, batch, "relp")
    for k in r32.effects:
        assert r32.effects[k].dtype == torch.float32
        assert torch.allclose(r32.effects[k].double(), r64.effects[k], atol=1e-4)


def test_registry_options_and_errors(neox64):
    """Every method is registered with its options dataclass; options are validated when built and
    checked against the method; a wrong option type or value is a ConfigError naming it."""
    assert set(METHODS) >= set(Method) or {method_spec(m).method for m in Method} == set(Method)
    assert {m: method_spec(m).options.__name__ for m in Method} == {
        Method.EXACT: "ExactOptions",
        Method.ATP: "AtpOptions",
        Method.RELP: "RelPOptions",
        Method.IG: "IGOptions",
    }
    assert not method_spec("exact").has_gradients and method_spec("relp").has_gradients
    assert method_spec("ig").options_from({"steps": 7, "unrelated": 1}) == IGOptions(steps=7)
    assert method_spec("relp").backward_lrp() == LRPConfig() and method_spec("atp").backward_lrp() is None
    for bad in (
        lambda: IGOptions(steps=0),
        lambda: ExactOptions(chunk_size=0),
        lambda: ExactOptions(max_nodes=0),
    ):
        with pytest.raises(ConfigError, match="must be an integer >= 1"):
            bad()
    loaded, dicts = neox64
    with pytest.raises(ConfigError, match="method ig takes IGOptions, got ExactOptions"):
        node_effects(loaded, dicts, _batch(), "ig", options=ExactOptions())
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        node_effects(loaded, dicts, _batch(), "nope")
    with pytest.raises(ConfigError, match=r"sites \['mlp_9'\]"):
        node_effects(loaded, dicts, _batch(), "atp", sites=["mlp_9"])


def test_default_metric_follows_counterfactual(neox64):
    """No metric given: logit_diff with a counterfactual, answer_logit without (metrics.py)."""
    from feature_circuits.metrics import answer_logit, logit_diff

    loaded, dicts = neox64
    batch = _batch()
    for counterfactual, metric in ((True, logit_diff), (False, answer_logit)):
        a = node_effects(loaded, dicts, batch, "atp", counterfactual=counterfactual, sites=["resid_1"])
        b = node_effects(
            loaded, dicts, batch, "atp", counterfactual=counterfactual, sites=["resid_1"], metric=metric
        )
        assert torch.equal(a.effects["resid_1"], b.effects["resid_1"])
        assert torch.equal(a.metric_clean, b.metric_clean)
