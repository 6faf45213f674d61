#!/usr/bin/env python
"""Train the embedded default model (a small Pythia-architecture LM on the project's grammar); see --help.

Thin wrapper: the logic lives in feature_circuits.train_model. Its defaults reproduce the shipped files
(feature_circuits/embedded/MODEL_CARD.md).
"""

from feature_circuits.toy.train_model import main

if __name__ == "__main__":
    main()
