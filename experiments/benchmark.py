"""Wall time and peak memory of node and edge attribution (atp, relp, ig) against a "floor".

The floor is the cheapest possible gradient attribution with the same model and SAEs: one clean
forward with every SAE spliced (features and errors as gradient leaves), one backward, one patch
forward, and the products delta . gradient; written directly with torch forward hooks on the HF
model (no nnsight, no LRP rules), so each method's time is reported as a ratio to it.

Edge effects: the attribution engine's batched VJPs (``edge_effects``) against the reference
algorithm, one backward per selected downstream node (written here, :func:`edges_loop`); both give the
same numbers (the largest absolute difference is reported). On the Pythia-70M-shaped model the loop
runs on a subset of the nodes of every site pair and is extrapolated per node.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at the start of the call.
CPU: the peak of the bytes held by tensors the call allocates (:func:`tensor_peak_bytes`: every
allocation and free the torch profiler records, ``profile_memory=True``, replayed in time order),
in one more run after the timed ones -- the CPU counterpart of CUDA's number, exact and repeatable
(the same call gives the same bytes), without the model's and the SAEs' weights, which exist before
the call. The resident set size is reported beside it (``peak_rss_mb``: sampled every 2 ms above
the RSS at the start of each timed run, after ``malloc_trim(0)``), but it is not what the ratios
use: it depends on what ran before (glibc's dynamic mmap threshold decides whether freed pages are
reused) and varied from 77 to 153 MB for the same sparse call.

Shaped models and discovery end to end: besides the Pythia-70M shape, ``--gemma`` builds a
Gemma-2-2B-shaped model of reduced depth (:data:`GEMMA2_2B_SHAPE` with :data:`GEMMA_BENCH_OVERRIDES`;
random SAEs of 16384 features). On each shaped model :func:`bench_discovery` runs ``feature-circuits
discover`` (relp, nodes and edges) on ``--discovery-examples`` random-token pairs in one process and
under ``torchrun --nproc-per-node 2`` (:mod:`feature_circuits.distributed`), each in fresh processes of
one thread, and reports its time as a ratio to the dense floor of the same batches, each process's
peak RSS, the data-parallel speedup and whether both circuits are the same.

    feature-circuits bench --out bench/            # embedded default + Pythia-70M-shaped
    feature-circuits bench --out bench/ --gemma    # + the Gemma-2-2B shape
    feature-circuits bench --out bench/ --quick --skip-pythia
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from feature_circuits.attribution import edge_effects, load_for_attribution, method_spec, node_effects
from feature_circuits.attribution.edges import edge_forward, select_nodes, site_pairs
from feature_circuits.attribution.forward import attribution_sites
from feature_circuits.attribution.results import effect_values
from feature_circuits.data import Batch
from feature_circuits.dictionaries import encode_with_error, splice_with_grad_leaves
from feature_circuits.metrics import logit_diff
from feature_circuits.model.sites import get_submodule
from feature_circuits.types import LRPConfig, Method

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

METHODS = ("atp", "relp", "ig")

#: Pythia-70M(-deduped) shape: 6 layers, width 512, 8 heads, MLP 2048, vocabulary 50304, parallel
#: residual, rotary_pct 0.25.
PYTHIA_70M_SHAPE: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


#: Gemma-2-2B: width 2304, 8 heads (4 key/value heads) of 256, MLP 9216, vocabulary 256000, 26
#: layers alternating sliding-window and full attention, soft-capped logits, tied embeddings.
GEMMA2_2B_SHAPE: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "intermediate_size": 9216,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
#: What the benchmark changes of the Gemma-2-2B shape: reduced depth, and a reduced vocabulary (the
#: 256000 x 2304 embedding alone is 2.4 GB of float32 and only the logit layer's cost depends on it).
GEMMA_BENCH_OVERRIDES: dict[str, Any] = {"num_hidden_layers": 2, "vocab_size": 8192}

#: family -> (config class, model class) names in transformers
_FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


# ------------------------------------------------------------------------------------ measurement


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the start of the block, in bytes (``.peak``); see the module docstring."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak = 0
        self.start = 0
        self.absolute_peak = 0

    def __enter__(self) -> Self:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self.start = _rss_bytes()
        self._max = self.start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, _rss_bytes())
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            self._max = max(self._max, _rss_bytes())
            self._stop.set()
            self._thread.join()
            top = self._max
        self.absolute_peak = top
        self.peak = max(0, top - self.start)


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes held by the CPU tensors ``fn()`` allocates (its result is dropped before the
    end): the torch profiler's memory records (each op's own allocations at its start, each free at
    its time), summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events() or ()
    )
    live = top = 0
    for _, delta in events:
        live += delta
        top = max(top, live)
    return int(top)


def measure_many(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Median wall time of ``repeats`` runs of each function after ``warmup`` untimed runs; the repeats
    are interleaved (f1, f2, ..., f1, f2, ...) so a change of the machine's load during the measurement
    hits every function alike. Peak memory: on CUDA the maximum over the timed runs; on the CPU the
    tensor bytes of one more run of each function (:func:`tensor_peak_bytes`; the RSS of the timed
    runs is ``peak_rss_mb``; see the module docstring)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, list[int]] = {k: [] for k in fns}
    abs_peaks: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with PeakMemory(device) as pm:
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
            peaks[name].append(pm.peak)
            abs_peaks[name].append(pm.absolute_peak)
    tensor_peaks: dict[str, int] = {}
    if device.type != "cuda":
        for name, fn in fns.items():
            tensor_peaks[name] = tensor_peak_bytes(fn)
    return {
        k: {
            "median_s": statistics.median(times[k]),
            "times_s": [round(t, 5) for t in times[k]],
            "peak_mem_mb": (tensor_peaks[k] if k in tensor_peaks else max(peaks[k])) / 2**20,
            "peak_rss_mb": max(peaks[k]) / 2**20,
            "peak_total_mb": max(abs_peaks[k]) / 2**20,
            "memory_measured": "tensor bytes (torch profiler)" if k in tensor_peaks else "cuda allocator",
        }
        for k in fns
    }


def measure(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """:func:`measure_many` of one function."""
    return measure_many({"f": fn}, device, repeats, warmup)["f"]


# ------------------------------------------------------------------------------------------ floor


def floor_node_effects(
    loaded: Any, dicts: dict[str, Any], batch: Any, metric: Any = logit_diff
) -> dict[str, Tensor]:
    """The cheapest gradient attribution: clean forward with every SAE spliced (plain torch hooks on
    the HF model), one backward, one patch forward, delta . grad. Numerically atp."""
    sites = attribution_sites(loaded, dicts)
    hf = loaded.hf_model
    dev = loaded.device
    leaves: dict[str, tuple[Tensor, Tensor]] = {}
    patch: dict[str, tuple[Tensor, Tensor]] = {}

    def splice_hook(site):
        def hook(_mod, _inp, out):
            x = out[0] if site.output_is_tuple else out
            o, f, e = splice_with_grad_leaves(dicts[site.name], x)
            leaves[site.name] = (f, e)
            return (o, *out[1:]) if site.output_is_tuple else o

        return hook

    def encode_hook(site):
        def hook(_mod, _inp, out):
            x = out[0] if site.output_is_tuple else out
            patch[site.name] = encode_with_error(dicts[site.name], x)

        return hook

    handles = [get_submodule(hf, s.module_path).register_forward_hook(splice_hook(s)) for s in sites]
    try:
        logits = hf(input_ids=batch.clean.to(dev)).logits
    finally:
        for h in handles:
            h.remove()
    m = metric(logits, batch)
    flat = [t for s in sites for t in leaves[s.name]]
    grads = torch.autograd.grad(m.sum(), flat, allow_unused=True)
    handles = [get_submodule(hf, s.module_path).register_forward_hook(encode_hook(s)) for s in sites]
    try:
        with torch.no_grad():
            hf(input_ids=batch.patch.to(dev))
    finally:
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for i, s in enumerate(sites):
            f, e = leaves[s.name]
            pf, pe = patch[s.name]
            gf = grads[2 * i] if grads[2 * i] is not None else torch.zeros_like(f)
            ge = grads[2 * i + 1] if grads[2 * i + 1] is not None else torch.zeros_like(e)
            out[s.name] = torch.cat([gf * (pf - f), (ge * (pe - e)).sum(-1, keepdim=True)], -1)
    return out


# ------------------------------------------------------------------------------------ edges (loop)


def edges_loop(
    loaded: Any,
    dicts: dict[str, Any],
    batch: Any,
    nodes: Any,
    *,
    node_threshold: float,
    lrp: LRPConfig | None,
    max_nodes_per_pair: int | None = None,
) -> dict[str, Any]:
    """Reference edge algorithm: one backward per selected downstream node (docs/algorithms.md,
    "Edges").

    Returns ``rows[(up, down)] = [((e, p, j), dense (s_u, F_u+1)), ...]`` and timings: ``forward_s`` per
    pair (the one clean forward a pair needs), ``backward_s`` (all per-node backwards), ``n_nodes``
    (backwards run) and ``n_nodes_total`` (what the full loop would run)."""
    available = set(nodes.effects) & set(dicts)
    rows: dict[tuple[str, str], list] = {}
    forward_s = backward_s = 0.0
    n_run = n_total = 0
    for pair in site_pairs(loaded, available):
        gd, du = nodes.grads[pair.down], nodes.deltas[pair.up]
        e, p, j, _ = select_nodes(nodes.effects[pair.down], node_threshold)
        n_total += int(e.numel())
        if e.numel() == 0:
            continue
        if max_nodes_per_pair is not None:
            e, p, j = e[:max_nodes_per_pair], p[:max_nodes_per_pair], j[:max_nodes_per_pair]
        t0 = time.perf_counter()
        saved = edge_forward(loaded, dicts, batch.clean, pair, lrp=lrp)
        fu, eu, fd, ed = saved["fu"], saved["eu"], saved["fd"], saved["ed"]
        forward_s += time.perf_counter() - t0
        n_fd = fd.shape[-1]
        s_len = fd.shape[1]
        out = []
        t0 = time.perf_counter()
        for k in range(e.numel()):
            ei, pi, ji = int(e[k]), int(p[k]), int(j[k])
            feature = ji < n_fd
            target = fd[ei, pi, ji] * gd.f[ei, pi, ji] if feature else (ed[ei, pi] * gd.err[ei, pi]).sum()
            gfu, geu = torch.autograd.grad(target, [fu, eu], retain_graph=True, allow_unused=True)
            with torch.no_grad():
                vf = torch.zeros_like(fu[ei]) if gfu is None else gfu[ei] * du.f[ei]
                ve = (
                    torch.zeros(s_len, 1, dtype=fu.dtype, device=fu.device)
                    if geu is None
                    else (geu[ei] * du.err[ei]).sum(-1, keepdim=True)
                )
                row = torch.cat([vf, ve], -1)
                row[pi + 1 :] = 0  # future positions
            out.append(((ei, pi, ji), row))
            n_run += 1
        backward_s += time.perf_counter() - t0
        rows[(pair.up, pair.down)] = out
        del saved, fu, eu, fd, ed
    return {
        "rows": rows,
        "forward_s": forward_s,
        "backward_s": backward_s,
        "n_nodes": n_run,
        "n_nodes_total": n_total,
    }


def max_diff_loop_vs_batched(loop_rows: dict, batched: Any) -> float:
    worst = 0.0
    for key, rows in loop_rows.items():
        sp = batched.edges[key]
        for (e, p, j), row in rows:
            dense = sp[e, p, j].to_dense()
            worst = max(worst, float((dense - row).abs().max()))
    return worst


def threshold_for(nodes: Any, n_select: int, downstream: set[str]) -> float:
    """Node threshold selecting about ``n_select`` downstream nodes over all sites of the batch."""
    vals = torch.cat([effect_values(nodes.effects[k]).abs() for k in nodes.effects if k in downstream])
    vals = vals[torch.isfinite(vals)]
    k = max(1, min(n_select, vals.numel()))
    return float(torch.topk(vals, k).values[-1]) * (1 - 1e-6)


# --------------------------------------------------------------------------------- Pythia-shaped


def build_pythia_shaped(
    root: str | Path,
    *,
    n_features: int = 32768,
    active: int = 64,
    shape: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """A randomly initialised Pythia-70M-shaped GPT-NeoX and its random SAEs
    (:func:`build_shaped`); ``shape`` overrides :data:`PYTHIA_70M_SHAPE`."""
    cfg = dict(PYTHIA_70M_SHAPE if shape is None else {**PYTHIA_70M_SHAPE, **shape})
    return build_shaped(root, "gpt_neox", cfg, n_features=n_features, active=active, seed=seed)


def build_shaped(
    root: str | Path,
    family: str,
    config: dict[str, Any],
    *,
    n_features: int,
    active: int = 64,
    seed: int = 0,
) -> tuple[Path, Path]:
    """A randomly initialised model of ``family`` (``gpt_neox``, ``gemma2``) with ``config``, saved
    with save_pretrained with a word-level tokenizer (only ids matter), and one random
    ``AutoEncoder(d, n_features)`` per site, saved as ``ae.pt`` in the Marks layout. Each encoder bias
    is shifted so that on activations of random tokens ``active`` features per token are on average
    active (the ``active * N``-th largest pre-activation over N calibration tokens becomes the
    threshold), like a trained SAE's L0, instead of the ~F/2 a zero-bias random encoder gives.
    Returns ``(model_dir, sae_root)``."""
    import transformers
    from dictionary_learning import AutoEncoder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from feature_circuits.model.sites import build_sites

    root = Path(root)
    config_cls, model_cls = (getattr(transformers, n) for n in _FAMILIES[family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(254)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    ).save_pretrained(model_dir)
    sites = build_sites(model)
    acts: dict[str, Tensor] = {}
    hooks = []
    for s in sites:

        def hook(_m, _i, out, s=s):
            acts[s.name] = (out[0] if s.output_is_tuple else out).detach().reshape(-1, s.d_model)

        hooks.append(get_submodule(model, s.module_path).register_forward_hook(hook))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model(input_ids=torch.randint(0, min(256, config["vocab_size"]), (8, 32), generator=gen))
    for h in hooks:
        h.remove()
    sae_root = root / "saes"
    for s in sites:
        ae = AutoEncoder(s.d_model, n_features)
        with torch.no_grad():
            x = acts[s.name]
            pre = (x - ae.bias) @ ae.encoder.weight.T + ae.encoder.bias
            k = max(1, min(pre.numel(), active * x.shape[0]))
            thr = torch.topk(pre.flatten(), k).values[-1]
            ae.encoder.bias.sub_(thr)
        path = sae_root / f"{family}-shaped" / s.marks_dir / f"10_{n_features}" / "ae.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict(), path)
        del ae
    del model
    return model_dir, sae_root


# ------------------------------------------------------------------------------------------ batches


def embedded_batch(tokenizer: Any, batch_size: int) -> Any:
    """A real SVA batch of the embedded model: the first ``batch_size`` equal-length examples of
    ``data/sva_rc_train.jsonl``."""
    from feature_circuits.data import load_pairs, make_batches
    from feature_circuits.toy import DATA_DIR

    pairs = load_pairs(DATA_DIR / "sva_rc_train.jsonl", tokenizer, limit=4 * batch_size)
    batches = [b for b in make_batches(pairs, tokenizer, batch_size) if len(b) == batch_size]
    return batches[0]


def random_batch(vocab_size: int, b: int, s: int, seed: int = 0, n_diff: int = 2) -> Any:
    """Random clean ids; the patch differs at ``n_diff`` random positions (same in every example)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab_size, (b, s), generator=gen)
    patch = clean.clone()
    pos = torch.randperm(s, generator=gen)[:n_diff]
    patch[:, pos] = torch.randint(0, vocab_size, (b, n_diff), generator=gen)
    answers = torch.randint(0, vocab_size, (2, b), generator=gen)
    return Batch(clean=clean, patch=patch, clean_answer=answers[0], patch_answer=answers[1], pairs=())


