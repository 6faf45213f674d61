#!/usr/bin/env python
"""Benchmark node/edge attribution (atp, relp, ig) against the 2-forward-1-backward floor; see --help.

Thin wrapper: the logic lives in feature_circuits.benchmark.
"""

import sys

from experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
