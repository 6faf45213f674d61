#!/usr/bin/env python
"""`feature-circuits compare` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
