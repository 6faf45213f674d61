#!/usr/bin/env python
"""`feature-circuits discover` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["discover", *sys.argv[1:]]))
