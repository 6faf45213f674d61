#!/usr/bin/env python
"""`feature-circuits download-saes` (see --help)."""

import sys

from feature_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["download-saes", *sys.argv[1:]]))
