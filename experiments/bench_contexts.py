#!/usr/bin/env python
"""The cost of the feature-contexts pass against the node pass, on the `make discover` settings
(embedded model and SAEs, sva_rc train, 64 examples, batch size 16, relp, node threshold 0.1).

Prints the median of ``--repeats`` runs of each pass, in seconds, and their ratio:

    .venv/bin/python -m experiments.bench_contexts [--repeats 3] [--device cpu] [--contexts FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--contexts", default=None, help="a --contexts file to include in the pass")
    args = parser.parse_args()

    from feature_circuits.attribution import load_for_attribution, method_spec, node_effects
    from feature_circuits.circuit import NodeAccumulator, build_circuit
    from feature_circuits.circuit.contexts import record_activations
    from feature_circuits.data import load_pairs, make_batches, resolve_dataset
    from feature_circuits.metrics import MetricName, get_metric
    from feature_circuits.runtime import apply_threads, seed_everything
    from feature_circuits.types import Aggregation, Method

    threads = apply_threads(None)
    seed_everything(0)
    loaded, dicts = load_for_attribution("embedded", "embedded", device=args.device)
    pairs = load_pairs(resolve_dataset("sva_rc", "train"), loaded.tokenizer, limit=args.num_examples)
    batches = make_batches(pairs, loaded.tokenizer, args.batch_size)
    metric = get_metric(MetricName.LOGIT_DIFF)
    options = method_spec(Method.RELP).options_from({"steps": 10})

    node_times, context_times = [], []
    circuit = None
    for _ in range(args.repeats):
        acc = NodeAccumulator(Aggregation.SUM)
        t = time.perf_counter()
        for batch in batches:
            acc.add(node_effects(loaded, dicts, batch, Method.RELP, metric=metric, options=options))
        node_times.append(time.perf_counter() - t)
        circuit = build_circuit(
            acc.result(),
            None,
            node_threshold=0.1,
            edge_threshold=0.02,
            model="embedded",
            saes="embedded",
            method=Method.RELP,
            dataset="sva_rc",
            split="train",
            last_resid=loaded.last_resid.name,
            n_layers=loaded.n_layers,
        )
        t = time.perf_counter()
        circuit = record_activations(
            circuit, loaded, dicts, batches, contexts=args.contexts, batch_size=args.batch_size, enabled=False
        )
        context_times.append(time.perf_counter() - t)
    assert circuit is not None
    nodes, contexts = statistics.median(node_times), statistics.median(context_times)
    print(
        f"embedded, sva_rc train, {len(pairs)} examples in {len(batches)} batches, {threads} threads, "
        f"{args.device}; circuit: {len(circuit.nodes)} nodes"
    )
    print(f"node pass (relp):  {nodes:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in node_times)})")
    print(f"contexts pass:     {contexts:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in context_times)})")
    print(f"contexts / nodes:  {contexts / nodes:.2f}")


if __name__ == "__main__":
    main()
