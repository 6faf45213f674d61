"""Loading a causal LM (HF id or local directory) and wrapping it with nnsight.

    loaded = load_model("embedded")                      # the shipped default
    loaded = load_model("EleutherAI/pythia-70m-deduped")  # the paper setup (needs the HF hub)
    loaded = load_model("/path/to/dir", before_wrap=patch_fn)

What cannot be loaded is one :class:`~feature_circuits.errors.ModelLoadError` line, checked before
transformers is asked: a local directory that is empty, lacks config.json or weights, or whose
config.json is not valid JSON or names no ``model_type``; a hub id that is not in the hub cache
while ``HF_HUB_OFFLINE`` is set (at once, with no network retries); and whatever transformers
itself refuses (its first line).

``before_wrap`` receives the HF model before nnsight wraps it: nnsight fixes each module's forward
when it wraps, so submodule rewrites (the LRP rules) must happen there (see PITFALLS.md).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from feature_circuits import toy
from feature_circuits.errors import ConfigError, ModelLoadError
from feature_circuits.model.sites import build_sites, detect_architecture, is_parallel_residual
from feature_circuits.types import Architecture, Site, SiteKind

if TYPE_CHECKING:
    from nnsight import LanguageModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Short names a user can pass instead of an HF id or a directory.
KNOWN_MODELS: dict[str, str] = {
    "embedded": str(toy.MODEL_DIR),
    "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped",
    "pythia-70m": "EleutherAI/pythia-70m",
}

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model ready for tracing: the nnsight wrapper ``lm``, the HF model it wraps, its tokenizer
    and its sites (forward order).

    ``sites`` are the default splice sites (embed, attn_L, mlp_L, resid_L); ``attn_z_sites`` the
    per-head attention sites (``attn_z_L``), spliced only where a dictionary is given for them
    (docs/algorithms.md, "Sites"). :meth:`site` finds either; :attr:`all_sites` is both, in
    forward order."""

    name: str
    lm: LanguageModel
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    architecture: Architecture
    sites: tuple[Site, ...]
    device: torch.device
    dtype: torch.dtype
    attn_z_sites: tuple[Site, ...] = ()

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError(f"LoadedModel {self.name}: no sites")

    @property
    def n_layers(self) -> int:
        return 1 + max(s.layer for s in self.sites)

    @property
    def d_model(self) -> int:
        return self.sites[0].d_model

    @property
    def parallel_residual(self) -> bool:
        return is_parallel_residual(self.hf_model)

    @property
    def last_resid(self) -> Site:
        """The residual stream after the last layer (the site that feeds the logits)."""
        return self.site(Site.format(SiteKind.RESID, self.n_layers - 1))

    @property
    def all_sites(self) -> tuple[Site, ...]:
        """Every site (default and ``attn_z``) in forward order."""
        return tuple(sorted((*self.sites, *self.attn_z_sites), key=lambda s: s.rank))

    def site(self, name: str) -> Site:
        """The site called ``name`` (:class:`~feature_circuits.errors.ConfigError` if unknown)."""
        for s in (*self.sites, *self.attn_z_sites):
            if s.name == name:
                return s
        also = f" (and attn_z_0 .. attn_z_{len(self.attn_z_sites) - 1})" if self.attn_z_sites else ""
        raise ConfigError(f"unknown site {name!r}; sites are {[s.name for s in self.sites]}{also}")

    def spliced_sites(self, names: Collection[str]) -> tuple[Site, ...]:
        """The sites among ``names`` (e.g. the keys of a dictionary set), in forward order; the
        sites a partial dictionary set leaves out are not spliced (docs/algorithms.md, "Sites")."""
        wanted = set(names)
        for n in sorted(wanted):
            self.site(n)  # ConfigError naming the known sites
        return tuple(s for s in self.all_sites if s.name in wanted)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def is_local_path(source: str) -> bool:
    """Whether ``source`` names a directory rather than a hub id: it exists, or is written as a path
    (absolute, ``./``, ``../``, ``~``, or more than one ``/``). ``org/name`` is a hub id unless such a
    directory exists."""
    if Path(source).expanduser().exists():
        return True
    windows_path = os.path.sep != "/" and os.path.sep in source
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or windows_path


