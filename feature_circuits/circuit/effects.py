"""The effects file: the aggregated effect of EVERY node, written beside circuit.json.

    save_effects(agg_nodes.effects, out / EFFECTS_FILE, agg_nodes.aggregation)
    effects = load_effects(out / EFFECTS_FILE, circuit.aggregation)   # {site: tensor}

Discovery writes it (its name goes into circuit.json's ``effects_file``); the evaluation sweeps
node thresholds over it, so thresholds below the discovery threshold give larger circuits
(docs/algorithms.md, "Evaluation"). Format: a safetensors file with one float32 tensor per site,
named by the site, of shape (F+1,) under aggregation ``sum`` or (s, F+1) under ``none``, the error
node last (:func:`feature_circuits.types.error_index`); metadata ``format`` =
``feature_circuits.node_effects`` and ``aggregation``.

The file stays dense per site even on the sparse feature path: after aggregation a site holds
F+1 values (``sum``) -- O(F), independent of the number of examples and positions -- so a sparse
layout would save little and every reader (the sweeps, compare) reads plain tensors. A sparse
aggregated tensor handed to :func:`save_effects` is densified.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from feature_circuits.circuit.aggregate import as_aggregation
from feature_circuits.errors import CircuitError
from feature_circuits.types import Aggregation, Site

__all__ = ["EFFECTS_FILE", "load_effects", "save_effects"]

#: File name of the dense node effects written beside circuit.json by discovery.
EFFECTS_FILE = "effects.safetensors"
_EFFECTS_FORMAT = "feature_circuits.node_effects"


def _check_site(site: str, where: str) -> None:
    try:
        Site.parse(site)
    except ValueError as err:
        raise CircuitError(f"{where}: {err}") from None


def save_effects(effects: Mapping[str, Tensor], path: str | Path, aggregation: Aggregation | str) -> Path:
    """Write dense aggregated node effects (``{site: (F+1,) or (s, F+1)}``, error node last) as a
    float32 safetensors file (metadata: format and aggregation)."""
    from safetensors.torch import save_file

    agg = as_aggregation(aggregation)
    want = 1 if agg is Aggregation.SUM else 2
    tensors = {}
    for site, eff in effects.items():
        _check_site(site, "effects")
        eff = eff.to_dense() if eff.is_sparse else eff
        if eff.dim() != want:
            raise CircuitError(
                f"effects[{site!r}] has shape {tuple(eff.shape)}; expected {want} dims for {agg.value}"
            )
        tensors[site] = eff.detach().to(device="cpu", dtype=torch.float32).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": _EFFECTS_FORMAT, "aggregation": agg.value})
    return path


def load_effects(path: str | Path, aggregation: Aggregation | str | None = None) -> dict[str, Tensor]:
    """Read a file written by :func:`save_effects`; :class:`CircuitError` naming the file when it is
    missing, unreadable, or does not hold node effects (of ``aggregation``, when given)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CircuitError(f"node effects file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            effects = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CircuitError(
            f"{path}: not a readable safetensors node effects file ({type(err).__name__}: {err})"
        ) from None
    if meta.get("format") != _EFFECTS_FORMAT:
        raise CircuitError(
            f"{path}: not a feature_circuits node effects file (metadata format {meta.get('format')!r})"
        )
    stored = meta.get("aggregation")
    wanted = None if aggregation is None else as_aggregation(aggregation).value
    if wanted is not None and stored != wanted:
        raise CircuitError(f"{path}: effects are for aggregation {stored!r}, the circuit uses {wanted!r}")
    if not effects:
        raise CircuitError(f"{path}: no node effects in the file")
    want = 1 if stored == Aggregation.SUM.value else 2
    for site, eff in effects.items():
        _check_site(site, str(path))
        if eff.dim() != want or eff.shape[-1] < 1 or not eff.is_floating_point():
            raise CircuitError(
                f"{path}: effects[{site!r}] has shape {tuple(eff.shape)} ({eff.dtype}); expected "
                f"{want} floating-point dims for aggregation {stored!r}"
            )
    return effects
