#!/usr/bin/env python
"""`feature-circuits evaluate` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
