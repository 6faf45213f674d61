"""TransformerLens hook names (what SAELens SAEs are trained on) -> site names (docs/hooks.md).

    site_for_hook("blocks.3.hook_resid_post", Architecture.GPT_NEOX)   # "resid_3"
    site_for_hook("blocks.0.hook_resid_pre", Architecture.GEMMA2)      # "embed"
    site_for_hook("blocks.5.attn.hook_z", Architecture.GEMMA2)         # "attn_z_5"

A hook maps to a site only where the site's tensor IS the hook's tensor (same values, same layout;
``hook_z``'s (b, s, n_heads, d_head) flattened head-major to (b, s, n_heads * d_head), as SAELens
flattens it). Every row of :data:`HOOK_TABLE` is checked numerically against a hand-computed tensor
on tiny random models (tests/model/test_hooks.py). A hook with no site (``hook_resid_mid``,
``hook_mlp_in``, ``hook_q``, ``mlp.hook_post``, ...) raises :class:`~feature_circuits.errors.ConfigError`
saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from feature_circuits.errors import ConfigError
from feature_circuits.types import Architecture, Site, SiteKind

__all__ = ["HOOK_TABLE", "HookRow", "hook_for_site", "site_for_hook"]

_NEOX, _LLAMA = Architecture.GPT_NEOX, Architecture.LLAMA
_GEMMA = (Architecture.GEMMA2, Architecture.GEMMA3)


@dataclass(frozen=True)
class HookRow:
    """One TransformerLens hook: its name pattern (``L`` = layer), the site it is (``{L}``,
    ``{L-1}`` for the layer before), and, per architecture, the nnsight module tensor that holds it."""

    hook: str
    site: str
    tensor: dict[Architecture, str]
    note: str = ""


def _gemma(text: str) -> dict[Architecture, str]:
    return {a: text for a in _GEMMA}


#: The hook table (docs/hooks.md renders it); module paths are relative to the HF CausalLM.
HOOK_TABLE: tuple[HookRow, ...] = (
    HookRow(
        "hook_embed",
        "embed",
        {
            _NEOX: "gpt_neox.embed_in output",
            _LLAMA: "model.embed_tokens output",
            **_gemma("model.embed_tokens output (already times sqrt(d_model), as TL's W_E)"),
        },
        "no positional embedding in these families (rotary), so hook_embed = blocks.0.hook_resid_pre",
    ),
    HookRow(
        "blocks.0.hook_resid_pre",
        "embed",
        {
            _NEOX: "gpt_neox.embed_in output (emb_dropout is the identity in eval mode)",
            _LLAMA: "model.embed_tokens output",
            **_gemma("model.embed_tokens output (scaled by sqrt(d_model))"),
        },
        "the input of layer 0",
    ),
    HookRow(
        "blocks.L.hook_resid_pre",
        "resid_{L-1}",
        {
            _NEOX: "gpt_neox.layers[L-1] output",
            _LLAMA: "model.layers[L-1] output",
            **_gemma("model.layers[L-1] output"),
        },
        "L >= 1: the input of layer L is the output of layer L-1",
    ),
    HookRow(
        "blocks.L.hook_resid_post",
        "resid_{L}",
        {
            _NEOX: "gpt_neox.layers[L] output",
            _LLAMA: "model.layers[L] output",
            **_gemma("model.layers[L] output"),
        },
        "before the final norm for the last layer",
    ),
    HookRow(
        "blocks.L.attn.hook_z",
        "attn_z_{L}",
        {
            _NEOX: "gpt_neox.layers[L].attention.dense INPUT (b, s, H*dh)",
            _LLAMA: "model.layers[L].self_attn.o_proj INPUT (b, s, H*dh)",
            **_gemma("model.layers[L].self_attn.o_proj INPUT (b, s, H*dh)"),
        },
        "per-head outputs before the output projection, flattened head-major (index h*d_head + i)",
    ),
    HookRow(
        "blocks.L.hook_attn_out",
        "attn_{L}",
        {
            _NEOX: "gpt_neox.layers[L].attention output[0] (after dense, with its bias)",
            _LLAMA: "model.layers[L].self_attn output[0] (after o_proj)",
            **_gemma("model.layers[L].post_attention_layernorm output (the post-normed attention output)"),
        },
        "what the attention adds to the residual stream (Gemma: after the post-attention norm)",
    ),
    HookRow(
        "blocks.L.hook_mlp_out",
        "mlp_{L}",
        {
            _NEOX: "gpt_neox.layers[L].mlp output",
            _LLAMA: "model.layers[L].mlp output",
            **_gemma("model.layers[L].post_feedforward_layernorm output (the post-normed MLP output)"),
        },
        "what the MLP adds to the residual stream (Gemma: after the post-feedforward norm)",
    ),
)

#: Hooks that exist in TransformerLens but are no site here, and why.
NO_SITE: dict[str, str] = {
    "hook_resid_mid": (
        "resid_pre + attn_out (the residual stream between attention and MLP) is not a site: splice "
        "the attention output (hook_attn_out) or the residual after the layer (hook_resid_post) instead"
    ),
    "hook_mlp_in": "the MLP input is not a site (sites are what a layer adds to the residual stream)",
    "hook_attn_in": "the attention input is not a site",
    "hook_q": "per-head queries are not a site (only hook_z is)",
    "hook_k": "per-head keys are not a site (only hook_z is)",
    "hook_v": "per-head values are not a site (only hook_z is)",
    "hook_pattern": "attention patterns are not a site",
    "hook_attn_scores": "attention scores are not a site",
    "hook_result": "per-head outputs after the output projection are not a site (use hook_z)",
    "hook_pre": "MLP hidden pre-activations are not a site (transcoders/neurons are not supported)",
    "hook_post": "MLP hidden activations are not a site (transcoders/neurons are not supported)",
    "hook_normalized": "norm outputs are not a site",
    "hook_scale": "norm scales are not a site",
    "hook_pos_embed": "these model families have no positional embedding (rotary)",
}

_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(?:(attn|mlp|ln\d(?:_post)?|ln_final)\.)?(hook_\w+)$")
_BY_SUFFIX = {
    ("", "hook_resid_pre"): SiteKind.RESID,
    ("", "hook_resid_post"): SiteKind.RESID,
    ("", "hook_attn_out"): SiteKind.ATTN,
    ("", "hook_mlp_out"): SiteKind.MLP,
    ("attn", "hook_z"): SiteKind.ATTN_Z,
}


def _no_site(hook_name: str, suffix: str) -> ConfigError:
    why = NO_SITE.get(suffix, "no site holds this tensor")
    known = ", ".join(r.hook for r in HOOK_TABLE)
    return ConfigError(f"TransformerLens hook {hook_name!r} has no site: {why} (hooks with a site: {known})")


def site_for_hook(hook_name: str, architecture: Architecture | str, *, n_layers: int | None = None) -> str:
    """The site name whose tensor is the TransformerLens hook ``hook_name`` in a model of
    ``architecture`` (docs/hooks.md); with ``n_layers``, the layer must exist.
    :class:`~feature_circuits.errors.ConfigError` for a hook with no site, a malformed name or a
    layer out of range."""
    Architecture(architecture)  # the mapping is the same for every known family (docs/hooks.md)
    if not isinstance(hook_name, str):
        raise ConfigError(f"hook name must be a string, got {hook_name!r}")
    name = hook_name.strip()
    if name == "hook_embed":
        return Site.format(SiteKind.EMBED, -1)
    if name.startswith("ln_final.") or name in ("hook_pos_embed", "hook_tokens"):
        raise _no_site(hook_name, name.rsplit(".", 1)[-1])
    m = _LAYER_HOOK.match(name)
    if m is None:
        raise ConfigError(
            f"not a TransformerLens hook name: {hook_name!r} (expected e.g. blocks.3.hook_resid_post, "
            "blocks.3.attn.hook_z, hook_embed)"
        )
    layer, sub, suffix = int(m.group(1)), m.group(2) or "", m.group(3)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ConfigError(
            f"hook {hook_name!r}: layer {layer} does not exist (the model has {n_layers} layers)"
        )
    kind = _BY_SUFFIX.get((sub, suffix))
    if kind is None:
        raise _no_site(hook_name, suffix)
    if suffix == "hook_resid_pre":
        # no positional embedding, no embedding norm in these families: resid_pre.0 is the embedding
        return Site.format(SiteKind.EMBED, -1) if layer == 0 else Site.format(SiteKind.RESID, layer - 1)
    return Site.format(kind, layer)


def hook_for_site(site: str, architecture: Architecture | str) -> str:
    """The TransformerLens hook name of a site (the inverse of :func:`site_for_hook`; ``embed`` ->
    ``hook_embed``, ``resid_L`` -> ``blocks.L.hook_resid_post``)."""
    Architecture(architecture)
    kind, layer = Site.parse(site)
    return {
        SiteKind.EMBED: "hook_embed",
        SiteKind.RESID: f"blocks.{layer}.hook_resid_post",
        SiteKind.ATTN: f"blocks.{layer}.hook_attn_out",
        SiteKind.MLP: f"blocks.{layer}.hook_mlp_out",
        SiteKind.ATTN_Z: f"blocks.{layer}.attn.hook_z",
    }[kind]
