"""Dictionaries (SAEs) and the splice with its error node.

* :mod:`.marks`: the Marks et al. / dictionary_learning layout, identity dictionaries, loading a set;
* :mod:`.download`: fetching the Marks et al. Pythia-70M release.
"""

from feature_circuits.dictionaries.marks import (
    KNOWN_SAES,
    IdentityDictionary,
    SAESource,
    decoder_directions,
    dict_size,
    encode_with_error,
    load_autoencoder,
    load_dictionaries,
    resolve_sae_source,
    save_autoencoder,
    splice_patched,
    splice_with_grad_leaves,
)

__all__ = [
    "KNOWN_SAES",
    "IdentityDictionary",
    "SAESource",
    "decoder_directions",
    "dict_size",
    "encode_with_error",
    "load_autoencoder",
    "load_dictionaries",
    "resolve_sae_source",
    "save_autoencoder",
    "splice_patched",
    "splice_with_grad_leaves",
]
