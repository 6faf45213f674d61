"""Compare atp, ig and relp node effects with exact activation patching (spec section 3).

Prints the Pearson correlation of each method with exact per site kind (embed/attn/mlp/resid),
separately for feature nodes and error nodes, and the wall time per method.

    .venv/bin/python scripts/attribution_report.py --n 24
    .venv/bin/python scripts/attribution_report.py --saes random   # random SAEs (if none are shipped)

Exact patching is run for every error node and, per site and batch, the ``--max-nodes`` feature nodes
with the largest |delta| (all of them when that is fewer); correlations use the nodes exact patched
(features with delta = 0 are left out: every method gives them exactly 0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from feature_circuits.attribution import load_for_attribution, node_effects
from feature_circuits.dictionaries import DictionaryError
from feature_circuits.types import DATA_DIR, EMBEDDED_SAE_ROOT, Method


def random_saes(loaded, dict_size: int, seed: int) -> Path:
    from dictionary_learning import AutoEncoder

    root = Path(tempfile.mkdtemp(prefix="random_saes_"))
    torch.manual_seed(seed)
    for site in loaded.sites:
        ae = AutoEncoder(site.d_model, dict_size)
        path = root / "random" / site.marks_dir / f"x_{dict_size}" / "ae.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict(), path)
    return root / "random"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--saes", default="embedded", help="embedded | marks | neurons | random | a Marks-layout path")
    ap.add_argument("--data", default=str(DATA_DIR / "sva_rc_train.jsonl"))
    ap.add_argument("--n", type=int, default=24, help="number of pairs")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10, help="IG steps")
    ap.add_argument("--max-nodes", type=int, default=3000, help="exact: feature nodes per site and batch")
    ap.add_argument("--dict-size", type=int, default=512, help="--saes random: features per site")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from feature_circuits.data import load_pairs, make_batches

    torch.set_grad_enabled(True)
    saes = args.saes
    if saes != "random":
        try:
            loaded, dicts = load_for_attribution(args.model, saes, args.device, args.dtype)
        except DictionaryError as err:
            if saes != "embedded":
                raise
            print(f"NOTE: embedded SAEs under {EMBEDDED_SAE_ROOT} incomplete ({err}); using random SAEs")
            saes = "random"
    if saes == "random":
        loaded, dicts = load_for_attribution(args.model, "neurons", args.device, args.dtype)
        from feature_circuits.dictionaries import load_dictionaries

        dicts = load_dictionaries(loaded.sites, random_saes(loaded, args.dict_size, 0), device=loaded.device,
                                  dtype=loaded.dtype)
    pairs = load_pairs(args.data, loaded.tokenizer, skip_invalid=True, limit=args.n)
    batches = make_batches(pairs, loaded.tokenizer, args.batch_size)
    print(f"model {args.model} ({loaded.architecture.value}, {loaded.n_layers} layers, d={loaded.d_model}), "
          f"saes {saes} (F={next(iter(dicts.values())).dict_size}), {len(pairs)} pairs from {args.data}, "
          f"{len(batches)} batch(es), dtype {args.dtype}, device {loaded.device}")

    methods = [Method.EXACT, Method.ATP, Method.IG, Method.RELP]
    walls = {m: 0.0 for m in methods}
    flat: dict[Method, dict[tuple[str, str], list[torch.Tensor]]] = {m: {} for m in methods}
    kinds = {s.name: s.kind.value for s in loaded.sites}
    for batch in batches:
        res = {}
        for m in methods:
            t0 = time.perf_counter()
            res[m] = node_effects(loaded, dicts, batch, m, steps=args.steps, max_nodes=args.max_nodes, chunk_size=256)
            walls[m] += time.perf_counter() - t0
        for name in res[Method.EXACT].effects:
            ex = res[Method.EXACT].effects[name]
            covered = ~torch.isnan(ex)
            covered[..., :-1] &= res[Method.EXACT].deltas[name].f != 0  # features that were actually patched
            for m in methods:
                eff = res[m].effects[name]
                for part, sl in (("features", slice(0, -1)), ("errors", slice(-1, None))):
                    key = (kinds[name], part)
                    flat[m].setdefault(key, []).append(eff[..., sl][covered[..., sl]].double().cpu())

    print(f"\nPearson correlation with exact (nodes pooled over examples, positions and sites of a kind; "
          f"IG steps={args.steps})")
    print(f"{'site kind':10s} {'nodes':9s} {'n':>7s} " + " ".join(f"{m.value:>7s}" for m in methods[1:]))
    for kind in ("embed", "attn", "mlp", "resid"):
        for part in ("features", "errors"):
            ex = torch.cat(flat[Method.EXACT].get((kind, part), [torch.zeros(0)]))
            cors = [pearson(torch.cat(flat[m][(kind, part)]), ex) for m in methods[1:]]
            print(f"{kind:10s} {part:9s} {ex.numel():7d} " + " ".join(f"{c:7.3f}" for c in cors))
    print("\nwall time per method (s): " + ", ".join(f"{m.value} {walls[m]:.2f}" for m in methods))


if __name__ == "__main__":
    main()
