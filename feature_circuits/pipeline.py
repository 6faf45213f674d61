"""The two stages end to end, each driven by one validated config: discovery and evaluation.

:func:`discover` loads the model and its dictionaries, loads the dataset (tokenized once), computes
node (and edge) effects batch by batch, aggregates them over examples, thresholds them into a circuit
(docs/algorithms.md, "Aggregation and the circuit graph") and writes ``circuit.json``,
``effects.safetensors`` (the aggregated effect of every node, which the evaluation sweeps) and
``circuit.html``, all renamed into place together at the end (:mod:`feature_circuits.outputs`). Every
input is checked before the first forward: the labels file, the output directory, the dataset, the
dictionaries (their files, sizes and sites), then the labels against the model's sites.

:func:`evaluate` loads one or more circuits, the model and dictionaries each names, and measures
faithfulness and completeness by mean ablation on held-out data (docs/algorithms.md, "Evaluation"):
first the circuit exactly as stored, then the threshold sweep; it writes ``eval.json`` per circuit
and one ``eval.html`` plot, renamed into place together once every circuit is evaluated.

    cfg = DiscoverConfig(method=Method.RELP, num_examples=64, out="out")
    circuit = discover(cfg)      # out/circuit.json, out/effects.safetensors, out/circuit.html
    results = evaluate(EvaluateConfig(circuits=("out/circuit.json",)))   # out/eval.json, out/eval.html

:class:`DiscoverConfig` and :class:`EvaluateConfig` are frozen keyword-only dataclasses validated in
``__post_init__`` (a bad value raises :class:`~feature_circuits.errors.ConfigError` naming the
command-line option); each field's ``metadata["help"]`` is its documentation, from which
:mod:`feature_circuits.cli` generates the command-line parsers. Importing this module imports no
torch: the heavy modules are imported by the stage functions.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from feature_circuits.errors import ConfigError
from feature_circuits.metrics import MetricName
from feature_circuits.outputs import check_out_dir, staged_outputs
from feature_circuits.runtime import apply_threads, seed_everything
from feature_circuits.types import Aggregation, Method

if TYPE_CHECKING:
    from torch import Tensor

    from feature_circuits.circuit import Circuit
    from feature_circuits.data import Pair
    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.evaluation import EvalResult
    from feature_circuits.model import LoadedModel

__all__ = [
    "DiscoverConfig",
    "EvaluateConfig",
    "Log",
    "discover",
    "evaluate",
]

#: A sink for progress lines (the CLI prints them to stderr); the default drops them.
Log = Callable[[str], None]
Split = Literal["train", "test"]
DType = Literal["float32", "float64", "bfloat16", "float16"]
Ablation = Literal["mean", "zero", "patch", "resample"]


def _help(text: str, **extra: object) -> dict[str, object]:
    return {"help": text, **extra}


def _coerce(cfg: object, name: str, enum: type[Method] | type[Aggregation] | type[MetricName]) -> None:
    """Turn a string option into its enum member (frozen dataclass: set through object)."""
    value = getattr(cfg, name)
    if value is None or isinstance(value, enum):
        return
    try:
        object.__setattr__(cfg, name, enum(value))
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} must be one of {[m.value for m in enum]}, got {value!r}") from None


def _check_min(name: str, value: int | None, lo: int) -> None:
    if value is not None and value < lo:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {value}")


def _check_threshold(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


def parse_batch_size(text: str) -> int | Literal["auto"]:
    """``--batch-size``: an integer, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--batch-size must be an integer >= 1 or auto, got {text!r}") from None


#: accelerate's placement strategies (the same as ``feature_circuits.model.loading.DEVICE_MAP_STRATEGIES``,
#: repeated here because this module imports no torch)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMapSpec = str | dict[str, int | str]


