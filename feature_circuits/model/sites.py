"""Sites: where SAEs are spliced into a model, and how to read/write them inside an nnsight trace
(docs/algorithms.md, "Sites"). Site names are :class:`~feature_circuits.types.Site`'s; the full
table (with the TransformerLens hook each site is) is in docs/hooks.md and
:mod:`feature_circuits.model.hooks`.

GPT-NeoX (Pythia): ``embed`` = ``gpt_neox.embed_in``, ``attn_l`` = ``gpt_neox.layers[l].attention``
(output[0]), ``mlp_l`` = ``gpt_neox.layers[l].mlp``, ``resid_l`` = ``gpt_neox.layers[l]``,
``attn_z_l`` = the INPUT of ``gpt_neox.layers[l].attention.dense``.
Llama family (Llama, Qwen2, Qwen3, Mistral): ``model.embed_tokens``,
``model.layers[l].self_attn`` (output[0]), ``model.layers[l].mlp``, ``model.layers[l]``,
``attn_z_l`` = the input of ``model.layers[l].self_attn.o_proj``.
Gemma 2 / Gemma 3 (post-norms): ``attn_l`` = ``model.layers[l].post_attention_layernorm`` and
``mlp_l`` = ``model.layers[l].post_feedforward_layernorm`` (the post-normed outputs that are added
to the residual), the rest as in the Llama family (``embed_tokens`` already scales by sqrt(d_model)).
Whether a module returns a tuple is detected by running the model once, never assumed
(in transformers 5 decoder layers return a plain tensor: ``output[0]`` would be batch element 0).

``attn_z`` sites are described by :func:`build_sites` only when asked (``attn_z=True``): they are
spliced only where a dictionary is given for them (docs/algorithms.md, "Sites").
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

#: per architecture: embedding, layer list, then (relative to a layer) the modules whose output is
#: attn_l and mlp_l, and the module whose INPUT is attn_z_l
_PATHS = {
    Architecture.GPT_NEOX: ("gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp", "attention.dense"),
    Architecture.LLAMA: ("model.embed_tokens", "model.layers", "self_attn", "mlp", "self_attn.o_proj"),
    Architecture.GEMMA2: (
        "model.embed_tokens",
        "model.layers",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "self_attn.o_proj",
    ),
}
_PATHS[Architecture.GEMMA3] = _PATHS[Architecture.GEMMA2]


def detect_architecture(model: nn.Module) -> Architecture:
    """GPT-NeoX if the model has ``gpt_neox``; for ``model.layers`` with ``self_attn`` and ``mlp``
    children: Gemma 2 / Gemma 3 if the layers have post-norms (``pre_feedforward_layernorm`` and
    ``post_feedforward_layernorm``; Gemma 3 when its attention has ``q_norm`` or the config says
    gemma3), else the Llama family."""
    if hasattr(model, "gpt_neox"):
        return Architecture.GPT_NEOX
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    model_type = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    if layers is not None and len(layers) and hasattr(layers[0], "self_attn") and hasattr(layers[0], "mlp"):
        first = layers[0]
        if hasattr(first, "pre_feedforward_layernorm") and hasattr(first, "post_feedforward_layernorm"):
            gemma3 = model_type.startswith("gemma3") or hasattr(first.self_attn, "q_norm")
            return Architecture.GEMMA3 if gemma3 else Architecture.GEMMA2
        return Architecture.LLAMA
    raise UnsupportedModelError(
        f"unsupported model architecture {model_type!r}: feature_circuits knows GPT-NeoX (Pythia), "
        "Llama-family models (model.layers[l].self_attn / .mlp) and Gemma 2 / Gemma 3 text models "
        "(for a multimodal Gemma 3 checkpoint load its text model, Gemma3ForCausalLM)"
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


def _site_specs(model: nn.Module, attn_z: bool = False) -> list[tuple[str, SiteKind, int, str]]:
    arch = detect_architecture(model)
    embed, layers, attn, mlp, z = _PATHS[arch]
    specs = [(Site.format(SiteKind.EMBED, -1), SiteKind.EMBED, -1, embed)]
    for layer in range(num_layers(model)):
        kinds = [
            (SiteKind.ATTN, f"{layers}.{layer}.{attn}"),
            (SiteKind.MLP, f"{layers}.{layer}.{mlp}"),
            (SiteKind.RESID, f"{layers}.{layer}"),
        ]
        if attn_z:
            kinds.insert(0, (SiteKind.ATTN_Z, f"{layers}.{layer}.{z}"))
        for kind, path in kinds:
            specs.append((Site.format(kind, layer), kind, layer, path))
    return specs


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s input ids go: the device of its first parameter; for a model dispatched by
    accelerate (``device_map``) whose first parameter is offloaded (on ``meta``), the execution
    device of the embedding's device-alignment hook."""
    param = next(model.parameters())
    if param.device.type != "meta":
        return param.device
    embed = get_submodule(model, _PATHS[detect_architecture(model)][0])
    hook = embed.__dict__.get("_hf_hook")
    execution = getattr(hook, "execution_device", None)
    if execution is None:
        raise UnsupportedModelError(
            f"the embedding ({_PATHS[detect_architecture(model)][0]}) has its weights on the meta device "
            "and no accelerate hook that says where it runs"
        )
    return torch.device(execution)


