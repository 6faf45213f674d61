"""Sparse vs dense feature path: wall time and peak memory of node effects in one run.

On a randomly initialised Pythia-70M-shaped GPT-NeoX (width 512, 6 layers, 19 sites) with one random
32768-feature SAE per site whose encoder bias is shifted to ~64 active features per token
(:func:`experiments.benchmark.build_pythia_shaped`), the node pass of ``method`` (default relp) runs
on the dense path (``feature_path="dense"``: every site holds (b, s, F) features, gradients and
deltas) and on the sparse path (``feature_path="sparse"``: only the features active in the clean or
the patch input, docs/algorithms.md, "Sparse feature path"), interleaved with the dense floor of
:func:`experiments.benchmark.floor_node_effects`; the ratios are measured in the same run, and the
largest difference between the two paths' effects is reported with them.

Memory is peak memory above the start of each call (:class:`experiments.benchmark.PeakMemory`:
CUDA max_memory_allocated, CPU sampled RSS), so the model and SAE weights, loaded before, are not
in it; their size is reported separately.

    python -m experiments.bench_sparse --out bench/sparse            # CPU, b=4, s=16
    python -m experiments.bench_sparse --out bench/sparse --device cuda --batch-size 32 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark import (
    build_pythia_shaped,
    floor_node_effects,
    machine_summary,
    measure_many,
    random_batch,
)
from feature_circuits.attribution import SparseSiteState, load_for_attribution, method_spec, node_effects
from feature_circuits.types import Method

__all__ = ["bench_sparse_nodes", "main", "markdown", "run_bench_sparse"]


def _weights_mb(loaded: Any, dicts: dict[str, Any]) -> float:
    n = sum(p.numel() * p.element_size() for p in loaded.hf_model.parameters())
    for d in dicts.values():
        if isinstance(d, torch.nn.Module):
            n += sum(p.numel() * p.element_size() for p in d.parameters())
    return n / 2**20


def bench_sparse_nodes(
    loaded: Any,
    dicts: dict[str, Any],
    batch: Any,
    *,
    method: str = "relp",
    repeats: int = 3,
    warmup: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time and peak memory of ``method``'s node effects on the dense and on the sparse feature
    path and of the dense floor, interleaved (:func:`experiments.benchmark.measure_many`); the
    ratios sparse / dense, the largest |sparse - dense| effect, and the active features per row."""
    dev = loaded.device
    options = method_spec(method).options_from({})
    m = Method(method)
    fns: dict[str, Callable[[], Any]] = {
        "floor": lambda: floor_node_effects(loaded, dicts, batch),
        "dense": lambda: node_effects(loaded, dicts, batch, m, options=options, feature_path="dense"),
        "sparse": lambda: node_effects(loaded, dicts, batch, m, options=options, feature_path="sparse"),
    }
    log(
        f"{method} node effects: floor, dense, sparse (interleaved, {repeats} repeats after {warmup} warm-up)"
    )
    timed = measure_many(fns, dev, repeats, warmup)
    dense = node_effects(loaded, dicts, batch, m, options=options, feature_path="dense")
    sparse = node_effects(loaded, dicts, batch, m, options=options, feature_path="sparse")
    max_diff = max_eff = 0.0
    slots, rows, k_max = 0, 0, 0
    for site, eff in dense.effects.items():
        max_diff = max(max_diff, float((sparse.effects[site].to_dense() - eff).abs().max()))
        max_eff = max(max_eff, float(eff.abs().max()))
        c = sparse.clean[site]
        assert isinstance(c, SparseSiteState)
        slots += int(c.col.numel())
        rows += c.n_rows
        k_max = max(k_max, int(c.crow.diff().max()) if c.n_rows else 0)
    del dense, sparse
    d, s, fl = timed["dense"], timed["sparse"], timed["floor"]
    return {
        "method": method,
        "batch_size": int(batch.clean.shape[0]),
        "seq_len": int(batch.clean.shape[1]),
        "n_sites": len(dicts),
        "dict_size": int(next(iter(dicts.values())).dict_size),
        "repeats": repeats,
        "warmup": warmup,
        "weights_mb": _weights_mb(loaded, dicts),
        "floor": fl,
        "dense": d,
        "sparse": s,
        "time_sparse_over_dense": s["median_s"] / d["median_s"],
        "time_sparse_over_floor": s["median_s"] / fl["median_s"],
        "time_dense_over_floor": d["median_s"] / fl["median_s"],
        "peak_mem_sparse_over_dense": s["peak_mem_mb"] / max(d["peak_mem_mb"], 1e-9),
        "max_abs_diff_sparse_vs_dense": max_diff,
        "max_abs_effect": max_eff,
        "active_per_row_mean": slots / max(rows, 1),
        "active_per_row_max": k_max,
        "targets": {
            "time <= 0.5x dense": s["median_s"] <= 0.5 * d["median_s"],
            "peak memory <= 1/10 dense": s["peak_mem_mb"] <= d["peak_mem_mb"] / 10,
        },
    }


