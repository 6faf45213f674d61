"""Peak memory of discovery against the number of examples: streaming (what ``discover`` does) and,
for comparison, keeping every batch's effects in lists and aggregating at the end (what it did
before the accumulators).

Each size runs in a fresh subprocess (so one run's heap does not hide the next one's) that reports
its own peak resident set size, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, after discovery of
nodes and edges on the embedded default (relp). The shipped ``sva_rc_train.jsonl`` has 400 examples,
so a larger train file is drawn from the toy grammar (``feature_circuits.toy.grammar``, the same
structure and split rule: distinct relative-clause pairs of training combinations) into a temporary
file and passed as the dataset.

    python -m experiments.memory_scaling --sizes 100,1000,10000 --out bench/memory.json
    python -m experiments.memory_scaling --sizes 100,1000 --mode both     # with the list baseline
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` distinct SVA relative-clause training pairs from the toy grammar, as JSON Lines."""
    from feature_circuits.toy import grammar
    from feature_circuits.toy.datasets import write_jsonl

    rows = grammar.generate_sva_pairs("rc", n, "train", seed, strict=False)
    if len(rows) < n:
        raise SystemExit(f"the grammar has only {len(rows)} distinct rc training pairs (asked for {n})")
    write_jsonl(path, rows)
    return path


def _child(
    n: int, dataset: str, mode: str, batch_size: int, threads: int, nodes_only: bool
) -> dict[str, Any]:
    """One discovery in this process; returns its peak RSS and timings."""
    t0 = time.perf_counter()
    if mode == "stream":
        from feature_circuits.pipeline import DiscoverConfig, discover

        circuit = discover(
            DiscoverConfig(
                dataset=dataset,
                num_examples=n,
                batch_size=batch_size,
                threads=threads,
                nodes_only=nodes_only,
                progress=False,
                out=None,
            )
        )
        nodes, edges, examples = len(circuit.nodes), len(circuit.edges), circuit.num_examples
    else:  # the list baseline: every batch's NodeEffects / EdgeEffects kept until the end
        from feature_circuits.attribution import edge_effects, load_for_attribution, node_effects
        from feature_circuits.circuit import aggregate_edges, aggregate_nodes, build_circuit
        from feature_circuits.data import load_pairs, make_batches
        from feature_circuits.runtime import apply_threads, seed_everything
        from feature_circuits.types import Method

        apply_threads(threads)
        seed_everything(0)
        loaded, dicts = load_for_attribution("embedded", "embedded")
        pairs = load_pairs(dataset, loaded.tokenizer, limit=n)
        node_list, edge_list = [], []
        for batch in make_batches(pairs, loaded.tokenizer, batch_size):
            ne = node_effects(loaded, dicts, batch, Method.RELP)
            node_list.append(ne)
            if not nodes_only:
                edge_list.append(
                    edge_effects(loaded, dicts, batch, ne, node_threshold=0.1, method=Method.RELP)
                )
        circuit = build_circuit(
            aggregate_nodes(node_list),
            aggregate_edges(edge_list) if edge_list else None,
            node_threshold=0.1,
            edge_threshold=0.02,
            model="embedded",
            saes="embedded",
            method=Method.RELP,
            dataset=dataset,
            split="train",
            last_resid=loaded.last_resid.name,
            n_layers=loaded.n_layers,
        )
        nodes, edges, examples = len(circuit.nodes), len(circuit.edges), len(pairs)
    return {
        "num_examples": examples,
        "mode": mode,
        "edges_computed": not nodes_only,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": round(time.perf_counter() - t0, 2),
        "nodes": nodes,
        "edges": edges,
    }


def run(
    sizes: list[int], modes: list[str], batch_size: int, threads: int, nodes_only: bool = False, log=print
) -> dict[str, Any]:
    import os

    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="fc-memory-") as tmp:
        data = write_dataset(Path(tmp) / "sva_rc_big.jsonl", max(sizes))
        for mode in modes:
            for n in sizes:
                cmd = [sys.executable, "-m", "experiments.memory_scaling", "--child", str(n)]
                cmd += ["--dataset", str(data), "--mode", mode, "--batch-size", str(batch_size)]
                cmd += ["--threads", str(threads)] + (["--nodes-only"] if nodes_only else [])
                res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise SystemExit(f"child {mode} {n} failed:\n{res.stderr[-4000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                log(
                    f"{mode:6s} n={row['num_examples']:6d}  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
                    f"{row['wall_s']:7.1f} s  {row['nodes']} nodes {row['edges']} edges"
                )
                rows.append(row)
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "batch_size": batch_size,
        "method": "relp",
        "model": "embedded",
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    out = [
        f"relp on the embedded default, batch size {report['batch_size']}, "
        f"{report['machine']['torch_threads']} torch thread(s)",
        "",
        "| mode | examples | edges computed | peak RSS (MiB) | wall (s) | nodes | edges |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        out.append(
            f"| {r['mode']} | {r['num_examples']} | {'yes' if r['edges_computed'] else 'no'} | "
            f"{r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | "
            f"{r['nodes']} | {r['edges']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.memory_scaling", description=__doc__)
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated example counts")
    ap.add_argument("--mode", choices=["stream", "lists", "both"], default="stream")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nodes-only", action="store_true", help="skip the edges (node effects only)")
    ap.add_argument("--out", default=None, help="write the report here (JSON; a .md beside it)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        row = _child(args.child, args.dataset, args.mode, args.batch_size, args.threads, args.nodes_only)
        print(json.dumps(row))
        return 0
    modes = ["stream", "lists"] if args.mode == "both" else [args.mode]
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    report = run(
        sizes, modes, args.batch_size, args.threads, args.nodes_only, log=lambda m: print(m, file=sys.stderr)
    )
    sys.stdout.write(markdown(report))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