#: Weight files of a saved HF model (one of them, or a sharded index, must be in its directory).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_dir(directory: str | os.PathLike[str]) -> None:
    """A local model directory must hold a config.json that is a JSON object with ``model_type``,
    and weights (:data:`WEIGHT_FILES`); :class:`ModelLoadError` naming the file otherwise."""
    d = Path(directory)
    config = d / "config.json"
    if not any(d.iterdir()):
        raise ModelLoadError(
            f"model directory {d} is empty (expected a saved HF model: config.json, weights)"
        )
    if not config.is_file():
        raise ModelLoadError(f"model directory {d} has no config.json (not a saved HF model?)")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config}: not readable ({err})") from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config}:{err.lineno}: not valid JSON ({err.msg}; truncated?)") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ModelLoadError(f"{config}: no 'model_type' (an incomplete config.json?)")
    if not any((d / w).is_file() for w in WEIGHT_FILES):
        raise ModelLoadError(f"model directory {d} has no weights (one of {', '.join(WEIGHT_FILES)})")


#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
HUB_CONNECT_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT``) opens within ``timeout``."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub_cache(repo_id: str) -> None:
    """A hub id when the hub cannot be asked (``HF_HUB_OFFLINE`` set, or no connection within
    :data:`HUB_CONNECT_TIMEOUT_S`) must be in the hub cache: :class:`ModelLoadError` at once
    otherwise, rather than after a minute of retries. Unreachable but cached: loaded offline."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError as err:
        raise ModelLoadError(
            f"could not load model {repo_id!r}: neither a directory nor a valid hub id ({err})"
        ) from None
    if hub_offline() or constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    elif hub_reachable():
        return
    else:
        reason = f"the hub ({constants.ENDPOINT}) is unreachable"
        if cached:  # load from the cache, without the retries
            constants.HF_HUB_OFFLINE = True
    if not cached:
        raise ModelLoadError(
            f"could not load model {repo_id!r}: no such directory, and not in the hub cache ({reason}); "
            "check the name, or pass a local model directory with --model"
        )


def resolve_model_name(name_or_path: str | os.PathLike | None) -> str:
    name = "embedded" if name_or_path is None else str(name_or_path)
    return KNOWN_MODELS.get(name, name)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    before_wrap: Callable[[nn.Module], object] | None = None,
) -> LoadedModel:
    """Load a causal LM by HF id, short name (``embedded``, ``pythia-70m-deduped``) or local
    directory; put it in eval mode on ``device`` in ``dtype`` (float32 by default); run
    ``before_wrap(hf_model)``; wrap with nnsight; describe its sites."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_name(name_or_path)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if is_local_path(source):
        source = str(Path(source).expanduser())
        if not Path(source).is_dir():
            hint = " (train it with `feature-circuits train-toy`)" if source == str(toy.MODEL_DIR) else ""
            raise ModelLoadError(f"model directory {source} does not exist{hint}")
        check_model_dir(source)
    else:
        check_hub_cache(source)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source)
        hf_model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    except (OSError, ValueError, KeyError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        hint = "" if is_local_path(source) else " (no network? set HF_HUB_OFFLINE=1 to fail at once)"
        raise ModelLoadError(f"could not load model {source!r}: {first}{hint}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    nn.Module.to(hf_model, dev).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    arch = detect_architecture(hf_model)
    every = build_sites(hf_model, attn_z=True)
    sites = tuple(s for s in every if s.kind is not SiteKind.ATTN_Z)
    attn_z_sites = tuple(s for s in every if s.kind is SiteKind.ATTN_Z)
    if before_wrap is not None:
        before_wrap(hf_model)
    lm = wrap(hf_model, tokenizer, dev)
    return LoadedModel(
        name=str(name_or_path or "embedded"),
        lm=lm,
        hf_model=hf_model,
        tokenizer=tokenizer,
        architecture=arch,
        sites=sites,
        device=dev,
        dtype=dt,
        attn_z_sites=attn_z_sites,
    )


def wrap(
    hf_model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device | None = None
) -> LanguageModel:
    """Wrap an in-memory HF model with nnsight (it needs the tokenizer passed explicitly).

    nnsight 0.8 builds a ``transformers.pipeline`` around the model, and a pipeline given no device
    moves the model to the first accelerator it finds: on a CUDA machine a model loaded for the CPU
    would silently end up on the GPU (and its SAEs, on the CPU, would no longer match). So the
    device is passed through (default: the device the model's parameters are on) and checked."""
    from nnsight import LanguageModel

    device = next(hf_model.parameters()).device if device is None else torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(hf_model, tokenizer=tokenizer, device=device)
    moved = {
        p.device
        for p in hf_model.parameters()
        if p.device.type != device.type or (device.index is not None and p.device.index != device.index)
    }
    if moved:
        raise ModelLoadError(
            f"wrapping the model with nnsight moved it from {device} to {sorted(map(str, moved))}"
        )
    return lm
