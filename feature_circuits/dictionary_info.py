"""What was spliced at a site, as recorded in circuit.json: :class:`DictionaryInfo`.

It lives at the bottom of the data flow (no torch, no I/O) because both ends use it: every
dictionary loader attaches one to what it loads (``.info``), and the circuit file stores them by
site (:attr:`feature_circuits.circuit.Circuit.dictionaries`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DictionaryInfo"]


class DictionaryInfo(BaseModel):
    """What was spliced at one site: the dictionary's family, where it came from, its size, and its
    Neuronpedia id when it has one."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    kind: str
    """Dictionary family: ``marks`` (dictionary_learning layout), ``saelens`` or ``identity``."""
    source: str
    """Where it was loaded from: a directory, or ``RELEASE/SAE_ID`` for a SAELens registry SAE."""
    n_features: Annotated[int, Field(ge=0)]
    """Number of features ``F``."""
    architecture: str | None = None
    """SAE architecture (``standard``, ``jumprelu``, ``topk``, ``gated``, ...) when known."""
    hook_name: str | None = None
    """The TransformerLens hook the SAE was trained on (SAELens SAEs)."""
    neuronpedia: str | None = None
    """Neuronpedia id of the SAE (``MODEL/SAE``, e.g. ``gemma-2-2b/20-gemmascope-res-16k``); a feature's
    page is ``https://www.neuronpedia.org/{neuronpedia}/{feature}``."""
