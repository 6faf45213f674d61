"""Sites: where SAEs are spliced into a model, and how to read/write them inside an nnsight trace
(docs/algorithms.md, "Sites"). Site names are :class:`~feature_circuits.types.Site`'s.

GPT-NeoX (Pythia): ``embed`` = ``gpt_neox.embed_in``, ``attn_l`` = ``gpt_neox.layers[l].attention``
(output[0]), ``mlp_l`` = ``gpt_neox.layers[l].mlp``, ``resid_l`` = ``gpt_neox.layers[l]``.
Llama family (Llama, Qwen2, SmolLM, Mistral, Gemma naming): ``model.embed_tokens``,
``model.layers[l].self_attn`` (output[0]), ``model.layers[l].mlp``, ``model.layers[l]``.
Whether a module returns a tuple is detected by running the model once, never assumed
(in transformers 5 decoder layers return a plain tensor: ``output[0]`` would be batch element 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from feature_circuits.errors import ConfigError, UnsupportedModelError
from feature_circuits.types import Architecture, Site, SiteKind

if TYPE_CHECKING:
    from nnsight import LanguageModel

_T = TypeVar("_T")

_PATHS = {
    Architecture.GPT_NEOX: ("gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp"),
    Architecture.LLAMA: ("model.embed_tokens", "model.layers", "self_attn", "mlp"),
}


def detect_architecture(model: nn.Module) -> Architecture:
    """GPT-NeoX if the model has ``gpt_neox``; Llama-family if it has ``model.layers`` with
    ``self_attn`` and ``mlp`` children."""
    if hasattr(model, "gpt_neox"):
        return Architecture.GPT_NEOX
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and len(layers) and hasattr(layers[0], "self_attn") and hasattr(layers[0], "mlp"):
        return Architecture.LLAMA
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedModelError(
        f"unsupported model architecture {model_type!r}: feature_circuits knows GPT-NeoX (Pythia) and "
        "Llama-family models (model.layers[l].self_attn / .mlp)"
    )


def get_submodule(root: Any, path: str) -> Any:
    """Follow a dotted path (``gpt_neox.layers.3.mlp``) on a torch module or an nnsight envoy
    (``Any``: an envoy's attributes are the wrapped model's, resolved at run time)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def num_layers(model: nn.Module) -> int:
    arch = detect_architecture(model)
    return len(get_submodule(model, _PATHS[arch][1]))


def _site_specs(model: nn.Module) -> list[tuple[str, SiteKind, int, str]]:
    arch = detect_architecture(model)
    embed, layers, attn, mlp = _PATHS[arch]
    specs = [(Site.format(SiteKind.EMBED, -1), SiteKind.EMBED, -1, embed)]
    for layer in range(num_layers(model)):
        for kind, path in (
            (SiteKind.ATTN, f"{layers}.{layer}.{attn}"),
            (SiteKind.MLP, f"{layers}.{layer}.{mlp}"),
            (SiteKind.RESID, f"{layers}.{layer}"),
        ):
            specs.append((Site.format(kind, layer), kind, layer, path))
    return specs


@torch.no_grad()
def build_sites(model: nn.Module) -> list[Site]:
    """Describe every site of ``model`` in forward order, detecting tuple outputs and widths by
    running a 2-token forward with hooks. Raises if an activation is not (b, s, d)."""
    specs = _site_specs(model)
    seen: dict[str, tuple[bool, tuple[int, ...]]] = {}
    handles = []
    for name, _kind, _layer, path in specs:

        def hook(_mod, _inp, out, name=name):
            is_tuple = isinstance(out, tuple)
            act = out[0] if is_tuple else out
            seen[name] = (is_tuple, tuple(act.shape))

        handles.append(get_submodule(model, path).register_forward_hook(hook))
    try:
        param = next(model.parameters())
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=param.device))
    finally:
        for h in handles:
            h.remove()
    sites = []
    for name, kind, layer, path in specs:
        if name not in seen:
            raise UnsupportedModelError(f"site {name} ({path}) did not run in the forward pass")
        is_tuple, shape = seen[name]
        if len(shape) != 3 or shape[:2] != (1, 2):
            raise UnsupportedModelError(
                f"site {name} ({path}) has activation shape {shape}, expected (1, 2, d)"
            )
        sites.append(
            Site(kind=kind, layer=layer, module_path=path, output_is_tuple=is_tuple, d_model=shape[2])
        )
    return sorted(sites, key=lambda s: s.rank)


def site_envoy(lm: LanguageModel, site: Site) -> Any:
    """The nnsight envoy of the site's module (its ``.output`` is readable and writable in a trace)."""
    return get_submodule(lm, site.module_path)


def get_activation(lm: LanguageModel, site: Site) -> Tensor:
    """The site's activation (b, s, d) inside a trace (``output[0]`` only for tuple outputs)."""
    out = site_envoy(lm, site).output
    return out[0] if site.output_is_tuple else out


def set_activation(lm: LanguageModel, site: Site, value: Tensor) -> None:
    """Replace the site's activation inside a trace, keeping the rest of a tuple output."""
    env = site_envoy(lm, site)
    if site.output_is_tuple:
        out = env.output
        env.output = (value, *out[1:])
    else:
        env.output = value


def save(value: _T) -> _T:
    """``nnsight.save``, typed: mark ``value`` (computed inside a trace) to be kept after it."""
    import nnsight

    return nnsight.save(value)


def site_by_name(sites: Sequence[Site], name: str) -> Site:
    """The site called ``name``; :class:`~feature_circuits.errors.ConfigError` naming the
    known sites if there is none."""
    for s in sites:
        if s.name == name:
            return s
    raise ConfigError(f"unknown site {name!r}; sites are {[s.name for s in sites]}")


def is_parallel_residual(model: nn.Module) -> bool:
    """Pythia computes attn and mlp from the same residual (attn does not feed mlp)."""
    return bool(getattr(getattr(model, "config", None), "use_parallel_residual", False))