def parse_device_map(text: str | Mapping[str, object]) -> DeviceMapSpec:
    """``--device-map``: a placement strategy (``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential``), a JSON object (module path -> GPU index, ``"cuda:N"``, ``"cpu"`` or ``"disk"``)
    or a file holding one. The devices themselves are checked when the model is loaded."""
    if isinstance(text, Mapping):
        raw: object = dict(text)
        where = "--device-map"
    else:
        spec = text.strip()
        if spec in DEVICE_MAP_STRATEGIES:
            return spec
        if spec.startswith("{"):
            where = "--device-map"
            try:
                raw = json.loads(spec)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--device-map: not valid JSON ({err.msg}, column {err.colno})") from None
        elif Path(spec).expanduser().is_file():
            where = f"--device-map {spec}"
            try:
                raw = json.loads(Path(spec).expanduser().read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{where}: not readable ({err})") from None
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}:{err.lineno}: not valid JSON ({err.msg})") from None
        else:
            raise ConfigError(
                f"--device-map must be one of {list(DEVICE_MAP_STRATEGIES)}, a JSON object or a JSON file, "
                f"got {text!r}"
            )
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a non-empty JSON object of module path -> device, got {raw!r}")
    out: dict[str, int | str] = {}
    for module, device in raw.items():
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise ConfigError(
                f"{where}: {module!r} -> {device!r}: a device is a GPU index or a string "
                "('cuda:N', 'cpu', 'disk')"
            )
        out[str(module)] = device
    return out


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {list(choices)}, got {value!r}")


def _check_device_map(cfg: DiscoverConfig | EvaluateConfig) -> None:
    """``device_map``: parsed (a JSON text or file given as a string becomes its object);
    ``offload_folder`` only with it."""
    if cfg.device_map is not None:
        object.__setattr__(cfg, "device_map", parse_device_map(cfg.device_map))
    elif cfg.offload_folder is not None:
        raise ConfigError("--offload-folder needs --device-map")


#: ``--device-map`` / ``--offload-folder`` of discover and evaluate
_DEVICE_MAP_HELP = _help(
    "split the model over devices with accelerate (for a model that does not fit one device): "
    "auto, balanced, balanced_low_0 or sequential, or a JSON object / JSON file of module path -> "
    "device (a GPU index, cuda:N, cpu, or disk with --offload-folder); each site's dictionary goes "
    "on its module's device, --device is then not used (docs/methods.md, 'Models that do not fit "
    "one device')",
    parse=str,  # parsed by __post_init__ (parse_device_map), whose errors name the option
    metavar="STRATEGY|JSON|FILE",
)
_OFFLOAD_HELP = _help(
    "with --device-map: directory for the weights of modules offloaded to disk", metavar="DIR"
)
#: ``--tensor-parallel`` of discover
_TENSOR_PARALLEL_HELP = _help(
    "under torchrun --nproc-per-node N: shard the model's weights over the N ranks (transformers "
    "tensor parallelism: attention heads and MLP columns split; gloo on the CPU, NCCL on GPUs) "
    "instead of sharding the examples; every rank runs every example, rank 0 writes. The attn_z "
    "sites (sharded by head) are left out"
)


