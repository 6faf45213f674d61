"""Loading a causal LM (HF id or local directory) and wrapping it with nnsight.

    loaded = load_model("embedded")                      # the shipped default
    loaded = load_model("EleutherAI/pythia-70m-deduped")  # the paper setup (needs the HF hub)
    loaded = load_model("/path/to/dir", before_wrap=patch_fn)
    loaded = load_model("/path/to/big", device_map="auto", offload_folder="offload")  # split (accelerate)

What cannot be loaded is one :class:`~feature_circuits.errors.ModelLoadError` line, checked before
transformers is asked: a local directory that is empty, lacks config.json or weights, or whose
config.json is not valid JSON or names no ``model_type``; a hub id that is not in the hub cache
while ``HF_HUB_OFFLINE`` is set (at once, with no network retries); and whatever transformers
itself refuses (its first line).

``before_wrap`` receives the HF model before nnsight wraps it: nnsight fixes each module's forward
when it wraps, so submodule rewrites (the LRP rules) must happen there (see PITFALLS.md).

``device_map`` (a model that does not fit one device; docs/methods.md, "Models that do not fit one
device") is handed to ``from_pretrained`` in place of the move to ``device``: accelerate places each
module on a GPU, the CPU or the disk (``offload_folder``) and installs the hooks that move weights
and activations; nnsight 0.8 runs those hooks around its own. The loader then records, from its
probe forward, the device each site's activation is on (:attr:`LoadedModel.site_devices`: where
that site's dictionary goes) and sets :attr:`LoadedModel.device` to the embedding's (where input ids
go). ``device_map=None`` (the default) is the single-device path, unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from feature_circuits import toy
from feature_circuits.errors import ConfigError, ModelLoadError
from feature_circuits.model.sites import build_sites, detect_architecture, input_device, is_parallel_residual
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
    forward order.

    ``device`` is where input ids go (the model's device; with a ``device_map``, the embedding's).
    ``device_map`` is accelerate's placement (``hf_device_map``: module path -> device, ``"cpu"`` or
    ``"disk"``) when the model was loaded with one, else None; ``site_devices`` then maps each site to
    the device its activation is on (:meth:`site_device`; empty: every site is on ``device``).
    ``tensor_parallel``: the number of ranks the weights are sharded over (transformers tensor
    parallelism under torchrun; 1: not sharded)."""

    name: str
    lm: LanguageModel
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    architecture: Architecture
    sites: tuple[Site, ...]
    device: torch.device
    dtype: torch.dtype
    attn_z_sites: tuple[Site, ...] = ()
    device_map: Mapping[str, str | int] | None = None
    site_devices: Mapping[str, torch.device] = field(default_factory=dict)
    tensor_parallel: int = 1

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

    def site_device(self, name: str) -> torch.device:
        """The device the activation of the site called ``name`` is on (where its dictionary must
        be): :attr:`device` unless the model is split over devices."""
        self.site(name)  # ConfigError for an unknown site
        return self.site_devices.get(name, self.device)

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


#: The placement strategies ``from_pretrained(device_map=...)`` computes itself (accelerate).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Where a module can go in an explicit device map besides an accelerator: the CPU, or the disk
#: (offloaded; needs ``offload_folder``).
_OFFLOAD_TARGETS = ("cpu", "disk")

DeviceMap = str | Mapping[str, int | str | torch.device]


