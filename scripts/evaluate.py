"""Faithfulness and completeness of feature circuits by mean ablation (spec section 7).

    python scripts/evaluate.py --circuit out/relp/circuit.json [--circuit out/ig/circuit.json ...]
        [--dataset NAME|PATH] [--split test] [--num-examples 100] [--batch-size 32]
        [--thresholds 0.001,0.01,0.1] [--device cpu] [--allow-discovery-split] [--out DIR]

Writes DIR/eval.json and DIR/eval.html (see feature_circuits/evaluate_cli.py). Exit status 2 with a
one-line message on bad inputs.
"""

from __future__ import annotations

import sys

from feature_circuits.evaluation.report import main

if __name__ == "__main__":
    sys.exit(main())
