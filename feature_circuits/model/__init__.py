"""Loading a model and describing its sites; the LRP rules installed into it.

* :mod:`.loading`: HF id, short name or local directory -> :class:`LoadedModel` (nnsight-wrapped);
* :mod:`.sites`: the sites of each architecture and reading / writing them inside a trace;
* :mod:`.lrp`: the LRP rules as patched submodules (installed before the nnsight wrap).
"""

from feature_circuits.model.loading import (
    KNOWN_MODELS,
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
    wrap,
)

__all__ = ["KNOWN_MODELS", "LoadedModel", "load_model", "resolve_device", "resolve_dtype", "wrap"]
