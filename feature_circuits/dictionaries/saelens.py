"""SAELens SAEs as dictionaries, through ``sae_lens`` itself (docs/algorithms.md, "SAELens SAEs").

    dicts = load_saelens("saelens:pythia-70m-deduped-res-sm", loaded)   # registry, via the HF cache
    dicts = load_saelens(Path("my_saes/"), loaded)   # cfg.json + sae_weights.safetensors (or a dir of them)

Every SAE is loaded by sae_lens's own classes (``SAE.from_pretrained`` for a registry SAE,
``SAE.load_from_disk`` for a directory), so every architecture sae_lens loads that the splice can
use exactly is supported: ``standard`` (ReLU), ``jumprelu`` (also what BatchTopK and Matryoshka
training save), ``topk``, ``abstopk`` and ``gated``. :class:`SAELensDictionary` wraps the SAE
(same module, same weights) and calls its ``encode`` / ``decode``; each SAE is moved to the model's
dtype and device. Refused, with a :class:`~feature_circuits.errors.DictionaryError` naming the SAE:

* transcoders and other SAEs that read one hook and write another (a site's dictionary must
  reconstruct the tensor it reads), temporal SAEs, architectures not listed above;
* run-time activation normalisation (``layer_norm``, ``constant_norm_rescale``, an unfolded
  ``expected_average_only_in`` or ``covariance_whitening``): their decode depends on the input's
  statistics, not on the features alone, so it is not affine in ``f`` (``from_pretrained`` folds
  a known ``norm_scaling_factor`` into the weights, and such SAEs are accepted);
* single-head SAEs (``hook_head_index``): a site holds every head;
* a decoder that a numerical probe at load time finds not affine in ``f``.

``hook_z`` SAEs see the site tensor ``attn_z_L`` (b, s, n_heads * d_head) directly: their
hook_z reshaping (``reshape_activations="hook_z"``) is turned off, since the site is already the
flattened head-major tensor sae_lens's reshaping produces.

The decoder directions (:meth:`SAELensDictionary.decoder_directions`) are ``W_dec`` rows, or, for a
TopK SAE with ``rescale_acts_by_decoder_norm``, the unit-norm rows; the probe checks that they are
``decode(e_k) - decode(0)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from feature_circuits.dictionaries.registry import (
    INSTALL_HINT,
    RegistrySAE,
    check_one_per_site,
    is_saelens_spec,
    resolve_saelens_spec,
)
from feature_circuits.dictionary_info import DictionaryInfo
from feature_circuits.errors import DictionaryError

if TYPE_CHECKING:
    from feature_circuits.model.loading import LoadedModel

__all__ = [
    "SAELENS_CFG",
    "SAELENS_WEIGHTS",
    "SUPPORTED_ARCHITECTURES",
    "SAELensDictionary",
    "is_saelens_dir",
    "load_saelens",
    "saelens_dirs",
    "wrap_sae",
]

#: sae_lens's on-disk file names.
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
#: Inference architectures whose encode/decode the splice uses exactly.
SUPPORTED_ARCHITECTURES = ("standard", "jumprelu", "topk", "abstopk", "gated")
_N_PROBE = 8


def _sae_lens() -> Any:
    try:
        import sae_lens
    except ImportError as err:
        raise DictionaryError(f"SAELens SAEs need the sae_lens package; {INSTALL_HINT} ({err})") from err
    return sae_lens


class SAELensDictionary(nn.Module):
    """A sae_lens ``SAE`` as a :class:`~feature_circuits.dictionaries.Dictionary`: its own
    ``encode`` / ``decode`` on the site tensor, its decoder directions, and what it is
    (:attr:`info`, recorded in circuit.json)."""

    sae: Any  # a sae_lens SAE (an nn.Module; typed Any: sae_lens is optional)

    def __init__(self, sae: nn.Module, *, name: str, info: DictionaryInfo, directions: str = "W_dec"):
        super().__init__()
        self.sae = sae
        self.name = name
        self.info = info
        cfg: Any = getattr(sae, "cfg")  # noqa: B009 (sae_lens SAEs have a cfg; typed Any here)
        self.dict_size = int(cfg.d_sae)
        self.activation_dim = int(cfg.d_in)
        self._directions = directions

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode(x)

    def decode(self, f: Tensor) -> Tensor:
        return self.sae.decode(f)

    def _direction_rows(self) -> Tensor:
        w = self.sae.W_dec.detach()
        if self._directions == "unit":
            return w / w.norm(dim=-1, keepdim=True)
        return w

    def decoder_directions(self, like: Tensor) -> Tensor:
        return self._direction_rows().to(dtype=like.dtype, device=like.device)

    def forward(self, x: Tensor, output_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat


def _tolerance(dtype: torch.dtype) -> float:
    return 64 * float(torch.finfo(dtype).eps)


@torch.no_grad()
def _probe(ae: SAELensDictionary) -> None:
    """Check that decode is affine in f and that the decoder directions are decode(e_k) - decode(0)
    (on a few features); DictionaryError naming the SAE otherwise."""
    w = ae.sae.W_dec
    n = ae.dict_size
    gen = torch.Generator().manual_seed(0)
    ks = torch.randperm(n, generator=gen)[: min(_N_PROBE, n)].to(w.device)
    eye = torch.zeros(len(ks), n, dtype=w.dtype, device=w.device)
    eye[torch.arange(len(ks), device=w.device), ks] = 1
    zero = torch.zeros(1, n, dtype=w.dtype, device=w.device)
    d0 = ae.decode(zero)
    rows = ae.decode(eye) - d0
    want = ae._direction_rows()[ks]
    scale = float(want.abs().max().clamp(min=1e-12))
    tol = _tolerance(w.dtype) * scale * 4
    if rows.shape != want.shape or not torch.allclose(rows, want, atol=tol, rtol=0):
        raise DictionaryError(
            f"SAELens SAE {ae.name}: decode(e_k) - decode(0) is not the decoder row k (max difference "
            f"{float((rows - want).abs().max()) if rows.shape == want.shape else 'shape'}); the splice "
            "needs a decoder affine in the features"
        )
    f1 = torch.rand(2, n, generator=gen).to(w) * (torch.rand(2, n, generator=gen) < 0.05).to(w)
    lhs = ae.decode(f1[:1] + f1[1:]) + d0
    rhs = ae.decode(f1[:1]) + ae.decode(f1[1:])
    scale = float(rhs.abs().max().clamp(min=1e-12))
    if not torch.allclose(lhs, rhs, atol=_tolerance(w.dtype) * scale * max(16, n // 64), rtol=0):
        raise DictionaryError(
            f"SAELens SAE {ae.name}: decode is not affine in the features (max deviation "
            f"{float((lhs - rhs).abs().max()):.3g}); the splice cannot use it exactly"
        )


def _check_spliceable(sae: Any, name: str) -> str:
    """Refuse what the splice cannot do exactly; returns which decoder directions the SAE has."""
    sae_lens = _sae_lens()
    cfg = sae.cfg
    arch = str(cfg.architecture())
    meta = cfg.metadata
    transcoder = getattr(sae_lens.saes, "Transcoder", None)
    if (transcoder is not None and isinstance(sae, transcoder)) or getattr(meta, "hook_name_out", None):
        raise DictionaryError(
            f"SAELens SAE {name}: a transcoder ({arch}: reads {meta.hook_name}, writes "
            f"{getattr(meta, 'hook_name_out', None) or getattr(cfg, 'hook_name_out', '?')}) is not a "
            "dictionary of one site; only SAEs that reconstruct the tensor they read can be spliced"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DictionaryError(
            f"SAELens SAE {name}: architecture {arch!r} is not supported by the splice (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; BatchTopK and Matryoshka SAEs load as jumprelu)"
        )
    norm = str(cfg.normalize_activations)
    if norm != "none":
        why = {
            "layer_norm": "decode re-applies the input's mean and std",
            "constant_norm_rescale": "decode divides by the input's norm",
            "expected_average_only_in": "its norm_scaling_factor was not folded into the weights "
            "(the registry lists none for it)",
            "covariance_whitening": "its whitening was not folded into the weights (fold it with "
            "sae.fold_activation_whitening and save the SAE again)",
        }.get(norm, "its decode depends on the input")
        raise DictionaryError(
            f"SAELens SAE {name}: activation normalisation {norm!r} cannot be spliced exactly: {why}, "
            "so decode is not a function of the features alone"
        )
    head = getattr(meta, "hook_head_index", None)
    if head is not None:
        raise DictionaryError(
            f"SAELens SAE {name}: trained on head {head} only (hook_head_index); a site holds every head"
        )
    rescale = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
    return "unit" if rescale else "W_dec"


def wrap_sae(
    sae: Any,
    *,
    name: str,
    source: str,
    d_model: int | None = None,
    site: str = "?",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    neuronpedia: str | None = None,
) -> SAELensDictionary:
    """A loaded sae_lens SAE as a dictionary of ``site`` (width ``d_model``), on ``device`` in
    ``dtype``, checked by :func:`_check_spliceable` and the affine probe."""
    directions = _check_spliceable(sae, name)
    if getattr(sae, "hook_z_reshaping_mode", False):
        sae.turn_off_forward_pass_hook_z_reshaping()  # the attn_z site is already (b, s, H*dh)
    d_in = int(sae.cfg.d_in)
    if d_model is not None and d_in != d_model:
        raise DictionaryError(
            f"site {site}: SAELens SAE {name} has d_in {d_in}, but the model's activation there has "
            f"width {d_model}"
        )
    if device is not None or dtype is not None:
        sae = sae.to(device=device, dtype=dtype)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    meta = sae.cfg.metadata
    info = DictionaryInfo(
        kind="saelens",
        source=source,
        n_features=int(sae.cfg.d_sae),
        architecture=str(sae.cfg.architecture()),
        hook_name=getattr(meta, "hook_name", None),
        neuronpedia=neuronpedia or getattr(meta, "neuronpedia_id", None) or None,
    )
    ae = SAELensDictionary(sae, name=name, info=info, directions=directions)
    _probe(ae)
    return ae


def is_saelens_dir(path: Path) -> bool:
    """A directory in sae_lens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``)."""
    return (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file()


def saelens_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is one SAE directory, else its sub-directories that are (sorted);
    empty when neither."""
    if is_saelens_dir(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_saelens_dir(p))


