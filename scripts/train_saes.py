#!/usr/bin/env python
"""`feature-circuits train-toy saes` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-toy", "saes", *sys.argv[1:]]))