def markdown(r: dict[str, Any], machine: str = "") -> str:
    lines = [
        f"Machine: {machine}" if machine else "",
        "",
        (
            f"{r['method']} node effects, b={r['batch_size']}, s={r['seq_len']}, {r['n_sites']} SAEs of "
            f"{r['dict_size']} features ({r['active_per_row_mean']:.0f} active in clean or patch per "
            f"row on average, at most {r['active_per_row_max']}); median of {r['repeats']} after "
            f"{r['warmup']} warm-up; weights {r['weights_mb']:.0f} MB (not in the peaks)"
        ),
        "",
        "| computation | median (s) | ratio to dense | peak mem above start (MB) | ratio to dense |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("floor", "dense floor"), ("dense", "dense path"), ("sparse", "sparse path")):
        x = r[name]
        lines.append(
            f"| {label} | {x['median_s']:.3f} | {x['median_s'] / r['dense']['median_s']:.2f} | "
            f"{x['peak_mem_mb']:.0f} | {x['peak_mem_mb'] / max(r['dense']['peak_mem_mb'], 1e-9):.3f} |"
        )
    lines += [
        "",
        (
            f"max |sparse - dense| effect {r['max_abs_diff_sparse_vs_dense']:.2e} "
            f"(max |effect| {r['max_abs_effect']:.2e}); targets: "
            + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items())
        ),
        "",
    ]
    return "\n".join(lines)


def run_bench_sparse(
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    method: str = "relp",
    n_features: int = 32768,
    active: int = 64,
    batch_size: int = 4,
    seq_len: int = 16,
    shape: dict[str, Any] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the Pythia-70M-shaped model and SAEs in a temporary folder, run
    :func:`bench_sparse_nodes` on one random batch, and (``out``) write ``sparse.json`` and
    ``sparse.md`` there. ``shape`` overrides the model shape (tests use tiny ones)."""
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"building a Pythia-70M-shaped model with {n_features}-feature SAEs in {tmp}")
        model_dir, sae_root = build_pythia_shaped(tmp, n_features=n_features, active=active, shape=shape)
        loaded, dicts = load_for_attribution(model_dir, sae_root, device=dev)
        batch = random_batch(min(256, loaded.hf_model.config.vocab_size), batch_size, seq_len)
        res = bench_sparse_nodes(loaded, dicts, batch, method=method, repeats=repeats, warmup=warmup, log=log)
    machine = machine_summary(dev)
    report = {"machine": machine, "pythia_shape_overrides": shape or {}, **res}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sparse.json").write_text(json.dumps(report, indent=2))
        (out / "sparse.md").write_text(markdown(res, str(machine.get("summary", ""))))
    return report


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_sparse", description=doc)
    ap.add_argument("--out", type=Path, default=None, help="folder for sparse.json and sparse.md")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="relp", choices=["atp", "relp", "ig"])
    ap.add_argument("--n-features", type=int, default=32768)
    ap.add_argument("--active", type=int, default=64, help="active features per token (on average)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    report = run_bench_sparse(
        args.out,
        device=args.device,
        method=args.method,
        n_features=args.n_features,
        active=args.active,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        repeats=args.repeats,
        warmup=args.warmup,
        log=lambda s: print(s, file=sys.stderr),
    )
    print(markdown(report, str(report["machine"].get("summary", ""))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