def _hook_of_dir(path: Path) -> str | None:
    """The hook a saved SAE's cfg.json names (sae_lens 6: ``metadata.hook_name``; older: top level)."""
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
    except (OSError, ValueError) as err:
        raise DictionaryError(f"{path / SAELENS_CFG}: cannot read the SAE config ({err})") from err
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    return hook if isinstance(hook, str) else None


def _site_of(hook: str | None, name: str, model: LoadedModel) -> str:
    from feature_circuits.model.hooks import site_for_hook

    if not hook:
        raise DictionaryError(f"SAELens SAE {name}: its config names no hook (metadata.hook_name)")
    try:
        site = site_for_hook(hook, model.architecture, n_layers=model.n_layers)
    except ValueError as err:
        raise DictionaryError(f"SAELens SAE {name}: {err}") from err
    model.site(site)  # the model has it
    return site


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_dir(path: Path, model: LoadedModel, device: torch.device, dtype: torch.dtype) -> tuple[str, Any]:
    sae_lens = _sae_lens()
    name = str(path)
    site = _site_of(_hook_of_dir(path), name, model)
    try:
        sae = sae_lens.SAE.load_from_disk(path, device=str(device), dtype=_dtype_name(dtype))
    except DictionaryError:
        raise
    except Exception as err:  # unreadable safetensors, unknown architecture, bad cfg
        raise DictionaryError(f"SAELens SAE {name}: sae_lens cannot load it ({err})") from err
    return site, sae


