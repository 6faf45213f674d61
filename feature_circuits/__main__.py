"""``python -m feature_circuits``: the ``feature-circuits`` command line (:mod:`feature_circuits.cli`)."""

import sys

from feature_circuits.cli import main

sys.exit(main())