def check_device_map(device_map: DeviceMap) -> str | dict[str, int | str]:
    """Validate a ``device_map`` for ``from_pretrained``: one of :data:`DEVICE_MAP_STRATEGIES`, or a
    mapping of module path (``""`` for the whole model) to a device: a GPU index, ``cuda:N``,
    ``cuda``, ``mps``, ``cpu`` or ``disk``. :class:`ModelLoadError` naming the bad entry (an unknown
    strategy, a malformed device, a GPU that torch does not see); returns the map as transformers
    takes it."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ModelLoadError(
                f"unknown device_map {device_map!r}; choose one of {list(DEVICE_MAP_STRATEGIES)} or pass a "
                "mapping of module path -> device (a GPU index, 'cuda:N', 'cpu' or 'disk')"
            )
        return device_map
    if not isinstance(device_map, Mapping) or not device_map:
        raise ModelLoadError(f"device_map must be a strategy name or a non-empty mapping, got {device_map!r}")
    out: dict[str, int | str] = {}
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for module, where in device_map.items():
        if not isinstance(module, str):
            raise ModelLoadError(f"device_map: module path {module!r} is not a string")
        value: int | str
        if isinstance(where, torch.device):
            value = str(where)
        elif isinstance(where, int) and not isinstance(where, bool):
            value = where
        elif isinstance(where, str):
            value = where.strip()
        else:
            raise ModelLoadError(f"device_map[{module!r}] = {where!r}: not a device")
        if isinstance(value, str) and value in _OFFLOAD_TARGETS:
            out[module] = value
            continue
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            raise ModelLoadError(
                f"device_map[{module!r}] = {where!r}: not a device (a GPU index, 'cuda:N', 'cpu' or 'disk')"
            ) from None
        if dev.type == "cuda" and (dev.index or 0) >= n_gpu:
            raise ModelLoadError(
                f"device_map[{module!r}] = {where!r}: torch sees {n_gpu} CUDA device(s)"
                + ("" if n_gpu else " (CUDA is not available)")
            )
        out[module] = value
    return out


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
    device_map: DeviceMap | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    tensor_parallel: bool = False,
) -> LoadedModel:
    """Load a causal LM by HF id, short name (``embedded``, ``pythia-70m-deduped``) or local
    directory; put it in eval mode on ``device`` in ``dtype`` (float32 by default); run
    ``before_wrap(hf_model)``; wrap with nnsight; describe its sites.

    ``device_map`` (``"auto"``, another accelerate strategy, or a mapping module path -> device;
    :func:`check_device_map`) splits the model over devices instead: it, ``max_memory`` (device ->
    bytes or ``"10GiB"``) and ``offload_folder`` (where ``"disk"`` modules' weights go) are passed to
    ``from_pretrained``, and ``device`` must then be None (the embedding's device becomes
    :attr:`LoadedModel.device`).

    ``tensor_parallel`` shards the weights over the ranks of the torchrun job (transformers tensor
    parallelism, the model's own ``base_model_tp_plan``: attention heads and MLP columns split, the
    outputs of ``o_proj`` / ``down_proj`` all-reduced); ``device`` is this rank's (``cpu``, gloo; or
    ``cuda:LOCAL_RANK``, NCCL). The attention, MLP, residual and embedding sites are then replicated
    on every rank, so each rank splices the same dictionaries; the ``attn_z`` sites (the ``o_proj``
    input) are sharded by head and left out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_name(name_or_path)
    placement: dict[str, object] = {}
    if tensor_parallel:
        placement.update(_tensor_parallel_placement(source, device_map))
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ModelLoadError("max_memory and offload_folder need a device_map")
        dev, dt = resolve_device(device), resolve_dtype(dtype)
    else:
        if device is not None:
            raise ModelLoadError(
                f"pass either device ({device!r}) or device_map, not both (with a device_map the "
                "embedding's device is where input ids go)"
            )
        dmap = check_device_map(device_map)
        if isinstance(dmap, dict) and "disk" in dmap.values() and offload_folder is None:
            raise ModelLoadError("device_map puts modules on 'disk': pass offload_folder (--offload-folder)")
        placement["device_map"] = dmap
        if max_memory is not None:
            placement["max_memory"] = dict(max_memory)
        if offload_folder is not None:
            placement["offload_folder"] = str(Path(offload_folder).expanduser())
        dev, dt = torch.device("cpu"), resolve_dtype(dtype)  # dev: the embedding's device, below
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
        hf_model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **placement)
    except (OSError, ValueError, KeyError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        hint = "" if is_local_path(source) else " (no network? set HF_HUB_OFFLINE=1 to fail at once)"
        raise ModelLoadError(f"could not load model {source!r}: {first}{hint}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_device_map: dict[str, str | int] | None = None
    site_devices: dict[str, torch.device] = {}
    # accelerate dispatched the model (hooks, hf_device_map); a map that puts everything on the CPU
    # is loaded there as a plain model, without either
    accelerate_map = getattr(hf_model, "hf_device_map", None) if device_map is not None else None
    dispatched = isinstance(accelerate_map, Mapping)
    if tensor_parallel:  # the weights are on this rank's device already (DTensor shards)
        hf_model.eval()
        dev = next(hf_model.parameters()).device
    elif device_map is None:
        nn.Module.to(hf_model, dev).eval()
    else:
        hf_model.eval()
        if isinstance(accelerate_map, Mapping):
            hf_device_map = {str(k): v for k, v in accelerate_map.items()}
        else:
            dev = next(hf_model.parameters()).device
            hf_device_map = {"": str(dev)}
    for p in hf_model.parameters():
        p.requires_grad_(False)
    arch = detect_architecture(hf_model)
    every = build_sites(hf_model, attn_z=True, devices=None if device_map is None else site_devices)
    sites = tuple(s for s in every if s.kind is not SiteKind.ATTN_Z)
    attn_z_sites = tuple(s for s in every if s.kind is SiteKind.ATTN_Z and not tensor_parallel)
    if dispatched:
        dev = input_device(hf_model)
    if before_wrap is not None:
        before_wrap(hf_model)
    lm = wrap(hf_model, tokenizer, dev, dispatched=dispatched)
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
        device_map=hf_device_map,
        site_devices=site_devices,
        tensor_parallel=_tp_world() if tensor_parallel else 1,
    )


def _tp_world() -> int:
    import torch.distributed as td

    return td.get_world_size() if td.is_initialized() else 1


def _tensor_parallel_placement(source: str, device_map: object) -> dict[str, object]:
    """``from_pretrained`` keywords of tensor parallelism over the torchrun job's ranks: the model's
    own plan, except that the input embedding (and a tied unembedding) stay replicated. transformers
    would shard a model's ``embed_tokens`` over the vocabulary, and the value of a vocab-parallel
    embedding carries a single-use ``_MaskPartial`` placement that nnsight 0.8 cannot tap (reading
    the module's output makes its own reduce fail), while the ``embed`` site reads exactly that."""
    import torch.distributed as td

    if device_map is not None:
        raise ModelLoadError("tensor parallelism and a device_map are two ways to split a model: pick one")
    if not td.is_initialized() or td.get_world_size() < 2:
        raise ModelLoadError(
            "tensor parallelism shards the model over the ranks of a torchrun job: run under "
            "`torchrun --nproc-per-node N` (N >= 2)"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, DistributedConfig

    _nnsight_tp_compat()
    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):  # the module layout only, no weights
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not read the model {source!r} for tensor parallelism: {err}") from err
    plan: dict[str, str] = {}
    base = skeleton.base_model
    if isinstance(getattr(base, "embed_tokens", None), nn.Embedding):
        prefix = "" if base is skeleton else f"{skeleton.base_model_prefix}."
        plan[f"{prefix}embed_tokens"] = "replicated_with_grad_allreduce"
        if getattr(config.get_text_config(), "tie_word_embeddings", False):
            plan["lm_head"] = "replicated_with_grad_allreduce"
    return {"distributed_config": DistributedConfig(tp_plan=plan or "auto")}


def _nnsight_tp_compat() -> None:
    """nnsight 0.8.1 reads a sharded model's plan with ``_get_parameter_plan`` from
    ``transformers.distributed.tensor_parallel``, which later transformers releases moved to
    ``transformers.distributed.parallel_utils`` (same function): alias it where it is missing, so
    nnsight's tensor-parallel tracing finds it. Nothing else is changed."""
    import transformers.distributed.tensor_parallel as tp

    if not hasattr(tp, "_get_parameter_plan"):
        from transformers.distributed import parallel_utils

        tp._get_parameter_plan = parallel_utils._get_parameter_plan  # type: ignore[attr-defined]


def wrap(
    hf_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device | None = None,
    *,
    dispatched: bool = False,
) -> LanguageModel:
    """Wrap an in-memory HF model with nnsight (it needs the tokenizer passed explicitly).

    nnsight 0.8 builds a ``transformers.pipeline`` around the model, and a pipeline given no device
    moves the model to the first accelerator it finds: on a CUDA machine a model loaded for the CPU
    would silently end up on the GPU (and its SAEs, on the CPU, would no longer match). So the
    device is passed through (default: the device the model's parameters are on) and checked.

    ``dispatched``: the model was placed by accelerate (``device_map``); the pipeline refuses a
    device for such a model (and does not move it), so none is passed, and the check is that every
    parameter is still where accelerate put it."""
    from nnsight import LanguageModel

    if dispatched:
        before = {name: p.device for name, p in hf_model.named_parameters()}
        # the pipeline takes its device from the first entry of hf_device_map, and fails on "disk"
        # (the first module offloaded to disk): it sees the input device first while it is built
        dmap = getattr(hf_model, "hf_device_map", None)
        if isinstance(dmap, dict) and device is not None:
            object.__setattr__(hf_model, "hf_device_map", {"<input ids>": str(device), **dmap})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lm = LanguageModel(hf_model, tokenizer=tokenizer)
        finally:
            if isinstance(dmap, dict):
                object.__setattr__(hf_model, "hf_device_map", dmap)
        moved_names = [n for n, p in hf_model.named_parameters() if before.get(n) != p.device]
        if moved_names:
            raise ModelLoadError(
                f"wrapping the model with nnsight moved {len(moved_names)} parameter(s) from where "
                f"device_map put them (first: {moved_names[0]})"
            )
        return lm
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