# ------------------------------------------------------------------------------------------ running


def bench_model(
    name: str,
    loaded: Any,
    dicts: dict[str, Any],
    batch: Any,
    *,
    repeats: int,
    warmup: int,
    n_edge_nodes: int,
    loop_nodes_per_pair: int | None,
    loop_repeats: int,
    steps: int = 10,
    methods: tuple[str, ...] = METHODS,
    exact_max_nodes: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    dev = loaded.device
    res: dict[str, Any] = {
        "model": name,
        "batch_size": int(batch.clean.shape[0]),
        "seq_len": int(batch.clean.shape[1]),
        "n_sites": len(dicts),
        "dict_size": int(next(iter(dicts.values())).dict_size),
        "ig_steps": steps,
        "repeats": repeats,
        "warmup": warmup,
    }
    log(f"[{name}] floor and nodes (interleaved)")
    options = {m: method_spec(m).options_from({"steps": steps}) for m in methods}
    fns: dict[str, Callable[[], Any]] = {"floor": lambda: floor_node_effects(loaded, dicts, batch)}
    for m in methods:
        fns[m] = lambda m=m: node_effects(loaded, dicts, batch, Method(m), options=options[m])
    timed = measure_many(fns, dev, repeats, warmup)
    res["floor"] = timed.pop("floor")
    floor_s = res["floor"]["median_s"]
    fl = floor_node_effects(loaded, dicts, batch)
    node_results = {m: node_effects(loaded, dicts, batch, Method(m), options=options[m]) for m in methods}
    if "atp" in node_results:
        atp_eff = node_results["atp"].effects
        res["floor"]["max_abs_diff_vs_atp"] = max(
            float((fl[k] - (atp_eff[k].to_dense() if atp_eff[k].is_sparse else atp_eff[k])).abs().max())
            for k in fl
        )
    res["nodes"] = {m: {**timed[m], "ratio_to_floor": timed[m]["median_s"] / floor_s} for m in methods}
    if exact_max_nodes is not None:
        log(f"[{name}] exact features (at most {exact_max_nodes} per site): resumed vs full re-runs")
        res["exact_features"] = bench_exact_features(loaded, dicts, batch, exact_max_nodes, floor_s)
    downstream = {p.down for p in site_pairs(loaded, set(dicts))}
    log(f"[{name}] edges (interleaved)")
    thresholds = {m: threshold_for(node_results[m], n_edge_nodes, downstream) for m in methods}
    timed = measure_many(
        {
            m: (lambda m=m: edge_effects(loaded, dicts, batch, node_results[m], node_threshold=thresholds[m]))
            for m in methods
        },
        dev,
        repeats,
        warmup,
    )
    res["edges"] = {}
    for m in methods:
        nodes, thr = node_results[m], thresholds[m]
        res["edges"][m] = {
            **timed[m],
            "node_threshold": thr,
            "ratio_to_floor": timed[m]["median_s"] / floor_s,
            "n_downstream_nodes": int(
                sum(int((effect_values(nodes.effects[k]).abs() > thr).sum()) for k in downstream)
            ),
        }
    # batched vs per-node loop (relp)
    m = "relp"
    log(f"[{name}] edges loop ({m})")
    nodes = node_results[m]
    thr = res["edges"][m]["node_threshold"]
    lrp = LRPConfig()
    batched = edge_effects(loaded, dicts, batch, nodes, node_threshold=thr)
    loops = []
    for _ in range(loop_repeats):
        loops.append(
            edges_loop(
                loaded,
                dicts,
                batch,
                nodes,
                node_threshold=thr,
                lrp=lrp,
                max_nodes_per_pair=loop_nodes_per_pair,
            )
        )
    loop = loops[-1]
    fwd = statistics.median(x["forward_s"] for x in loops)
    bwd = statistics.median(x["backward_s"] for x in loops)
    per_node = bwd / max(1, loop["n_nodes"])
    full_s = fwd + per_node * loop["n_nodes_total"] if loop["n_nodes"] < loop["n_nodes_total"] else fwd + bwd
    res["edge_loop"] = {
        "method": m,
        "node_threshold": thr,
        "n_backwards_full_loop": loop["n_nodes_total"],
        "n_backwards_timed": loop["n_nodes"],
        "extrapolated": loop["n_nodes"] < loop["n_nodes_total"],
        "loop_forward_s": fwd,
        "loop_backward_s": bwd,
        "loop_per_node_s": per_node,
        "loop_full_s": full_s,
        "loop_repeats": loop_repeats,
        "batched_s": res["edges"][m]["median_s"],
        "speedup": full_s / res["edges"][m]["median_s"],
        "max_abs_diff": max_diff_loop_vs_batched(loop["rows"], batched),
        "max_abs_edge": max(
            (float(t.coalesce().values().abs().max()) if t.is_sparse and t._nnz() else 0.0)
            for k, t in batched.edges.items()
            if k[1] != "logit"
        ),
    }
    res["discovery_thresholds"] = discovery_thresholds(node_results["relp"], batched)
    return res


#: circuit size the end-to-end discovery run aims at on a random model (the default thresholds,
#: made for trained models, keep nothing of random weights' tiny effects)
DISCOVERY_NODES, DISCOVERY_EDGES = 32, 64


def bench_exact_features(
    loaded: Any, dicts: dict[str, Any], batch: Any, max_nodes: int, floor_s: float
) -> dict[str, Any]:
    """Exact node effects (feature and error nodes) with at most ``max_nodes`` feature nodes per
    site (the largest |delta| first; every error node with a non-zero delta), once resumed and
    once with full re-runs, each timed once with its peak memory: times, ratios to the floor, the
    speedup and the max |difference| of the effects."""
    from feature_circuits.attribution.registry import ExactOptions

    def run(resume: bool) -> Any:
        opts = ExactOptions(max_nodes=max_nodes, resume=resume, progress=False)
        return node_effects(loaded, dicts, batch, Method.EXACT, options=opts)

    out: dict[str, Any] = {"max_nodes_per_site": max_nodes}
    results = {}
    for key, resume in (("resumed", True), ("full_reruns", False)):
        results[key] = run(resume)  # warm-up of this mode (and the result compared below)
        out[key] = {**measure(lambda resume=resume: run(resume), loaded.device, 1, 0)}
        out[key]["ratio_to_floor"] = out[key]["median_s"] / floor_s
        out[key]["forwards"] = int(results[key].timing_s["forwards"])
    res, full = results["resumed"], results["full_reruns"]
    patched = [torch.isfinite(v) & (v != 0) for v in res.effects.values()]
    out["patches"] = int(
        sum(
            min(max_nodes, int((d.f != 0).sum())) + int((d.err != 0).any(-1).sum())
            for d in res.deltas.values()
        )
    )
    out["nonzero_effects"] = int(sum(int(m.sum()) for m in patched))
    out["speedup"] = out["full_reruns"]["median_s"] / out["resumed"]["median_s"]
    out["max_abs_diff"] = max(
        float((res.effects[k] - full.effects[k]).nan_to_num(0.0).abs().max()) for k in res.effects
    )
    out["max_abs_effect"] = max(float(v.nan_to_num(0.0).abs().max()) for v in res.effects.values())
    return out


def _kth_largest(values: Tensor, k: int) -> float:
    """A threshold just below the k-th largest of ``values`` (all of them when there are fewer)."""
    v = values.abs().flatten()
    v = v[v > 0]
    if v.numel() == 0:
        return 0.0
    return float(torch.topk(v, min(k, v.numel())).values[-1]) * (1 - 1e-6)


def discovery_thresholds(nodes: Any, edges: Any) -> dict[str, float]:
    """Node and edge thresholds under which the benchmark batch's aggregated relp circuit has about
    :data:`DISCOVERY_NODES` nodes and :data:`DISCOVERY_EDGES` edges (for ``discover`` on the same
    random model: a circuit big enough that edges and contexts are part of the measured work)."""
    from feature_circuits.circuit import aggregate_edges, aggregate_nodes

    agg = aggregate_nodes([nodes])
    node_thr = _kth_largest(torch.cat([t.flatten() for t in agg.effects.values()]), DISCOVERY_NODES)
    sums = [t.coalesce().values() for t in aggregate_edges([edges]).values() if t.is_sparse]
    edge_thr = _kth_largest(torch.cat(sums), DISCOVERY_EDGES) if sums else 0.0
    return {"node_threshold": node_thr, "edge_threshold": edge_thr}


# ---------------------------------------------------------------------- discovery, data-parallel

#: Run in a subprocess (one process, or every rank under torchrun): ``feature-circuits discover``, then
#: this process's peak RSS into ``$FC_RSS_DIR/rank<RANK>.kib`` (a file per rank: the ranks' stderr
#: streams interleave, so a line printed there can be cut in two).
_DISCOVER_RSS = """import os, resource, sys
from pathlib import Path
from feature_circuits.cli import main
rc = main(["discover", *sys.argv[1:]])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Path(os.environ["FC_RSS_DIR"], "rank" + os.environ.get("RANK", "0") + ".kib").write_text(str(rss))
sys.exit(rc)
"""


def write_random_pairs(
    path: Path, *, n: int, seq_len: int, n_words: int, seed: int = 0, n_diff: int = 2
) -> Path:
    """``n`` contrastive pairs of ``seq_len`` random words ``w0..w{n_words-1}`` of the shaped models'
    word-level tokenizer; the patch differs at ``n_diff`` random positions, the answers are two
    different random words."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        clean = torch.randint(0, n_words, (seq_len,), generator=gen)
        patch = clean.clone()
        pos = torch.randperm(seq_len, generator=gen)[:n_diff]
        patch[pos] = (patch[pos] + 1 + torch.randint(0, n_words - 1, (n_diff,), generator=gen)) % n_words
        a, b = torch.randperm(n_words, generator=gen)[:2].tolist()
        rows.append(
            {
                "clean_prefix": " ".join(f"w{i}" for i in clean.tolist()),
                "patch_prefix": " ".join(f"w{i}" for i in patch.tolist()),
                "clean_answer": f" w{a}",
                "patch_answer": f" w{b}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _discover_once(args: list[str], out: Path, nproc: int, threads: int, device: str) -> dict[str, Any]:
    """``feature-circuits discover ARGS --out OUT`` in fresh processes (``nproc`` > 1: torchrun on
    127.0.0.1); its timings (rank 0's circuit.json), wall time and each process's peak RSS."""
    import socket
    import subprocess

    script = out.parent / "_discover_rss.py"
    script.write_text(_DISCOVER_RSS)
    root = Path(__file__).resolve().parents[1]
    rss_dir = out.parent / f"_rss_{out.name}"
    rss_dir.mkdir(parents=True, exist_ok=True)
    for old in rss_dir.glob("rank*.kib"):
        old.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root), "FC_RSS_DIR": str(rss_dir)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        launcher += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    else:
        launcher = [sys.executable]
    cmd = [*launcher, str(script), *args, f"--out={out}", f"--device={device}", "--no-progress", "--no-html"]
    cmd += [f"--threads={threads}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"discover ({nproc} process(es)) failed:\n{res.stderr[-3000:]}")
    circuit = json.loads((out / "circuit.json").read_text())
    timing = circuit["timing_s"]
    ranks = sorted(rss_dir.glob("rank*.kib"), key=lambda f: int(f.stem.removeprefix("rank")))
    rss = [int(f.read_text()) / 1024 for f in ranks]
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "wall_s": wall,
        "discovery_s": timing["total"] - timing["load"],  # data, nodes, edges, merge, aggregate
        "timing_s": timing,
        "peak_rss_mib": rss,
        "graph": (
            [(n["id"], round(n["effect"], 5)) for n in circuit["nodes"]],
            [(e["source"], e["target"], round(e["weight"], 5)) for e in circuit["edges"]],
        ),
        "num_examples": circuit["num_examples"],
    }


def bench_discovery(
    model_dir: Path,
    sae_root: Path,
    work: Path,
    *,
    n_examples: int,
    batch_size: int,
    seq_len: int,
    n_words: int,
    floor_s: float,
    nproc: int = 2,
    threads: int = 1,
    device: str = "cpu",
    thresholds: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Discovery end to end (relp nodes and edges; ``thresholds``: ``node_threshold`` /
    ``edge_threshold``, default the CLI's) on ``n_examples`` random pairs in one process and in
    ``nproc`` torchrun processes (``threads`` torch threads each); the time of each as a ratio to the
    dense floor of the same batches (``floor_s`` per batch times the number of batches), the
    data-parallel speedup, and whether the two circuits are the same."""
    data = write_random_pairs(work / "pairs.jsonl", n=n_examples, seq_len=seq_len, n_words=n_words)
    args = [f"--model={model_dir}", f"--saes={sae_root}", f"--dataset={data}"]
    args += [f"--num-examples={n_examples}", f"--batch-size={batch_size}", "--method=relp"]
    for name, value in (thresholds or {}).items():
        args.append(f"--{name.replace('_', '-')}={value!r}")
    n_batches = -(-n_examples // batch_size)
    runs = {}
    for k in (1, nproc):
        log(f"discovery on {n_examples} examples, {k} process(es)")
        runs[k] = _discover_once(args, work / f"out{k}", k, threads, device)
    one, many = runs[1], runs[nproc]
    same = one["graph"] == many["graph"]
    for r in (one, many):
        r["n_nodes"], r["n_edges"] = len(r["graph"][0]), len(r["graph"][1])
        r["ratio_to_floor"] = r["discovery_s"] / (floor_s * n_batches)
        del r["graph"]
    return {
        "n_examples": n_examples,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "thresholds": dict(thresholds or {}),
        "n_batches": n_batches,
        "floor_per_batch_s": floor_s,
        "one_process": one,
        "data_parallel": many,
        "processes": nproc,
        "speedup": one["discovery_s"] / many["discovery_s"],
        "same_circuit": same,
    }


def _fmt_mb(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def markdown(report: dict[str, Any]) -> str:
    out = [f"Machine: {report['machine']['summary']}", ""]
    for name, r in report["models"].items():
        if "error" in r:
            out += [f"## {name}", "", f"not measured: {r['error']}", ""]
            continue
        out += [
            f"## {name}",
            "",
            (
                f"b={r['batch_size']}, s={r['seq_len']}, {r['n_sites']} SAEs of {r['dict_size']} features, "
                f"ig steps={r['ig_steps']}; median of {r['repeats']} after {r['warmup']} warm-up"
            ),
            "",
            "| computation | median (s) | ratio to floor | peak mem above start (MB) |",
            "|---|---|---|---|",
            (
                f"| floor (2 fwd + 1 bwd, SAEs spliced) | {r['floor']['median_s']:.3f} | 1.00 | "
                f"{_fmt_mb(r['floor']['peak_mem_mb'])} |"
            ),
        ]
        for m, x in r["nodes"].items():
            out.append(
                f"| nodes {m} | {x['median_s']:.3f} | {x['ratio_to_floor']:.2f} | "
                f"{_fmt_mb(x['peak_mem_mb'])} |"
            )
        for m, x in r["edges"].items():
            out.append(
                f"| edges {m} ({x['n_downstream_nodes']} downstream nodes) | {x['median_s']:.3f} | "
                f"{x['ratio_to_floor']:.2f} | {_fmt_mb(x['peak_mem_mb'])} |"
            )
        ef = r.get("exact_features")
        if ef is not None:
            for key, what in (("resumed", "resumed"), ("full_reruns", "full re-runs")):
                x = ef[key]
                out.append(
                    f"| exact features, {what} ({ef['patches']} patches, <= {ef['max_nodes_per_site']} "
                    f"features per site) | {x['median_s']:.3f} | {x['ratio_to_floor']:.2f} | "
                    f"{_fmt_mb(x['peak_mem_mb'])} |"
                )
        lp = r["edge_loop"]
        how = (
            f"extrapolated from {lp['n_backwards_timed']} timed backwards "
            f"({lp['loop_per_node_s'] * 1e3:.1f} ms each)"
            if lp["extrapolated"]
            else "measured"
        )
        out += [""]
        if ef is not None:
            out += [
                (
                    f"Exact features: resumed {ef['speedup']:.2f}x faster than full re-runs, "
                    f"max |difference| {ef['max_abs_diff']:.2e} (max |effect| {ef['max_abs_effect']:.2e})."
                ),
                "",
            ]
        out += [
            (
                f"Edges ({lp['method']}), batched VJPs vs one backward per downstream node "
                f"({lp['n_backwards_full_loop']} backwards, {how}): loop {lp['loop_full_s']:.2f} s, batched "
                f"{lp['batched_s']:.3f} s, speedup {lp['speedup']:.1f}x; "
                f"max |loop - batched| = {lp['max_abs_diff']:.2e} "
                f"(max |edge| {lp['max_abs_edge']:.2e})."
            ),
            "",
        ]
        if "discovery" in r:
            d = r["discovery"]
            if "error" in d:
                out += [f"Discovery end to end: not measured: {d['error']}", ""]
            else:
                out += [
                    (
                        f"Discovery end to end (relp nodes + edges, {d['n_examples']} examples in "
                        f"{d['n_batches']} batches of {d['batch_size']} x {d['seq_len']}; dense floor "
                        f"{d['floor_per_batch_s']:.3f} s per batch"
                        + "".join(
                            f"; --{k.replace('_', '-')} {v:.3g}" for k, v in d.get("thresholds", {}).items()
                        )
                        + "):"
                    ),
                    "",
                    "| processes x threads | discovery (s) | ratio to floor | peak RSS per process (MiB) "
                    "| nodes | edges |",
                    "|---|---|---|---|---|---|",
                ]
                for x in (d["one_process"], d["data_parallel"]):
                    rss = ", ".join(f"{v:.0f}" for v in x["peak_rss_mib"])
                    out.append(
                        f"| {x['processes']} x {x['threads_per_process']} | {x['discovery_s']:.2f} | "
                        f"{x['ratio_to_floor']:.2f} | {rss} | {x['n_nodes']} | {x['n_edges']} |"
                    )
                out += [
                    "",
                    (
                        f"Data-parallel speedup of {d['processes']} processes: {d['speedup']:.2f}x; "
                        f"same circuit: {'yes' if d['same_circuit'] else 'NO'}."
                    ),
                    "",
                ]
        for note in r.get("notes", []):
            out += [note, ""]
    ex = report.get("exact_components")
    if ex is not None:
        out += ["## Exact component patching: resumed vs full re-runs", ""]
        if "error" in ex:
            out += [f"not measured: {ex['error']}", ""]
        else:
            from experiments.bench_exact import MARKDOWN_HEAD, markdown_row

            out += [MARKDOWN_HEAD, markdown_row(ex), ""]
    if report.get("targets"):
        out += ["## Targets", "", "| model | target | value | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            out.append(f"| {t['model']} | {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(out) + "\n"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in report["models"].items():
        if "error" in r:
            continue
        relp = r["nodes"]["relp"]["ratio_to_floor"]
        rows.append(
            {"model": name, "target": "relp nodes <= 1.5x floor", "value": f"{relp:.2f}x", "met": relp <= 1.5}
        )
        if name == "pythia-70m-shaped":  # issue 13: the sparse path against the dense floor
            mem = r["nodes"]["relp"]["peak_mem_mb"] / max(1e-9, r["floor"]["peak_mem_mb"])
            rows.append(
                {
                    "model": name,
                    "target": "relp nodes <= 0.5x dense floor, peak memory <= 1/10",
                    "value": f"{relp:.2f}x, memory {mem:.2f}x",
                    "met": relp <= 0.5 and mem <= 0.1,
                }
            )
        ig_over = r["nodes"]["ig"]["median_s"] / r["nodes"]["relp"]["median_s"] if "ig" in r["nodes"] else 0
        if "ig" in r["nodes"]:
            rows.append(
                {
                    "model": name,
                    "target": "ig(10) >= 5x slower than relp",
                    "value": f"{ig_over:.1f}x",
                    "met": ig_over >= 5,
                }
            )
        sp = r["edge_loop"]["speedup"]
        want = 10 if report["machine"]["device"].startswith("cuda") else 30
        rows.append(
            {
                "model": name,
                "target": f"batched edges >= {want}x faster than per-node loop",
                "value": f"{sp:.1f}x",
                "met": sp >= want,
            }
        )
        d = r.get("discovery")
        if d and "error" not in d:
            rows.append(
                {
                    "model": name,
                    "target": f"{d['processes']}-process data-parallel discovery >= 1.6x one process, "
                    "same circuit",
                    "value": f"{d['speedup']:.2f}x, {'same' if d['same_circuit'] else 'DIFFERENT'}",
                    "met": d["speedup"] >= 1.6 and d["same_circuit"],
                }
            )
    ex = report.get("exact_components")
    if ex and "error" not in ex:
        rows.append(
            {
                "model": f"{ex['family']} {ex['n_layers']}x{ex['d_model']}",
                "target": "exact component patching >= 3x faster than full re-runs",
                "value": f"{ex['speedup']:.2f}x",
                "met": ex["speedup"] >= 3,
            }
        )
    return rows


def machine_summary(device: torch.device) -> dict[str, Any]:
    load = os.getloadavg()
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "loadavg_start": [round(x, 2) for x in load],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    gpu = f" ({info['gpu']})" if "gpu" in info else ""
    info["summary"] = (
        f"{info['cpu_count']}-core CPU ({cpu or 'unknown'}), torch {torch.__version__} with "
        f"{info['torch_threads']} threads, device {device}{gpu}, load average at start "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )
    return info


def _bench_shaped(
    key: str,
    family: str,
    config: dict[str, Any],
    *,
    dev: torch.device,
    n_features: int,
    active: int,
    b: int,
    s: int,
    repeats: int,
    warmup: int,
    quick: bool,
    discovery_examples: int,
    nproc: int,
    threads: int,
    log: Callable[[str], None],
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:
    """Build a random model of ``family``/``config`` with random SAEs, run :func:`bench_model` on a
    random batch and (``discovery_examples`` > 0) :func:`bench_discovery`."""
    with tempfile.TemporaryDirectory(prefix=f"{key}-") as tmp:
        log(f"building the {key} model and random SAEs")
        model_dir, sae_root = build_shaped(tmp, family, config, n_features=n_features, active=active)
        loaded, dicts = load_for_attribution(model_dir, sae_root, device=dev)
        vocab = int(loaded.hf_model.config.vocab_size)
        batch = random_batch(min(vocab, 256), b, s)
        r = bench_model(
            key,
            loaded,
            dicts,
            batch,
            repeats=repeats,
            warmup=warmup,
            n_edge_nodes=8 if quick else 256,
            loop_nodes_per_pair=2 if quick else 4,
            loop_repeats=1,
            methods=methods,
            exact_max_nodes=8 if quick else 64,
            log=log,
        )
        clean = node_effects(loaded, dicts, batch, Method.ATP).clean
        r["mean_active_features_per_token"] = {
            k: float(((v.f.to_dense() if v.f.is_sparse else v.f) > 0).sum(-1).float().mean())
            for k, v in clean.items()
        }
        r["family"] = family
        r["shape"] = dict(config)
        r["sae_calibration"] = (
            f"random AutoEncoder({config['hidden_size']}, {n_features}); encoder bias shifted "
            f"so ~{active} features/token are active on random-token activations"
        )
        del loaded, dicts, clean
        gc.collect()
        if discovery_examples > 0:
            try:
                r["discovery"] = bench_discovery(
                    model_dir,
                    sae_root,
                    Path(tmp),
                    n_examples=discovery_examples,
                    batch_size=b,
                    seq_len=s,
                    n_words=min(vocab, 256) - 2,
                    floor_s=r["floor"]["median_s"],
                    nproc=nproc,
                    threads=threads,
                    device=str(dev),
                    thresholds=r.get("discovery_thresholds"),
                    log=log,
                )
            except Exception as err:  # recorded, the rest of the report stands
                r["discovery"] = {"error": f"{type(err).__name__}: {err}"}
                log(f"{key} discovery: {err}")
    return r


def run_benchmark(
    out: str | Path,
    *,
    quick: bool = False,
    skip_pythia: bool = False,
    skip_embedded: bool = False,
    gemma: bool = False,
    device: str = "cpu",
    pythia_shape: dict[str, Any] | None = None,
    gemma_shape: dict[str, Any] | None = None,
    n_features: int = 32768,
    gemma_features: int = 16384,
    active: int = 64,
    pythia_b: int = 4,
    pythia_s: int = 16,
    embedded_b: int = 16,
    discovery_examples: int = 100,
    nproc: int = 2,
    threads: int = 1,
    methods: tuple[str, ...] = METHODS,
    exact: bool = True,
    exact_shape: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Benchmark the embedded default, a Pythia-70M-shaped random model and (``gemma``) a
    Gemma-2-2B-shaped one of reduced depth; writes bench.json and bench.md under ``out``.
    ``pythia_shape`` / ``gemma_shape`` override the shapes, ``n_features`` / ``gemma_features`` the
    SAE sizes (tests use tiny ones); ``discovery_examples`` (0: skip) is the size of the end-to-end
    discovery run in one and in ``nproc`` processes of ``threads`` threads each; ``exact`` adds exact
    component patching resumed vs full re-runs (:func:`experiments.bench_exact.bench_exact_components`,
    a 30-layer shape, or ``exact_shape``'s keywords)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    repeats, warmup = (1, 1) if quick else (3, 1)
    report: dict[str, Any] = {
        "machine": machine_summary(dev),
        "quick": quick,
        "models": {},
        "memory_note": "CUDA: max_memory_allocated above start; CPU: peak RSS above start, "
        "sampled every 2 ms after malloc_trim (coarse); discovery: ru_maxrss of each process",
    }
    if not skip_embedded:
        try:
            loaded, dicts = load_for_attribution("embedded", "embedded", device=dev)
            batch = embedded_batch(loaded.tokenizer, embedded_b)
            report["models"]["embedded"] = bench_model(
                "embedded",
                loaded,
                dicts,
                batch,
                repeats=repeats,
                warmup=warmup,
                n_edge_nodes=8 if quick else 256,
                loop_nodes_per_pair=None,
                loop_repeats=1 if quick else 3,
                methods=methods,
                exact_max_nodes=8 if quick else 64,
                log=log,
            )
            del loaded, dicts
        except Exception as err:
            report["models"]["embedded"] = {"error": f"{type(err).__name__}: {err}"}
            log(f"embedded: {err}")
    common: dict[str, Any] = dict(
        dev=dev,
        active=active,
        b=pythia_b,
        s=pythia_s,
        repeats=repeats,
        warmup=warmup,
        quick=quick,
        discovery_examples=discovery_examples,
        nproc=nproc,
        threads=threads,
        methods=methods,
        log=log,
    )
    if not skip_pythia:
        key = "pythia-70m-shaped" if pythia_shape is None else "pythia-shaped-custom"
        cfg = dict(PYTHIA_70M_SHAPE if pythia_shape is None else {**PYTHIA_70M_SHAPE, **pythia_shape})
        try:
            report["models"][key] = _bench_shaped(key, "gpt_neox", cfg, n_features=n_features, **common)
        except Exception as err:  # recorded, the rest of the report stands
            report["models"][key] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{key}: {err}")
    if gemma:
        key = "gemma-2-2b-shaped" if gemma_shape is None else "gemma-shaped-custom"
        over = GEMMA_BENCH_OVERRIDES if gemma_shape is None else gemma_shape
        cfg = {**GEMMA2_2B_SHAPE, **over}
        try:
            r = _bench_shaped(key, "gemma2", cfg, n_features=gemma_features, **common)
            r["notes"] = [
                f"Gemma-2-2B shape with {cfg['num_hidden_layers']} of its 26 layers and a vocabulary of "
                f"{cfg['vocab_size']} (not 256000: the tied embedding alone would be 2.4 GB of float32); "
                f"random SAEs of {gemma_features} features on every site."
            ]
            report["models"][key] = r
        except Exception as err:
            report["models"][key] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{key}: {err}")
    if exact:
        log("exact component patching: full re-runs vs resumed (experiments/bench_exact.py)")
        try:
            from experiments.bench_exact import bench_exact_components

            small: dict[str, Any] = dict(n_layers=4, d_model=32, n_heads=4, seq_len=6, n_examples=2)
            shape = {**(small if quick else {}), **(exact_shape or {})}
            report["exact_components"] = bench_exact_components(device=device, **shape)
        except Exception as err:  # recorded, the rest of the report stands
            report["exact_components"] = {"error": f"{type(err).__name__}: {err}"}
            log(f"exact components: {err}")
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="feature-circuits bench",
        description="Time and memory of node/edge attribution "
        "(atp, relp, ig) relative to the 2-forward-1-backward floor, and of discovery end to end in "
        "one and in several (torchrun) processes.",
    )
    p.add_argument("--out", required=True, help="output directory (bench.json, bench.md)")
    p.add_argument("--quick", action="store_true", help="1 repeat, few edge nodes")
    p.add_argument(
        "--skip-pythia", action="store_true", help="skip the Pythia-70M-shaped model (~2.5 GB of SAEs)"
    )
    p.add_argument("--skip-embedded", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--gemma",
        action="store_true",
        help="also the Gemma-2-2B-shaped model (width 2304, 2 layers, SAEs of 16384 features)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is steadier on a shared, loaded machine",
    )
    p.add_argument("--pythia-batch", type=int, default=4)
    p.add_argument("--pythia-seq", type=int, default=16)
    p.add_argument("--embedded-batch", type=int, default=16)
    p.add_argument(
        "--discovery-examples",
        type=int,
        default=100,
        help="examples of the end-to-end discovery run on the shaped models (0: skip; default 100)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated node/edge methods to time (default: %(default)s; relp is always run)",
    )
    p.add_argument(
        "--no-exact", action="store_true", help="skip exact component patching (resumed vs full re-runs)"
    )
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run_benchmark(
        args.out,
        quick=args.quick,
        skip_pythia=args.skip_pythia,
        skip_embedded=args.skip_embedded,
        gemma=args.gemma,
        device=args.device,
        pythia_b=args.pythia_batch,
        pythia_s=args.pythia_seq,
        embedded_b=args.embedded_batch,
        discovery_examples=args.discovery_examples,
        nproc=args.nproc,
        exact=not args.no_exact,
        threads=args.threads or 1,
        methods=tuple(dict.fromkeys(["relp", *(m.strip() for m in args.methods.split(",") if m.strip())])),
        log=lambda m: print(m, file=sys.stderr),
    )
    sys.stdout.write(markdown(report))
    return 0
