"""Write the SVA and IOI JSON Lines datasets of the embedded model to data/.

For each of sva_simple, sva_nounpp, sva_within_rc, sva_rc and ioi, writes
<out>/<name>_train.jsonl (circuit-discovery split: combinations seen in training) and
<out>/<name>_test.jsonl (evaluation split: held-out combinations never seen in training).
See feature_circuits/grammar.py for the hold-out rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from feature_circuits.toy import DATA_DIR
from feature_circuits.toy.datasets import N_TEST, N_TRAIN, write_datasets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the hold-out rule is seed-free)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: data/)")
    ap.add_argument("--n-train", type=int, default=N_TRAIN, help="pairs per *_train file")
    ap.add_argument("--n-test", type=int, default=N_TEST, help="pairs per *_test file")
    args = ap.parse_args(argv)
    for p in write_datasets(args.out, args.seed, args.n_train, args.n_test):
        print(p)


if __name__ == "__main__":
    main()