def _load_registry_sae(sae_ref: RegistrySAE, device: torch.device, dtype: torch.dtype) -> Any:
    sae_lens = _sae_lens()
    try:
        return sae_lens.SAE.from_pretrained(
            sae_ref.release, sae_ref.sae_id, device=str(device), dtype=_dtype_name(dtype)
        )
    except Exception as err:  # no network / not in the HF cache, missing files
        raise DictionaryError(
            f"SAELens SAE {sae_ref.source}: cannot load it through sae_lens / the Hugging Face cache "
            f"({type(err).__name__}: {err}); it is downloaded on first use, which needs the hub"
        ) from err


def model_names(model: LoadedModel) -> list[str]:
    """Names a release's model is matched against: the --model value and the config's name_or_path."""
    cfg_name = getattr(model.hf_model.config, "_name_or_path", "") or ""
    return [n for n in (model.name, str(cfg_name)) if n]


def load_saelens(
    spec: str | Path,
    model: LoadedModel,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, SAELensDictionary]:
    """The SAELens dictionaries of ``spec`` for ``model``, by site name: ``saelens:RELEASE[/SAE_ID],...``
    (the registry; downloads through sae_lens / the HF cache), one SAE directory, or a directory of
    SAE directories. Only the sites the SAEs cover are returned (the others are not spliced)."""
    dev = torch.device(device) if device is not None else model.device
    dt = dtype if dtype is not None else model.dtype
    out: dict[str, SAELensDictionary] = {}
    if isinstance(spec, str) and is_saelens_spec(spec):
        refs = resolve_saelens_spec(
            spec,
            model_names=model_names(model),
            architecture=model.architecture,
            n_layers=model.n_layers,
            site_names=[s.name for s in model.all_sites],
        )
        resolved: list[RegistrySAE] = []
        for ref in refs:
            sae = _load_registry_sae(ref, dev, dt)
            site = ref.site or _site_of(getattr(sae.cfg.metadata, "hook_name", None), ref.source, model)
            resolved.append(replace(ref, site=site))
            check_one_per_site(resolved)
            out[site] = wrap_sae(
                sae,
                name=ref.source,
                source=ref.source,
                d_model=model.site(site).d_model,
                site=site,
                device=dev,
                dtype=dt,
                neuronpedia=ref.neuronpedia,
            )
        return _in_site_order(out, model)
    root = Path(spec)
    dirs = saelens_dirs(root)
    if not dirs:
        raise DictionaryError(
            f"{root}: no SAELens SAE here (expected {SAELENS_CFG} + {SAELENS_WEIGHTS}, or sub-directories "
            "holding them)"
        )
    owners: dict[str, Path] = {}
    for path in dirs:
        site, sae = _load_dir(path, model, dev, dt)
        if site in owners:
            raise DictionaryError(f"two SAEs for site {site}: {owners[site]} and {path}; keep one")
        owners[site] = path
        out[site] = wrap_sae(
            sae,
            name=str(path),
            source=str(path.resolve()),
            d_model=model.site(site).d_model,
            site=site,
            device=dev,
            dtype=dt,
        )
    return _in_site_order(out, model)


def _in_site_order(
    dicts: Mapping[str, SAELensDictionary], model: LoadedModel
) -> dict[str, SAELensDictionary]:
    return {s.name: dicts[s.name] for s in model.spliced_sites(dicts)}
