"""The hook table (docs/hooks.md): every TransformerLens hook -> site row, checked against the
TransformerLens tensor computed by hand from the HF weights and modules, on a tiny random model of
every family; plus the names and errors of ``site_for_hook``."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from feature_circuits.errors import ConfigError
from feature_circuits.model.hooks import HOOK_TABLE, hook_for_site, site_for_hook
from feature_circuits.model.loading import load_model
from feature_circuits.model.sites import get_activation, save
from feature_circuits.types import Architecture, Site
from tests.model.archs import BUILDERS, saved

IDS = torch.tensor([[4, 12, 13, 6, 14, 8], [5, 15, 16, 7, 17, 9]])


def _rotary_fn(hf):
    return importlib.import_module(type(hf).__module__).apply_rotary_pos_emb


def _position_embeddings(hf, layers):
    """(cos, sin) each attention receives, captured with plain forward pre-hooks."""
    got: dict[int, tuple] = {}
    handles = []
    for i, layer in enumerate(layers):
        attn = layer.attention if hasattr(layer, "attention") else layer.self_attn

        def pre(_m, _args, kwargs, i=i):
            got[i] = kwargs["position_embeddings"]

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    return got


def _hand_z(hf, arch, layer, x_normed, cos_sin):
    """TransformerLens's hook_z by hand: softmax(cap(q k^T * scale) + causal/sliding mask) v per
    head, flattened head-major to (b, s, H * d_head)."""
    b, s, _ = x_normed.shape
    rot = _rotary_fn(hf)
    if arch is Architecture.GPT_NEOX:
        attn = layer.attention
        dh = attn.head_size
        qkv = attn.query_key_value(x_normed).view(b, s, -1, 3 * dh).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        softcap, window = None, None
    else:
        attn = layer.self_attn
        dh = attn.head_dim
        q = attn.q_proj(x_normed).view(b, s, -1, dh)
        k = attn.k_proj(x_normed).view(b, s, -1, dh)
        v = attn.v_proj(x_normed).view(b, s, -1, dh).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3: per-head RMSNorm of q and k before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        # Gemma 2 soft-caps the attention logits; Gemma 3 does not (its config field is unused)
        softcap = attn.attn_logit_softcapping if arch is Architecture.GEMMA2 else None
        window = getattr(attn, "sliding_window", None)
    q, k = rot(q, k, *cos_sin)
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(-1, -2) * attn.scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(s).unsqueeze(1)
    j = torch.arange(s).unsqueeze(0)
    visible = (j <= i) & ((i - j < window) if window is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    z = torch.softmax(scores, dim=-1) @ v  # (b, H, s, dh)
    return z.transpose(1, 2).reshape(b, s, -1)


@torch.no_grad()
def _hand_hooks(hf, arch) -> dict[str, torch.Tensor]:
    """Every TransformerLens hook of the table for IDS, computed from the weights and modules."""
    inner = hf.gpt_neox if arch is Architecture.GPT_NEOX else hf.model
    layers = inner.layers
    cos_sin = _position_embeddings(hf, layers)
    w_e = hf.get_input_embeddings().weight
    scale = math.sqrt(hf.config.hidden_size) if arch.post_norms else 1.0
    x = w_e[IDS] * torch.tensor(scale, dtype=w_e.dtype)
    hooks = {"hook_embed": x, "blocks.0.hook_resid_pre": x}
    parallel = bool(getattr(hf.config, "use_parallel_residual", False))
    for n, layer in enumerate(layers):
        hooks[f"blocks.{n}.hook_resid_pre"] = x
        if arch is Architecture.GPT_NEOX:
            z = _hand_z(hf, arch, layer, layer.input_layernorm(x), cos_sin[n])
            attn = layer.attention.dense(z)
            mlp_in = layer.post_attention_layernorm(x if parallel else x + attn)
            mlp = layer.mlp(mlp_in)
        elif arch.post_norms:
            z = _hand_z(hf, arch, layer, layer.input_layernorm(x), cos_sin[n])
            attn = layer.post_attention_layernorm(layer.self_attn.o_proj(z))
            mlp = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x + attn)))
        else:
            z = _hand_z(hf, arch, layer, layer.input_layernorm(x), cos_sin[n])
            attn = layer.self_attn.o_proj(z)
            mlp = layer.mlp(layer.post_attention_layernorm(x + attn))
        x = x + attn + mlp
        hooks |= {
            f"blocks.{n}.attn.hook_z": z,
            f"blocks.{n}.hook_attn_out": attn,
            f"blocks.{n}.hook_mlp_out": mlp,
            f"blocks.{n}.hook_resid_post": x,
        }
    return hooks


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_model(request, tmp_path_factory):
    path = saved(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    return request.param, load_model(path, device="cpu", dtype=torch.float64)


def test_every_hook_row_is_its_site_tensor(family_model):
    family, loaded = family_model
    arch = loaded.architecture
    expected_arch = {"gemma2": Architecture.GEMMA2, "gemma3": Architecture.GEMMA3}
    assert arch is expected_arch.get(
        family, Architecture.GPT_NEOX if "neox" in family else Architecture.LLAMA
    )
    hand = _hand_hooks(loaded.hf_model, arch)
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), loaded.lm.trace(IDS):
        for s in loaded.all_sites:
            acts[s.name] = save(get_activation(loaded.lm, s))
        logits = save(loaded.lm.output.logits)
    # the forward was not changed by reading the sites, and the last hook feeds the unembedding
    with torch.no_grad():
        assert torch.equal(logits, loaded.hf_model(input_ids=IDS).logits)
    n_layers = loaded.n_layers
    rows = 0
    for hook, tensor in hand.items():
        site = site_for_hook(hook, arch, n_layers=n_layers)
        got = acts[site]
        assert got.shape == tensor.shape, (family, hook, site)
        err = (got - tensor).abs().max().item()
        # float64 models; 1e-6: eager attention takes its softmax in float32 (Gemma)
        assert err < 1e-6 * max(1.0, tensor.abs().max().item()), (family, hook, site, err)
        rows += 1
    assert rows == 1 + 5 * n_layers  # blocks.0.hook_resid_pre is one of the per-layer hooks
    # every table row was exercised (with L replaced by a layer), and documents this architecture

    def row(h: str) -> str:
        return h if h == "blocks.0.hook_resid_pre" else re.sub(r"^blocks\.\d+\.", "blocks.L.", h)

    assert {r.hook for r in HOOK_TABLE} == {row(h) for h in hand}
    assert all(arch in r.tensor for r in HOOK_TABLE)
    # the site tensor differs from its neighbours (the check above is not vacuous): Gemma's attn_L is
    # the post-normed attention output, not the attention module's output
    if arch.post_norms:
        with torch.no_grad(), loaded.lm.trace(IDS):
            raw = save(loaded.lm.model.layers[1].self_attn.output[0])
        assert (raw - acts["attn_1"]).abs().max() > 1e-3


def test_final_resid_feeds_the_final_norm(family_model):
    _family, loaded = family_model
    hf = loaded.hf_model
    inner = hf.gpt_neox if loaded.architecture is Architecture.GPT_NEOX else hf.model
    norm = inner.final_layer_norm if hasattr(inner, "final_layer_norm") else inner.norm
    got = {}
    h = norm.register_forward_pre_hook(lambda _m, args: got.setdefault("x", args[0]))
    try:
        with torch.no_grad(), loaded.lm.trace(IDS):
            last = save(get_activation(loaded.lm, loaded.last_resid))
    finally:
        h.remove()
    assert torch.equal(got["x"], last)


def test_hook_names():
    for arch in Architecture:
        assert site_for_hook("hook_embed", arch) == "embed"
        assert site_for_hook("blocks.0.hook_resid_pre", arch) == "embed"
        assert site_for_hook("blocks.4.hook_resid_pre", arch) == "resid_3"
        assert site_for_hook("blocks.4.hook_resid_post", arch) == "resid_4"
        assert site_for_hook("blocks.4.hook_attn_out", arch) == "attn_4"
        assert site_for_hook("blocks.4.hook_mlp_out", arch) == "mlp_4"
        assert site_for_hook("blocks.4.attn.hook_z", arch.value) == "attn_z_4"
        for site in ("embed", "attn_z_2", "attn_2", "mlp_2", "resid_2"):
            assert site_for_hook(hook_for_site(site, arch), arch) == site
    assert Site.parse("attn_z_12") == (Site.parse("attn_z_12")[0], 12)
    assert Site.rank_of("attn_z_1") < Site.rank_of("attn_1") < Site.rank_of("mlp_1")
    assert Site.rank_of("resid_0") < Site.rank_of("attn_z_1")
    assert Site.format("attn_z", 3) == "attn_z_3"


@pytest.mark.parametrize(
    ("hook", "match"),
    [
        ("blocks.2.hook_resid_mid", "hook_resid_mid.*no site"),
        ("blocks.2.hook_mlp_in", "no site"),
        ("blocks.2.attn.hook_q", "no site"),
        ("blocks.2.attn.hook_pattern", "no site"),
        ("blocks.2.mlp.hook_post", "no site"),
        ("blocks.2.ln1.hook_normalized", "no site"),
        ("ln_final.hook_normalized", "no site"),
        ("hook_pos_embed", "no site"),
        ("blocks.x.hook_resid_post", "not a TransformerLens hook"),
        ("resid_3", "not a TransformerLens hook"),
        ("blocks.7.hook_resid_post", "layer 7 does not exist"),
    ],
)
def test_hooks_without_a_site_are_refused(hook, match):
    with pytest.raises(ConfigError, match=match):
        site_for_hook(hook, Architecture.GEMMA2, n_layers=3)


def test_docs_table_lists_every_row():
    """docs/hooks.md shows HOOK_TABLE: every (hook, site, module tensor) row of every family."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "hooks.md").read_text()
    for row in HOOK_TABLE:
        for arch in (Architecture.GPT_NEOX, Architecture.LLAMA, Architecture.GEMMA2):
            assert f"| `{row.hook}` | `{row.site}` | {row.tensor[arch]} |" in text, (row.hook, arch)
