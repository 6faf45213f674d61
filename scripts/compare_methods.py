#!/usr/bin/env python
"""Compare atp / relp / ig with exact activation patching (component level, or --features); see --help.

Thin wrapper: the logic lives in feature_circuits.compare.
"""

import sys

from experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
