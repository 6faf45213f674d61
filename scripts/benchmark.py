#!/usr/bin/env python
"""`feature-circuits bench` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
