#!/usr/bin/env python
"""Discover a sparse feature circuit and write circuit.json + circuit.html (see --help).

Thin wrapper: the logic lives in feature_circuits.discover.
"""

import sys

from feature_circuits.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
