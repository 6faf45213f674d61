"""Dictionaries (SAEs) and the splice with its error node (docs/algorithms.md, "Dictionaries and
the error node").

* :mod:`.base`: the :class:`Dictionary` Protocol (``encode``, ``decode``, ``decoder_directions``,
  ``dict_size``, ``activation_dim``): every signature takes dictionaries as it;
* :mod:`.splice`: the splice primitive (features, error node, gradient leaves, patched output);
* :mod:`.identity`: identity dictionaries (the neuron baseline);
* :mod:`.marks`: the Marks et al. / dictionary_learning layout, and :func:`load_dictionaries`, the
  one dispatcher of every ``--saes`` value (``embedded``, ``marks``, ``neurons``, a Marks-layout
  directory, ``saelens:RELEASE[/SAE_ID],...``, a sae_lens directory or a directory of them);
* :mod:`.saelens`: SAELens SAEs through ``sae_lens`` itself (every architecture the splice can use
  exactly), :mod:`.registry`: sae_lens's release registry read offline (release -> model, hooks,
  sites, Neuronpedia ids);
* :mod:`.download`: fetching the Marks et al. Pythia-70M release.

The names of :mod:`.marks` and :mod:`.saelens` are imported on first use (they import
``dictionary_learning`` and ``sae_lens``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from feature_circuits.dictionaries.base import Dictionary, FeatureGradients, decoder_directions_by_vjp
from feature_circuits.dictionaries.identity import IdentityDictionary
from feature_circuits.dictionaries.splice import encode_with_error, splice_patched, splice_with_grad_leaves

if TYPE_CHECKING:
    from feature_circuits.dictionaries.marks import (
        KNOWN_SAES,
        MarksAutoEncoder,
        SAESource,
        dictionary_infos,
        is_saelens_source,
        load_autoencoder,
        load_dictionaries,
        resolve_sae_source,
        save_autoencoder,
    )
    from feature_circuits.dictionaries.saelens import SAELensDictionary, load_saelens

_LAZY = {
    name: "feature_circuits.dictionaries.marks"
    for name in (
        "KNOWN_SAES",
        "MarksAutoEncoder",
        "SAESource",
        "dictionary_infos",
        "is_saelens_source",
        "load_autoencoder",
        "load_dictionaries",
        "resolve_sae_source",
        "save_autoencoder",
    )
}
_LAZY.update(
    {name: "feature_circuits.dictionaries.saelens" for name in ("SAELensDictionary", "load_saelens")}
)

__all__ = [
    "KNOWN_SAES",
    "Dictionary",
    "FeatureGradients",
    "IdentityDictionary",
    "MarksAutoEncoder",
    "SAELensDictionary",
    "SAESource",
    "decoder_directions_by_vjp",
    "dictionary_infos",
    "encode_with_error",
    "is_saelens_source",
    "load_autoencoder",
    "load_dictionaries",
    "load_saelens",
    "resolve_sae_source",
    "save_autoencoder",
    "splice_patched",
    "splice_with_grad_leaves",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'feature_circuits.dictionaries' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
