"""Dictionaries in the Marks et al. layout (``dictionary_learning.AutoEncoder``): the adapter,
loading and saving, and the named sets (docs/algorithms.md, "Dictionaries and the error node").

Layout: ``<root>/<model dir>/{embed,attn_out_layerL,mlp_out_layerL,resid_out_layerL}/<dict id>/ae.pt``
(the Marks release, ``dict id`` = ``10_32768``) or ``ae.safetensors`` (what this project writes).
Checkpoints are loaded safely: safetensors, or ``torch.load(weights_only=True)``.

The autoencoder is ``f = ReLU(W_enc (x - b_dec) + b_enc)``, ``decode(f) = W_dec f + b_dec``, so
its decoder directions are the columns of ``W_dec`` (:meth:`MarksAutoEncoder.decoder_directions`).

:func:`load_dictionaries` is the one dispatcher of ``--saes``: ``embedded``, ``marks``, a Marks-layout
directory (this module), ``neurons`` (identity dictionaries), and SAELens SAEs
(:mod:`feature_circuits.dictionaries.saelens`): ``saelens:RELEASE[/SAE_ID],...``, one directory in
sae_lens's format (``cfg.json`` + ``sae_weights.safetensors``) or a directory of them. Every
dictionary it returns carries a :class:`~feature_circuits.dictionary_info.DictionaryInfo` (``.info``:
what circuit.json records per site, :func:`dictionary_infos`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from dictionary_learning import AutoEncoder
from torch import Tensor

from feature_circuits import toy
from feature_circuits.dictionaries.base import Dictionary
from feature_circuits.dictionaries.download import DEFAULT_DICT_ID, DEFAULT_MODEL_DIR, marks_sae_root
from feature_circuits.dictionaries.identity import IdentityDictionary
from feature_circuits.dictionary_info import DictionaryInfo
from feature_circuits.errors import DictionaryError
from feature_circuits.types import Site, SiteKind

if TYPE_CHECKING:
    from feature_circuits.model.loading import LoadedModel

__all__ = [
    "KNOWN_SAES",
    "MarksAutoEncoder",
    "SAESource",
    "dictionary_infos",
    "find_checkpoint",
    "is_saelens_source",
    "load_autoencoder",
    "load_dictionaries",
    "resolve_sae_source",
    "save_autoencoder",
]

_KEYS = ("bias", "encoder.weight", "encoder.bias", "decoder.weight")


@dataclass(frozen=True, kw_only=True)
class SAESource:
    """Where a set of dictionaries lives: ``root/model_dir/<site>/<dict_id>/ae.*``."""

    root: Path
    model_dir: str
    dict_id: str | None = None  # None: the single sub-directory of each site directory
    #: what to tell a user when ``root/model_dir`` is missing (e.g. how to download it)
    missing_hint: str | None = None


def _embedded_saes() -> SAESource:
    return SAESource(root=toy.SAE_ROOT, model_dir=toy.MODEL_NAME)


def _marks_saes() -> SAESource:
    return SAESource(
        root=marks_sae_root(),
        model_dir=DEFAULT_MODEL_DIR,
        dict_id=DEFAULT_DICT_ID,
        missing_hint="download them first with `feature-circuits download-saes` "
        "(scripts/download_saes.py; needs the Hugging Face hub)",
    )


#: Known dictionary sets (SAELens-style short names), each resolved when used (the Marks root
#: follows ``$FEATURE_CIRCUITS_SAES`` at call time). ``neurons`` (identity dictionaries) is handled
#: by :func:`resolve_sae_source`.
KNOWN_SAES: dict[str, Callable[[], SAESource]] = {"embedded": _embedded_saes, "marks": _marks_saes}


class MarksAutoEncoder(AutoEncoder):
    """``dictionary_learning.AutoEncoder`` as a :class:`~feature_circuits.dictionaries.Dictionary`:
    the same module and state dict, plus its decoder directions read from the weights."""

    activation_dim: int
    dict_size: int
    #: what circuit.json records for it (set by :func:`load_dictionaries`)
    info: DictionaryInfo | None = None

    def decoder_directions(self, like: Tensor) -> Tensor:
        return self.decoder.weight.detach().T.to(like)

    def feature_gradients(self, x: Tensor, j: Tensor) -> Tensor:
        """``d f_j / d x`` of ``f = relu(W_enc (x - b_dec) + b_enc)``: ``W_enc[j]`` where the
        pre-activation is positive, else 0 (ReLU's derivative at 0 is 0, as in autograd)."""
        w = self.encoder.weight[j].to(x)  # (n, d)
        pre = ((x - self.bias.to(x)) * w).sum(-1) + self.encoder.bias[j].to(x)
        return w * (pre > 0).unsqueeze(-1).to(w.dtype)

    def store_decoder_row_major(self) -> None:
        """Keep ``W_dec`` (d, F) with the same shape and values but column-major storage, so that
        each feature's decoder row (a row of :meth:`decoder_directions`, (F, d)) is contiguous: the
        sparse feature path then reads the decoder rows in place (its CSR kernels want (F, d) rows)
        instead of copying the decoder. ``decode`` is the same product either way."""
        w = self.decoder.weight
        if not w.T.is_contiguous():
            w.data = w.data.T.contiguous().T


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # truncated or corrupt files
            raise DictionaryError(f"{path}: cannot read safetensors file ({err})") from err
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals, truncated files
        raise DictionaryError(f"{path}: cannot load checkpoint safely ({err})") from err
    if not isinstance(sd, Mapping):
        raise DictionaryError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return dict(sd)


def find_checkpoint(site_dir: Path, dict_id: str | None, site: str = "?") -> Path:
    if not site_dir.is_dir():
        raise DictionaryError(f"site {site}: missing dictionary directory {site_dir}")
    if dict_id is None:
        subdirs = sorted(p for p in site_dir.iterdir() if p.is_dir())
        if len(subdirs) != 1:
            raise DictionaryError(
                f"site {site}: {site_dir}: expected exactly one dictionary sub-directory, found "
                f"{[p.name for p in subdirs]}; pass dict_id"
            )
        ddir = subdirs[0]
    else:
        ddir = site_dir / dict_id
    for name in ("ae.safetensors", "ae.pt"):
        if (ddir / name).is_file():
            return ddir / name
    raise DictionaryError(f"site {site}: missing dictionary file {ddir}/ae.safetensors (or ae.pt)")


def load_autoencoder(
    path: str | Path,
    *,
    d_model: int | None = None,
    site: str = "?",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MarksAutoEncoder:
    """Load one ``AutoEncoder`` checkpoint safely, checking keys and shapes against ``d_model``."""
    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"site {site}: missing dictionary file {path}")
    try:
        sd = _read_state_dict(path)
    except DictionaryError as err:
        raise DictionaryError(f"site {site}: {err}") from err
    missing = [k for k in _KEYS if k not in sd]
    if missing:
        raise DictionaryError(f"site {site}: {path} lacks keys {missing} (has {sorted(sd)})")
    n_feat, d = sd["encoder.weight"].shape
    want = {
        "bias": (d,),
        "encoder.weight": (n_feat, d),
        "encoder.bias": (n_feat,),
        "decoder.weight": (d, n_feat),
    }
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise DictionaryError(
                f"site {site}: {path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}"
            )
    if d_model is not None and d != d_model:
        raise DictionaryError(
            f"site {site}: {path} is a dictionary for width {d}, but the model's activation there "
            f"has width {d_model}"
        )
    ae = MarksAutoEncoder(d, n_feat)
    ae.load_state_dict({k: sd[k] for k in _KEYS})
    ae.to(device=device, dtype=dtype).eval()
    ae.store_decoder_row_major()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae


def resolve_sae_source(saes: str | Path | SAESource | None, model_dir: str | None = None) -> SAESource | None:
    """``None``/``embedded`` -> shipped SAEs; ``marks`` -> downloaded Pythia-70M SAEs; ``neurons`` ->
    None (identity dictionaries); a path -> a Marks-layout root (``model_dir`` the sub-directory; if
    omitted and the path holds exactly one sub-directory, that one; a path that directly holds the
    site directories also works)."""
    if isinstance(saes, SAESource):
        return saes
    name = "embedded" if saes is None else str(saes)
    if name == "neurons":
        return None
    if name in KNOWN_SAES:
        return KNOWN_SAES[name]()
    root = Path(name)
    if not root.is_dir():
        raise DictionaryError(
            f"SAE root {root} does not exist (known names: {[*sorted(KNOWN_SAES), 'neurons']}, "
            "or saelens:RELEASE[/SAE_ID],... for SAELens SAEs)"
        )
    if (root / "embed").is_dir():
        return SAESource(root=root.parent, model_dir=root.name)
    if model_dir is None:
        subdirs = [p.name for p in root.iterdir() if p.is_dir()]
        if len(subdirs) != 1:
            raise DictionaryError(f"{root}: pass the model sub-directory (found {subdirs})")
        model_dir = subdirs[0]
    return SAESource(root=root, model_dir=model_dir)


#: Neuronpedia's name of each site kind in the Marks et al. Pythia-70M release (P70D-SM); the
#: embedding has no layer-indexed page there.
_NEURONPEDIA_KIND = {SiteKind.RESID: "res", SiteKind.ATTN: "att", SiteKind.MLP: "mlp"}


def _marks_neuronpedia(site: Site) -> str | None:
    kind = _NEURONPEDIA_KIND.get(site.kind)
    return None if kind is None else f"pythia-70m-deduped/{site.layer}-{kind}-sm"


def is_saelens_source(saes: str | Path | SAESource | None) -> bool:
    """Whether ``saes`` names SAELens SAEs: ``saelens:...``, a directory in sae_lens's format, or a
    directory of such directories."""
    if saes is None or isinstance(saes, SAESource):
        return False
    from feature_circuits.dictionaries.registry import is_saelens_spec

    name = str(saes)
    if is_saelens_spec(name):
        return True
    if name in KNOWN_SAES or name == "neurons":
        return False
    from feature_circuits.dictionaries.saelens import saelens_dirs

    return bool(saelens_dirs(Path(name)))


def load_dictionaries(
    sites: Iterable[Site],
    saes: str | Path | SAESource | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model: LoadedModel | None = None,
) -> dict[str, Dictionary]:
    """One dictionary per site name, from any ``--saes`` value: ``embedded`` (default), ``marks``, a
    Marks-layout directory, ``neurons`` (identity dictionaries), or SAELens SAEs
    (``saelens:RELEASE[/SAE_ID],...``, a sae_lens directory or a directory of them; these need
    ``model``, and cover only the sites they were trained on). Each dictionary has ``.info``
    (:class:`~feature_circuits.dictionary_info.DictionaryInfo`).

    For a ``model`` split over devices (loaded with a ``device_map``), each site's dictionary goes
    on the device of that site's activation (:meth:`LoadedModel.site_device`: the splice adds the
    dictionary's output to the module's), not on ``device``."""

    def site_device(name: str) -> torch.device | str:
        if model is None or not model.site_devices:
            return device
        return model.site_device(name)

    if is_saelens_source(saes):
        if model is None:
            raise DictionaryError(f"--saes {saes}: SAELens SAEs are resolved against the model; pass model=")
        from feature_circuits.dictionaries.saelens import load_saelens

        sae_dicts = load_saelens(str(saes), model, device=device, dtype=dtype)
        for name, sae_dict in sae_dicts.items():
            where = torch.device(site_device(name))
            if where != torch.device(device):
                # the sae_lens SAE holds every weight, and its own .to() keeps its cfg.device in step
                sae_dict.sae.to(device=where)
        return dict(sae_dicts)
    source = resolve_sae_source(saes)
    if source is not None and source.missing_hint and not (source.root / source.model_dir).is_dir():
        raise DictionaryError(
            f"the dictionaries are not under {source.root / source.model_dir}: {source.missing_hint}"
        )
    real_marks = str(saes) == "marks" and (model is None or "pythia-70m" in model.name.lower())
    out: dict[str, Dictionary] = {}
    for site in sites:
        if source is None:
            ident = IdentityDictionary(site.d_model).to(device=site_device(site.name), dtype=dtype)
            ident.info = DictionaryInfo(kind="identity", source="neurons", n_features=site.d_model)
            out[site.name] = ident
            continue
        ckpt = find_checkpoint(source.root / source.model_dir / site.marks_dir, source.dict_id, site.name)
        ae = load_autoencoder(
            ckpt, d_model=site.d_model, site=site.name, device=site_device(site.name), dtype=dtype
        )
        ae.info = DictionaryInfo(
            kind="marks",
            source=str(ckpt.parent),
            n_features=int(ae.dict_size),
            architecture="standard",
            neuronpedia=_marks_neuronpedia(site) if real_marks else None,
        )
        out[site.name] = ae
    return out


def dictionary_infos(dictionaries: Mapping[str, Dictionary]) -> dict[str, DictionaryInfo]:
    """What circuit.json records per site (``Circuit.dictionaries``): each dictionary's ``.info``, or
    a description from its type and size for a dictionary that has none."""
    out: dict[str, DictionaryInfo] = {}
    for name, ae in dictionaries.items():
        info = getattr(ae, "info", None)
        if not isinstance(info, DictionaryInfo):
            info = DictionaryInfo(kind=type(ae).__name__, source="?", n_features=int(ae.dict_size))
        out[name] = info
    return out


def save_autoencoder(ae: AutoEncoder, path: str | Path) -> None:
    """Write an AutoEncoder as ``ae.safetensors`` (what this project ships)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = ae.state_dict()
    save_file({k: sd[k].detach().contiguous().cpu() for k in _KEYS}, str(path))
