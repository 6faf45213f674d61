#!/usr/bin/env python
"""`feature-circuits train-toy model` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-toy", "model", *sys.argv[1:]]))