@dataclass(frozen=True, kw_only=True)
class DiscoverConfig:
    """Options of :func:`discover` (and of ``feature-circuits discover``, generated from them)."""

    method: Method = field(
        default=Method.RELP,
        metadata=_help(
            "attribution method: relp (relevance patching, LRP backward), ig (integrated gradients), "
            "atp (attribution patching), exact (activation patching; nodes only, slow)"
        ),
    )
    model: str = field(
        default="embedded",
        metadata=_help("model: HF id, short name (embedded, pythia-70m-deduped) or local directory"),
    )
    saes: str = field(
        default="embedded",
        metadata=_help(
            "dictionaries: 'embedded', 'marks' (downloaded Pythia-70M dictionaries), 'neurons' (identity "
            "baseline), a Marks-layout root directory, 'saelens:RELEASE[/SAE_ID],...' (SAELens registry "
            "SAEs, via sae_lens and the HF cache) or a SAELens directory (cfg.json + "
            "sae_weights.safetensors, or a directory of them)"
        ),
    )
    dataset: str = field(
        default="sva_rc", metadata=_help("shipped dataset name (e.g. sva_rc, ioi) or a JSONL path")
    )
    split: Split = field(
        default="train", metadata=_help("split of a shipped dataset (ignored for a JSONL path)")
    )
    num_examples: int = field(default=64, metadata=_help("use the first N examples"))
    batch_size: int | Literal["auto"] = field(
        default=16,
        metadata=_help(
            "examples per batch, or auto: the largest batch whose estimated memory fits the device "
            "(feature_circuits/memory.py)",
            parse=parse_batch_size,
            metavar="N|auto",
        ),
    )
    node_threshold: float = field(
        default=0.1,
        metadata=_help(
            "keep nodes with |aggregated effect| above this (also selects the downstream nodes whose "
            "edges are computed: lower is slower; docs/methods.md has node counts and held-out "
            "faithfulness per threshold)"
        ),
    )
    edge_threshold: float = field(
        default=0.02, metadata=_help("keep edges between kept nodes with |weight| above this")
    )
    aggregation: Aggregation = field(
        default=Aggregation.SUM,
        metadata=_help(
            "sum: sum over positions, mean over examples; none: keep positions (equal-length examples)"
        ),
    )
    metric: MetricName = field(
        default=MetricName.LOGIT_DIFF,
        metadata=_help(
            "the metric attributed (recorded in circuit.json; evaluation uses it): logit_diff = "
            "logit(patch answer) - logit(clean answer), answer_logit = -logit(clean answer)"
        ),
    )
    nodes_only: bool = field(default=False, metadata=_help("skip edge computation (faster)"))
    steps: int = field(default=10, metadata=_help("integration steps for --method ig"))
    seed: int = field(default=0, metadata=_help("seed for torch, random and numpy"))
    device: str | None = field(default="cpu", metadata=_help("cpu, cuda, cuda:N or auto"))
    device_map: DeviceMapSpec | None = field(default=None, metadata=_DEVICE_MAP_HELP)
    offload_folder: str | None = field(default=None, metadata=_OFFLOAD_HELP)
    tensor_parallel: bool = field(default=False, metadata=_TENSOR_PARALLEL_HELP)
    dtype: DType = field(default="float32", metadata=_help("model and dictionary dtype"))
    threads: int | None = field(
        default=None,
        metadata=_help(
            "torch CPU threads (default: OMP_NUM_THREADS when set, else half the logical CPUs, at least 1)"
        ),
    )
    labels: str | None = field(
        default=None,
        metadata=_help(
            'labels/groups file shown in circuit.html (JSON Lines: {"site": ..., "feature": ..., "label": '
            '...} and {"group": ..., "nodes": [ids]}; the page saves it; docs/explorer.md)'
        ),
    )
    out: str | None = field(
        default="out",
        metadata=_help(
            "output directory for circuit.json, effects.safetensors (every node's effect) and circuit.html"
        ),
    )
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    html: bool = field(default=True, metadata=_help("write circuit.html beside circuit.json"))
    contexts: str | None = field(
        default=None,
        metadata=_help(
            "extra text for each node's top activating contexts: plain text, one document per line, or "
            'JSON Lines with a "text" string (.jsonl)',
            metavar="FILE",
        ),
    )
    context_top_k: int = field(
        default=8,
        metadata=_help(
            "top activating contexts recorded per node and source (discovery prompts, --contexts); "
            "0 skips the contexts pass",
            metavar="N",
        ),
    )
    context_before: int = field(
        default=8, metadata=_help("tokens kept before the firing token of a context", metavar="N")
    )
    context_after: int = field(
        default=4, metadata=_help("tokens kept after the firing token of a context", metavar="N")
    )

    def __post_init__(self) -> None:
        _coerce(self, "method", Method)
        _coerce(self, "aggregation", Aggregation)
        _coerce(self, "metric", MetricName)
        _check_choice("split", self.split, ("train", "test"))
        _check_choice("dtype", self.dtype, ("float32", "float64", "bfloat16", "float16"))
        _check_device_map(self)
        _check_min("num_examples", self.num_examples, 1)
        if self.batch_size != "auto":
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
                raise ConfigError(f"--batch-size must be an integer >= 1 or auto, got {self.batch_size!r}")
            _check_min("batch_size", self.batch_size, 1)
        _check_min("steps", self.steps, 1)
        _check_min("threads", self.threads, 1)
        _check_threshold("node_threshold", self.node_threshold)
        _check_threshold("edge_threshold", self.edge_threshold)
        for name in ("context_top_k", "context_before", "context_after"):
            _check_min(name, getattr(self, name), 0)
        if self.contexts is not None:
            from feature_circuits.circuit.contexts import read_contexts_file

            read_contexts_file(self.contexts)  # a missing or malformed file fails before any forward

    @property
    def computes_edges(self) -> bool:
        """Edges need gradients: never for exact (nodes only), else unless ``nodes_only``."""
        return not self.nodes_only and self.method is not Method.EXACT


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Options of :func:`evaluate` (and of ``feature-circuits evaluate``, generated from them)."""

    circuits: tuple[str, ...] = field(
        metadata=_help(
            "circuit.json (or its directory); repeat to compare several circuits on one plot",
            flag="--circuit",
            repeat=True,
            metavar="PATH",
        ),
    )
    dataset: str | None = field(
        default=None, metadata=_help("dataset name or .jsonl path (default: the circuit's dataset)")
    )
    split: Split = field(default="test", metadata=_help("split of a named dataset"))
    num_examples: int = field(default=100, metadata=_help("evaluation examples"))
    batch_size: int = field(default=32, metadata=_help("examples per batch"))
    thresholds: tuple[float, ...] | None = field(
        default=None,
        metadata=_help(
            "comma-separated node thresholds on |effect| (default: logspace(-4, 0, 15), extended upwards "
            "past the largest effect)"
        ),
    )
    variants: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            "comma-separated subset of the ablation variants all_errors_ablated (the standard), "
            "resid_errors_kept, no_errors_ablated (default: all)"
        ),
    )
    metric: MetricName | None = field(
        default=None, metadata=_help("metric to evaluate (default: the one each circuit was discovered with)")
    )
    free_layers: int | None = field(
        default=None, metadata=_help("layers < this (and embed) are always kept (default: n_layers // 3)")
    )
    ablation: Ablation = field(
        default="mean",
        metadata=_help(
            "what an ablated node takes: mean (over the patch inputs; the standard), zero, patch (its "
            "value on the example's patch input) or resample (its value on another example's clean input)"
        ),
    )
    bootstrap: int = field(
        default=200,
        metadata=_help("bootstrap resamples of the examples for the intervals of the scores (0: none)"),
    )
    baseline_draws: int = field(
        default=5, metadata=_help("random circuits per grid size for the random baseline (0: none)")
    )
    seed: int = field(
        default=0, metadata=_help("seed of the resample ablation, the bootstrap and the baseline")
    )
    scores: bool = field(
        default=True,
        metadata=_help(
            "compute the integrated scores (auc, cpr, cmd) on the fixed grid of sizes, their intervals "
            "and the random baseline"
        ),
    )
    device: str | None = field(default=None, metadata=_help("cpu, cuda, ... (default: cuda if available)"))
    device_map: DeviceMapSpec | None = field(default=None, metadata=_DEVICE_MAP_HELP)
    offload_folder: str | None = field(default=None, metadata=_OFFLOAD_HELP)
    threads: int | None = field(
        default=None,
        metadata=_help(
            "torch CPU threads (default: OMP_NUM_THREADS when set, else half the logical CPUs, at least 1)"
        ),
    )
    allow_discovery_split: bool = field(
        default=False, metadata=_help("allow evaluating on the circuit's own discovery dataset and split")
    )
    out: str | None = field(
        default=None, metadata=_help("output directory (default: the circuit's directory)")
    )
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def __post_init__(self) -> None:
        if isinstance(self.circuits, str):  # one path given as a string
            object.__setattr__(self, "circuits", (self.circuits,))
        object.__setattr__(self, "circuits", tuple(str(c) for c in self.circuits))
        if not self.circuits:
            raise ConfigError("--circuit is required (at least one circuit.json)")
        _coerce(self, "metric", MetricName)
        _check_choice("split", self.split, ("train", "test"))
        _check_min("num_examples", self.num_examples, 1)
        _check_min("batch_size", self.batch_size, 1)
        _check_min("free_layers", self.free_layers, 0)
        _check_min("threads", self.threads, 1)
        _check_choice("ablation", self.ablation, ("mean", "zero", "patch", "resample"))
        _check_device_map(self)
        _check_min("bootstrap", self.bootstrap, 0)
        _check_min("baseline_draws", self.baseline_draws, 0)
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
            if not self.thresholds or any(not math.isfinite(t) or t < 0 for t in self.thresholds):
                raise ConfigError(f"--thresholds must be finite numbers >= 0, got {list(self.thresholds)}")
        if self.variants is not None:
            from feature_circuits.evaluation import Variant

            object.__setattr__(self, "variants", tuple(getattr(v, "value", v) for v in self.variants))
            choices = [v.value for v in Variant]
            bad = [v for v in self.variants if v not in choices]
            if bad or not self.variants:
                raise ConfigError(f"--variants: unknown variant(s) {bad}; choose from {', '.join(choices)}")


def _quiet(_msg: str) -> None:
    pass


def _portable(name: str) -> str:
    """A name as the circuit file records it: an existing local path becomes absolute (so evaluation
    from another directory finds it, and the held-out check compares the same files); known short
    names and hub ids stay as given."""
    return str(Path(name).resolve()) if Path(name).exists() else name


# -------------------------------------------------------------------------------------- discovery


def discover(cfg: DiscoverConfig, *, log: Log = _quiet) -> Circuit:
    """Run discovery as ``cfg`` says; when ``cfg.out`` is set write ``circuit.json``,
    ``effects.safetensors`` (every node's aggregated effect) and ``circuit.html`` (unless
    ``cfg.html`` is False) there. Returns the :class:`~feature_circuits.circuit.Circuit`.

    Batches stream: each batch's node (and edge) effects are added to a
    :class:`~feature_circuits.circuit.NodeAccumulator` (:class:`~feature_circuits.circuit.EdgeAccumulator`)
    and dropped, so memory does not grow with the number of examples. Under ``torchrun`` (more than
    one process, :mod:`feature_circuits.distributed`) every rank runs its share of the examples, the
    accumulated sums are merged across ranks, and rank 0 writes the outputs."""
    from feature_circuits import distributed
    from feature_circuits.attribution import edge_effects, load_for_attribution, method_spec, node_effects
    from feature_circuits.attribution.forward import attribution_sites, use_sparse
    from feature_circuits.circuit import (
        EFFECTS_FILE,
        EdgeAccumulator,
        NodeAccumulator,
        build_circuit,
        save_circuit,
        save_effects,
    )
    from feature_circuits.circuit.contexts import record_activations
    from feature_circuits.data import load_pairs, make_batches, resolve_dataset
    from feature_circuits.dictionaries import dictionary_infos
    from feature_circuits.memory import choose_batch_size, estimate_memory, probe_active_features
    from feature_circuits.metrics import get_metric
    from feature_circuits.progress import progress
    from feature_circuits.render import load_labels

    # everything the user gave is checked before the first forward (labels, output directory,
    # dataset, dictionaries; then the labels against the model's sites)
    if cfg.labels is not None and not Path(cfg.labels).is_file():
        raise ConfigError(f"--labels: labels file not found: {cfg.labels}")
    if cfg.labels is not None:
        load_labels(cfg.labels)
    out = None if cfg.out is None else check_out_dir(cfg.out, "--out")
    if cfg.tensor_parallel and distributed.world_size_from_env() < 2:
        raise ConfigError(
            "--tensor-parallel shards the model over torchrun's ranks: run it under "
            "`torchrun --nproc-per-node N -m feature_circuits discover ...` (N >= 2)"
        )
    dist = distributed.init_from_env(cfg.device, tensor_parallel=cfg.tensor_parallel)
    main_rank = dist is None or dist.is_main
    if not main_rank:
        log = _quiet
    if cfg.method is Method.EXACT and not cfg.nodes_only:
        log("method exact has no gradients: computing nodes only (no edges)")
    log(f"torch threads: {apply_threads(cfg.threads)}")
    if dist is not None:
        log(f"{'tensor' if dist.tensor_parallel else 'data'} parallel: {dist.describe()}")
    seed_everything(cfg.seed)
    timing: dict[str, float] = {}
    t_start = time.perf_counter()

    data_path = resolve_dataset(cfg.dataset, cfg.split)
    if cfg.device_map is not None and dist is not None:
        raise ConfigError(
            "--device-map splits one model copy over devices; it does not combine with torchrun"
        )
    device = (
        None if cfg.device_map is not None else cfg.device if dist is None else dist.device_for(cfg.device)
    )
    loaded, dicts = load_for_attribution(
        cfg.model,
        cfg.saes,
        device=device,
        dtype=cfg.dtype,
        device_map=cfg.device_map,
        offload_folder=cfg.offload_folder,
        tensor_parallel=cfg.tensor_parallel,
    )
    timing["load"] = time.perf_counter() - t_start
    labels = (
        None
        if cfg.labels is None
        else load_labels(cfg.labels, {name: int(d.dict_size) for name, d in dicts.items()})
    )

    t = time.perf_counter()
    pairs = load_pairs(data_path, loaded.tokenizer, limit=cfg.num_examples)
    if pairs.report:  # a shipped task built for this tokenizer, or answers read with a leading space
        log(pairs.report)
    lengths = sorted({len(p.tokens_for(loaded.tokenizer).clean) for p in pairs})
    if cfg.aggregation is Aggregation.NONE and len(lengths) > 1:
        raise ConfigError(
            f"--aggregation none keeps token positions and needs examples of one length, but the first "
            f"{len(pairs)} examples of {data_path} have token lengths {lengths}; use --aggregation sum or a "
            "dataset with a single template"
        )
    if len(pairs) < cfg.num_examples:
        log(f"note: {data_path} has only {len(pairs)} examples (asked for {cfg.num_examples})")
    mine = pairs if dist is None else dist.shard(pairs)
    # the sparse feature path stores only the active features: measured on a few prompts
    sparse = cfg.method is not Method.EXACT and use_sparse(dicts, attribution_sites(loaded, dicts))
    active = None
    if sparse and mine:
        probe = make_batches(mine[:8], loaded.tokenizer, 8)[0]
        active = probe_active_features(loaded, dicts, probe.clean, probe.patch)
    mem = {"edges": cfg.computes_edges, "active_features": active, "sparse": sparse}
    if cfg.batch_size == "auto":
        batch_size = choose_batch_size(loaded, dicts, seq_len=lengths[-1], limit=max(1, len(mine)), **mem)
        log(f"--batch-size auto: {batch_size}")
    else:
        batch_size = int(cfg.batch_size)
    log(estimate_memory(loaded, dicts, batch_size=batch_size, seq_len=lengths[-1], **mem).describe())
    batches = make_batches(mine, loaded.tokenizer, batch_size)
    first_tokens = pairs[0].tokens_for(loaded.tokenizer).clean
    del pairs, mine  # the batches hold what the loop needs
    timing["data"] = time.perf_counter() - t

    metric = get_metric(cfg.metric)
    # exact and ig draw their own bars (per patch chunk, per step); hidden with --no-progress and off rank 0
    options = method_spec(cfg.method).options_from(
        {"steps": cfg.steps, "progress": None if cfg.progress and main_rank else False}
    )
    node_acc = NodeAccumulator(cfg.aggregation)
    edge_acc = EdgeAccumulator(cfg.aggregation) if cfg.computes_edges else None
    t_nodes = t_edges = 0.0
    desc = f"{cfg.method.value} attribution"
    for batch in progress(batches, desc=desc, unit="batch", enabled=cfg.progress and main_rank):
        t = time.perf_counter()
        ne = node_effects(loaded, dicts, batch, cfg.method, metric=metric, options=options)
        t_nodes += time.perf_counter() - t
        node_acc.add(ne)
        if edge_acc is not None:
            t = time.perf_counter()
            edge_acc.add(
                edge_effects(loaded, dicts, batch, ne, node_threshold=cfg.node_threshold, method=cfg.method)
            )
            t_edges += time.perf_counter() - t
        del ne
    timing["nodes"] = t_nodes
    if edge_acc is not None:
        timing["edges"] = t_edges

    t = time.perf_counter()
    if dist is not None:
        node_acc = dist.merge(node_acc)
        edge_acc = None if edge_acc is None else dist.merge(edge_acc)
    agg_nodes = node_acc.result()
    agg_edges = edge_acc.result() if edge_acc is not None else None
    tokens = (
        [str(loaded.tokenizer.decode([int(i)])) for i in first_tokens]
        if cfg.aggregation is Aggregation.NONE
        else None
    )
    timing["aggregate"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start
    circuit = build_circuit(
        agg_nodes,
        agg_edges,
        node_threshold=cfg.node_threshold,
        edge_threshold=cfg.edge_threshold,
        model=_portable(cfg.model),
        saes=_portable(cfg.saes),
        method=cfg.method,
        metric=cfg.metric,
        dataset=_portable(cfg.dataset),
        split=cfg.split,
        last_resid=loaded.last_resid.name,
        n_layers=loaded.n_layers,
        tokens=tokens,
        timing_s={k: round(v, 4) for k, v in timing.items()},
    )
    # what was spliced at each site (Neuronpedia ids included), and the sites left unspliced
    circuit = circuit.model_copy(
        update={
            "dictionaries": dictionary_infos(dicts),
            "sites_without_dictionary": tuple(s.name for s in loaded.sites if s.name not in dicts),
        }
    )
    # where each node fires: mean activations and top contexts (docs/algorithms.md, "Feature contexts")
    circuit = record_activations(
        circuit,
        loaded,
        dicts,
        batches,
        top_k=cfg.context_top_k,
        before=cfg.context_before,
        after=cfg.context_after,
        contexts=cfg.contexts,
        batch_size=batch_size,
        enabled=cfg.progress and main_rank,
        shard=None if dist is None else dist.shard,
        merge=None if dist is None else dist.merge,
    )
    if not circuit.nodes:
        log(f"note: {circuit.empty_note()}")
    if out is not None and main_rank:
        circuit = circuit.model_copy(update={"effects_file": EFFECTS_FILE})
        with staged_outputs() as stage:  # all renamed into place together, or none
            save_effects(agg_nodes.effects, stage.path(out / EFFECTS_FILE), cfg.aggregation)
            save_circuit(circuit, stage.path(out / "circuit.json"))
            if cfg.html:
                from feature_circuits.render import render_circuit_html

                render_circuit_html(circuit, stage.path(out / "circuit.html"), labels=labels)
    elif out is not None:
        circuit = circuit.model_copy(update={"effects_file": EFFECTS_FILE})
    if dist is not None:
        dist.barrier()  # the other ranks return once rank 0 has written
        dist.close()
    return circuit


# -------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True)
class _Job:
    """One circuit to evaluate: where it was read from, what it is, on which data, under which label."""

    path: Path
    circuit: Circuit
    effects: Mapping[str, Tensor] | None  # every node's effect (the circuit's effects file), if any
    dataset: str
    label: str


def _circuit_path(p: str) -> Path:
    path = Path(p)
    return path / "circuit.json" if path.is_dir() else path


def _label(circuit: Circuit, path: Path) -> str:
    return f"{path.parent.name or 'circuit'} [{circuit.method.value}, saes={circuit.saes}]"


def _load_jobs(cfg: EvaluateConfig) -> list[_Job]:
    """Read every circuit and its effects file, choose its evaluation dataset and refuse its own
    discovery data (unless allowed), before any model is loaded; labels are made unique by
    appending the path."""
    from feature_circuits.circuit import load_circuit
    from feature_circuits.evaluation import check_held_out, circuit_effects, default_dataset

    read = []
    for p in cfg.circuits:
        path = _circuit_path(p)
        circ = load_circuit(path)
        dataset = cfg.dataset if cfg.dataset is not None else default_dataset(circ.dataset, cfg.split)
        check_held_out(circ.dataset, circ.split, dataset, cfg.split, allow=cfg.allow_discovery_split)
        read.append((path, circ, circuit_effects(circ, path), dataset, _label(circ, path)))
    labels = [r[-1] for r in read]
    return [
        _Job(
            path=path,
            circuit=circ,
            effects=effects,
            dataset=dataset,
            label=f"{label} {path}" if labels.count(label) > 1 else label,
        )
        for path, circ, effects, dataset, label in read
    ]


def _check_disjoint_from_discovery(
    job: _Job, pairs: Sequence[Pair], data_path: Path, loaded: LoadedModel, log: Log
) -> None:
    """Refuse evaluation examples that are among the circuit's discovery examples (any file name)."""
    from feature_circuits.data import load_pairs
    from feature_circuits.errors import DatasetError
    from feature_circuits.evaluation import check_disjoint, resolved_dataset

    discovery_path = resolved_dataset(job.circuit.dataset, job.circuit.split)
    if discovery_path is None or not discovery_path.is_file():
        return
    try:
        discovery = load_pairs(discovery_path, loaded.tokenizer, limit=job.circuit.num_examples or None)
    except DatasetError as err:
        log(f"warning: cannot read the discovery data to check it is disjoint: {err}")
        return
    check_disjoint(list(pairs), discovery, str(data_path), str(discovery_path))


