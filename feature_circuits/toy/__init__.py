"""The embedded default: a 4-layer GPT-NeoX model with an SAE at every site, trained on the project's
own grammar, and its datasets -- everything `feature-circuits discover` runs on out of the box.

The shipped files are package data, read through :mod:`importlib.resources`, so they are found the
same way in a source checkout and in an installed wheel:

* ``toy/model/``: the model and its word-level tokenizer (``model.safetensors``, ``config.json``, ...);
* ``toy/saes/tiny-sva/<site dir>/1024/ae.safetensors``: the SAEs, in the Marks et al. layout;
* ``toy/data/<task>_<split>.jsonl``: SVA in four templates and IOI, train and test splits;
* ``toy/metrics.json`` and ``toy/MODEL_CARD.md``: how well the model and its SAEs were trained.

How they were made lives beside them: :mod:`.grammar` (the templates and vocabulary),
:mod:`.datasets` (dataset files and the tokenizer), :mod:`.train_model`, :mod:`.train_saes`
(``feature-circuits train-toy``). The repository's top-level ``data/`` and ``saes/embedded/`` are
links to these directories (one copy of each file).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["DATA_DIR", "METRICS_PATH", "MODEL_DIR", "MODEL_NAME", "SAE_ROOT"]

_ROOT = Path(str(files(__name__)))
#: The embedded model's directory (``from_pretrained`` layout).
MODEL_DIR = _ROOT / "model"
#: Marks-layout root of the embedded SAEs: ``SAE_ROOT / MODEL_NAME / <site dir> / 1024 / ae.safetensors``.
SAE_ROOT = _ROOT / "saes"
#: Name of the embedded model's directory under :data:`SAE_ROOT`.
MODEL_NAME = "tiny-sva"
#: The shipped datasets, ``<name>_<split>.jsonl``.
DATA_DIR = _ROOT / "data"
#: Training record of the model and its SAEs (``"model"`` and ``"saes"`` sections).
METRICS_PATH = _ROOT / "metrics.json"
