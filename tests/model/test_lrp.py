"""LRP rules as patched submodules (docs/algorithms.md, "LRP rules")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feature_circuits.model.loading import load_model
from feature_circuits.model.lrp import get_lrp_controller, half_product, identity_rule, install_lrp
from feature_circuits.model.sites import get_activation, save, set_activation
from feature_circuits.types import LRPConfig
from tests.helpers import save_model, tiny_gpt_neox

ALL_RULES = LRPConfig(ln_rule=True, identity_rule=True, half_rule=True, ah_rule=True)


def _embed_grad(loaded, ids, token, config):
    """Logits and d logit[:, -1, token] / d embedding output, with ``config`` rules on."""
    saved = {}
    with get_lrp_controller(loaded).use(config), loaded.lm.trace(ids):
        emb = get_activation(loaded.lm, loaded.sites[0])
        leaf = emb.detach().requires_grad_()
        set_activation(loaded.lm, loaded.sites[0], leaf)
        saved["leaf"] = save(leaf)
        saved["logits"] = save(loaded.lm.output.logits)
    (g,) = torch.autograd.grad(saved["logits"][:, -1, token].sum(), saved["leaf"])
    return saved["logits"].detach(), saved["leaf"].detach(), g


@pytest.mark.parametrize("which", ["neox_dir", "llama_dir"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_bit_identical_gradients_differ(which, dtype, request):
    loaded = load_model(request.getfixturevalue(which), device="cpu", dtype=dtype, before_wrap=install_lrp)
    ctrl = get_lrp_controller(loaded)
    expected = {"ln", "identity", "ah"} | ({"half"} if which == "llama_dir" else set())
    assert set(ctrl.patched) == expected
    ids = torch.tensor([[4, 12, 13, 6, 14, 8], [5, 15, 16, 7, 17, 9]])
    base, _, g0 = _embed_grad(loaded, ids, 8, LRPConfig.off())
    with torch.no_grad():
        plain = loaded.hf_model(ids).logits
    assert torch.equal(base, plain)
    for cfg in (
        LRPConfig(),
        ALL_RULES,
        LRPConfig(ln_rule=False, identity_rule=False, half_rule=False, epsilon=1e-3),
    ):
        logits, _, g = _embed_grad(loaded, ids, 8, cfg)
        assert torch.equal(logits, base), cfg
        assert (g - g0).abs().max() > 1e-4, cfg
    # each rule alone is observable
    for cfg in (
        LRPConfig(identity_rule=False, half_rule=False),
        LRPConfig(ln_rule=False, half_rule=False),
        LRPConfig(ln_rule=False, identity_rule=False, half_rule=False, ah_rule=True),
    ):
        assert (_embed_grad(loaded, ids, 8, cfg)[2] - g0).abs().max() > 1e-6, cfg
    # the switch is restored: back to plain gradients
    assert torch.equal(_embed_grad(loaded, ids, 8, LRPConfig.off())[2], g0)
    assert install_lrp(loaded.hf_model) is ctrl  # idempotent


def test_relevance_conservation_bias_free_neox(tmp_path):
    model = tiny_gpt_neox(seed=3).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    loaded = load_model(
        save_model(model, tmp_path), device="cpu", dtype=torch.float64, before_wrap=install_lrp
    )
    ids = torch.tensor([[4, 12, 13, 6, 14, 8, 20]])
    target = 9
    logits, emb, rho = _embed_grad(
        loaded, ids, target, LRPConfig(ln_rule=True, identity_rule=True, ah_rule=True)
    )
    logit = logits[0, -1, target]
    total = (emb * rho).sum()
    assert abs(logit) > 1e-3
    assert torch.allclose(total, logit, rtol=1e-8, atol=0), (total.item(), logit.item())
    _, _, g = _embed_grad(loaded, ids, target, LRPConfig.off())
    assert not torch.allclose((emb * g).sum(), logit, rtol=1e-3)


@pytest.mark.parametrize("act,fn", [("gelu", F.gelu), ("silu", F.silu)])
def test_identity_rule_at_zero(act, fn):
    x = torch.tensor([0.0, 1e-30, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    y = identity_rule(x, fn)
    assert torch.equal(y, fn(x.detach()))
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.isfinite(gx).all()
    assert gx[0] == 1.0 and torch.allclose(gx[1], torch.tensor(1.0, dtype=torch.float64))  # 0.5 * g
    assert torch.allclose(gx[2:], g[2:] * fn(x[2:].detach()) / x[2:].detach())


def test_ln_rule_formulas_and_half_rule():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    g = torch.randn(3, 8, dtype=torch.float64)
    ln = torch.nn.LayerNorm(8, eps=1e-5).double()
    from transformers.models.llama.modeling_llama import LlamaRMSNorm as rms_cls

    rms = rms_cls(8, eps=1e-6).double()
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
        rms.weight.copy_(w)
    # patch the two norms as install_lrp does
    from feature_circuits.model import lrp as lrp_mod

    ctrl = lrp_mod.LRPController()
    lrp_mod._swap_class(ln, lrp_mod._LayerNormMixin, ctrl)
    lrp_mod._swap_class(rms, lrp_mod._RMSNormMixin, ctrl)
    sigma = torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5)
    ref_ln = (x - x.mean(-1, keepdim=True)) / sigma * w + b
    rms_val = torch.sqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    ref_rms = x / rms_val * w
    with ctrl.use(LRPConfig()):
        y_ln, y_rms = ln(x), rms(x)
    assert torch.equal(y_ln, F.layer_norm(x.detach(), (8,), w, b, 1e-5))
    for y, ref in ((y_ln, ref_ln), (y_rms, ref_rms)):
        (gy,) = torch.autograd.grad(y, x, g)
        (gr,) = torch.autograd.grad(ref, x, g)
        assert torch.allclose(gy, gr, atol=1e-12)
    a, c = x.detach().clone().requires_grad_(), torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = half_product(a, c)
    assert torch.equal(out, a.detach() * c.detach())
    ga, gc = torch.autograd.grad(out, [a, c], g)
    assert torch.equal(ga, 0.5 * g * c.detach()) and torch.equal(gc, 0.5 * g * a.detach())


def test_epsilon_rule_is_finite_in_half_precision():
    """The epsilon stabiliser (1e-10) underflows in float16; the rule computes in float32 there."""
    from feature_circuits.model.lrp import _EpsilonScale

    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z = torch.tensor([0.0, 1e-3, -2.0], dtype=dt, requires_grad=True)
        (g,) = torch.autograd.grad(_EpsilonScale.apply(z, 1e-10).sum(), z)
        assert g.dtype == dt and torch.isfinite(g).all()
        assert g[0] == 0 and float(g[2]) == pytest.approx(1.0, abs=1e-2)