def _eval_json_path(cfg: EvaluateConfig, job: _Job, n_jobs: int) -> Path:
    if cfg.out is None:
        return job.path.parent / "eval.json"
    if n_jobs == 1:
        return Path(cfg.out) / "eval.json"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{job.path.parent.name}_{job.circuit.method.value}").strip("_")
    return Path(cfg.out) / f"eval_{safe}.json"


def evaluate(cfg: EvaluateConfig, *, log: Log = _quiet, echo: Log = _quiet) -> list[EvalResult]:
    """Evaluate every circuit of ``cfg``: write ``eval.json`` per circuit (beside it, or in
    ``cfg.out``: ``eval.json`` for one circuit, ``eval_<dir>_<method>.json`` each for several) and one
    ``eval.html`` plot (``cfg.out`` or the first circuit's directory). ``log`` gets progress lines,
    ``echo`` the summary table of each circuit and the paths written. Models, dictionaries and
    ablation means are loaded once for the circuits that share them."""
    import json

    import torch

    from feature_circuits.data import load_pairs, make_batches, resolve_dataset
    from feature_circuits.dictionaries import load_dictionaries
    from feature_circuits.evaluation import (
        SiteMean,
        Variant,
        compute_means,
        eval_json,
        evaluate_circuit,
        plot_html,
        positions_aligned,
        summary_table,
    )
    from feature_circuits.model import load_model

    jobs = _load_jobs(cfg)
    html = (Path(cfg.out) if cfg.out is not None else jobs[0].path.parent) / "eval.html"
    json_paths = [_eval_json_path(cfg, job, len(jobs)) for job in jobs]
    for where in dict.fromkeys(p.parent for p in [*json_paths, html]):  # before any model is loaded
        check_out_dir(where, "--out" if cfg.out is not None else f"--circuit (its directory {where})")
    log(f"torch threads: {apply_threads(cfg.threads)}")
    models: dict[str, LoadedModel] = {}
    dicts: dict[tuple[str, str], Mapping[str, Dictionary]] = {}
    means_cache: dict[tuple[str, str, str, int, int], Mapping[str, SiteMean]] = {}
    results: list[tuple[str, EvalResult]] = []
    for job in jobs:
        circ = job.circuit
        if circ.model not in models:
            models[circ.model] = load_model(
                circ.model,
                device=cfg.device if cfg.device_map is None else None,
                dtype=torch.float32,
                device_map=cfg.device_map,
                offload_folder=cfg.offload_folder,
            )
        loaded = models[circ.model]
        if (circ.model, circ.saes) not in dicts:
            dicts[(circ.model, circ.saes)] = load_dictionaries(
                loaded.sites, circ.saes, device=loaded.device, dtype=loaded.dtype, model=loaded
            )
        aes = dicts[(circ.model, circ.saes)]
        data_path = Path(resolve_dataset(job.dataset, cfg.split))
        pairs = load_pairs(data_path, loaded.tokenizer, limit=cfg.num_examples)
        if not cfg.allow_discovery_split:
            _check_disjoint_from_discovery(job, pairs, data_path, loaded, log)
        batches = make_batches(pairs, loaded.tokenizer, cfg.batch_size)
        key = (circ.model, circ.saes, str(data_path), len(pairs), cfg.batch_size)
        if cfg.ablation == "mean" and key not in means_cache:
            means_cache[key] = compute_means(loaded, aes, batches, per_position=positions_aligned(batches))
        log(f"evaluating {job.label} on {data_path} ({len(pairs)} examples)")
        res = evaluate_circuit(
            loaded,
            aes,
            circ,
            batches,
            effects=job.effects,
            metric=cfg.metric,
            thresholds=cfg.thresholds,
            variants=tuple(Variant) if cfg.variants is None else cfg.variants,
            free_layers=cfg.free_layers,
            means=means_cache.get(key),
            progress=cfg.progress,
            ablation=cfg.ablation,
            seed=cfg.seed,
            bootstrap=cfg.bootstrap,
            baseline_draws=cfg.baseline_draws,
            scores=cfg.scores,
        ).with_meta(eval_dataset=str(data_path), eval_split=cfg.split, circuit=str(job.path))
        for warning in res.warnings:
            log(f"warning: {job.path}: {warning}")
        results.append((job.label, res))
        echo(summary_table(job.label, res))
    with staged_outputs() as stage:  # every eval.json and eval.html renamed into place together, or none
        for out_json, (_, res) in zip(json_paths, results, strict=True):
            stage.path(out_json).write_text(json.dumps(eval_json(res), indent=1) + "\n")
        plot_html(results, stage.path(html))
    for p in [*json_paths, html]:
        echo(f"wrote {p}")
    return [res for _, res in results]