@torch.no_grad()
def build_sites(
    model: nn.Module, *, attn_z: bool = False, devices: dict[str, torch.device] | None = None
) -> list[Site]:
    """Describe every site of ``model`` in forward order, detecting tuple outputs and widths by
    running a 2-token forward with hooks (``attn_z=True``: the ``attn_z_L`` sites too, whose
    activation is the first input of the attention output projection). Raises if an activation is
    not (b, s, d). ``devices``, when given, receives each site's name -> the device its activation
    is on in that forward (for a model split over devices with ``device_map``: where its
    dictionary must be)."""
    specs = _site_specs(model, attn_z=attn_z)
    seen: dict[str, tuple[bool, tuple[int, ...]]] = {}
    seen_device: dict[str, torch.device] = {}
    handles = []
    for name, kind, _layer, path in specs:
        module = get_submodule(model, path)
        if kind is SiteKind.ATTN_Z:

            def pre_hook(_mod, inp, name=name):
                if inp and isinstance(inp[0], Tensor):
                    seen[name] = (False, tuple(inp[0].shape))
                    seen_device[name] = inp[0].device

            handles.append(module.register_forward_pre_hook(pre_hook))
            continue

        def hook(_mod, _inp, out, name=name):
            is_tuple = isinstance(out, tuple)
            act = out[0] if is_tuple else out
            seen[name] = (is_tuple, tuple(act.shape))
            seen_device[name] = act.device

        handles.append(module.register_forward_hook(hook))
    try:
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=input_device(model)))
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
            Site(
                kind=kind,
                layer=layer,
                module_path=path,
                output_is_tuple=is_tuple,
                reads_input=kind is SiteKind.ATTN_Z,
                d_model=shape[2],
            )
        )
    if devices is not None:
        devices.update(seen_device)
    return sorted(sites, key=lambda s: s.rank)


def site_envoy(lm: LanguageModel, site: Site) -> Any:
    """The nnsight envoy of the site's module (its ``.output`` -- ``.input`` for a site that
    ``reads_input`` -- is readable and writable in a trace)."""
    return get_submodule(lm, site.module_path)


def get_activation(lm: LanguageModel, site: Site) -> Tensor:
    """The site's activation (b, s, d) inside a trace (``output[0]`` only for tuple outputs; the
    module's first input for a site that ``reads_input``)."""
    env = site_envoy(lm, site)
    if site.reads_input:
        return env.input
    out = env.output
    return out[0] if site.output_is_tuple else out


def set_activation(lm: LanguageModel, site: Site, value: Tensor) -> None:
    """Replace the site's activation inside a trace, keeping the rest of a tuple output (for a site
    that ``reads_input``: the module's first input, keeping its other arguments)."""
    env = site_envoy(lm, site)
    if site.reads_input:
        env.input = value
    elif site.output_is_tuple:
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
