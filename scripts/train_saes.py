#!/usr/bin/env python
"""Train the embedded model's SAEs (dictionary_learning, Marks layout); see --help.

Thin wrapper: the logic lives in feature_circuits.train_saes. Its defaults reproduce the shipped files
(feature_circuits/embedded/MODEL_CARD.md).
"""

from feature_circuits.toy.train_saes import main

if __name__ == "__main__":
    main()
