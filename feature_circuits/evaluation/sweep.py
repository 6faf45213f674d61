"""Faithfulness and completeness of a circuit by mean ablation (spec section 7).

Protocol
--------
* **Means.** The mean of every node -- each SAE feature and each site's error vector -- over the
  *patch* inputs of the evaluation data, computed once from the unmodified model. Under aggregation
  ``none`` (position-aligned circuits) the mean is kept per position (all evaluation examples must
  then have one token length); under ``sum`` it is averaged over positions too.
* **Ablated forward.** One clean forward with the SAE spliced at every site that ablates anything:
  the site's features and error are computed from its *actual* activation (which already carries the
  effect of ablations at earlier sites, so ablations compose in forward order), every node outside
  the kept set is replaced by its mean, and the site's output becomes ``decode(f) + err``. A missing
  error node replaces that position's whole error vector. Sites where every node is kept are not
  touched at all, so the full model M is the plain forward, bit for bit.
* **Metric.** m = logit(clean answer) - logit(patch answer) at the last position, averaged over
  examples. faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty)); completeness(C) =
  faithfulness(M minus C). By construction faithfulness(M) = 1, faithfulness(empty) = 0 and
  completeness(M) = 0 exactly (the same forwards are reused).
* **Free layers.** The embedding and the first ``n_layers // 3`` layers (floor: layers 0-1 of a
  6-layer Pythia-70M, layer 0 of a 4-layer model, none of a 2-layer one) are always kept ("given
  for free": early features are token-specific and do not transfer between splits). Their nodes are
  never ablated -- not in M minus C nor in the empty circuit -- and are excluded from node counts.
  Pass ``free_layers=`` to override.
* **Sweep.** The sweep keeps the nodes with |effect| > t for each threshold t. When the circuit
  comes with the dense effects of every node (``circuit.json``'s ``effects_file``, written by
  discovery, or a ``graph.AggregatedNodes``), the sweep runs over all of them, so thresholds below
  the discovery threshold give larger circuits. Otherwise (an older circuit.json, or a bare node
  list) only the stored nodes -- those whose |effect| exceeded the discovery node threshold -- are
  available: thresholds at or below the discovery threshold all give the same set (the whole stored
  circuit) and are flagged in :attr:`EvalResult.below_discovery_threshold`. Under ``sum`` a
  kept node (site, feature) is kept at every position; under ``none`` only at its position. The
  complement M minus C is every node not in C (also those with no stored effect), free layers kept.
* **Variants.** ``all_errors_ablated`` (the standard: an error node is kept only if it is in the
  circuit), ``resid_errors_kept`` (residual-stream error nodes always kept) and
  ``no_errors_ablated`` (every error node always kept). A variant's forced keeps apply to C, to
  M minus C and to the empty circuit alike. The neuron baseline is a circuit discovered with
  identity dictionaries (``saes="neurons"``), whose error is identically zero.

Public API: :class:`CircuitNodes` (what is evaluated), :func:`evaluate_circuit` (the sweep) ->
:class:`EvalResult`, and the building blocks :func:`compute_means`, :func:`keep_masks`,
:func:`ablated_metric`, :func:`default_thresholds`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from feature_circuits.dictionaries.marks import IdentityDictionary, dict_size, encode_with_error
from feature_circuits.errors import EvaluationError
from feature_circuits.model.sites import get_activation, set_activation
from feature_circuits.types import Aggregation, Site, SiteKind

__all__ = [
    "STANDARD_VARIANT",
    "VARIANTS",
    "CircuitNode",
    "CircuitNodes",
    "EvalResult",
    "EvaluationError",
    "SiteMask",
    "VariantCurve",
    "ablated_metric",
    "ablated_metrics",
    "compute_means",
    "default_free_layers",
    "default_thresholds",
    "evaluate_circuit",
    "keep_masks",
    "node_count",
]

STANDARD_VARIANT = "all_errors_ablated"
#: Variant name -> which error nodes are always kept.
VARIANTS: dict[str, str] = {
    "all_errors_ablated": "none (an error node is kept only if it is in the circuit; the standard)",
    "resid_errors_kept": "residual-stream error nodes always kept",
    "no_errors_ablated": "every error node always kept",
}


# --------------------------------------------------------------------------------------------------
# What is evaluated


@dataclass(frozen=True, slots=True)
class CircuitNode:
    """One node: ``feature`` is None for the site's error node; ``position`` is None under ``sum``."""

    site: str
    position: int | None
    feature: int | None
    effect: float


def _field(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


@dataclass(kw_only=True)
class CircuitNodes:
    """The nodes of a circuit with their (aggregated) effects, plus where they came from.

    ``node_threshold`` is the discovery threshold. ``all_nodes`` is True when ``nodes`` holds every
    node with a nonzero effect (built from dense effects, e.g. circuit.json's ``effects_file``);
    otherwise nodes below the discovery threshold are absent (effect 0 in the sweep).
    ``meta`` keeps the circuit's other fields (model, saes, method, dataset, split, ...).
    """

    aggregation: Aggregation
    nodes: list[CircuitNode]
    node_threshold: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    all_nodes: bool = False

    def __post_init__(self) -> None:
        self.aggregation = Aggregation(self.aggregation)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "circuit", base_dir: str | Path | None = None
    ) -> CircuitNodes:
        """From the ``circuit.json`` schema (``aggregation``, ``node_threshold``, ``nodes`` with
        ``site``, ``position``, ``feature`` (null for error nodes), ``is_error``, ``effect``).

        With ``base_dir`` (the circuit.json's directory) and an ``effects_file`` key, the dense
        effects of every node are read from that file (:meth:`with_effects`); a missing or bad file
        is an :class:`EvaluationError` naming it."""
        if not isinstance(data, Mapping):
            raise EvaluationError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for key in ("aggregation", "nodes"):
            if key not in data:
                raise EvaluationError(f"{source}: missing field {key!r}")
        try:
            agg = Aggregation(data["aggregation"])
        except ValueError:
            raise EvaluationError(
                f"{source}: unknown aggregation {data['aggregation']!r} (expected 'sum' or 'none')"
            ) from None
        nodes = []
        for i, raw in enumerate(data["nodes"]):
            try:
                nodes.append(_parse_node(raw, agg))
            except (KeyError, TypeError, ValueError) as err:
                raise EvaluationError(f"{source}: node {i} is malformed ({err}): {raw!r}") from None
        thr = data.get("node_threshold")
        meta = {k: v for k, v in data.items() if k not in ("nodes", "edges")}
        out = cls(aggregation=agg, nodes=nodes, node_threshold=None if thr is None else float(thr), meta=meta)
        effects_file = data.get("effects_file")
        if effects_file is not None and base_dir is not None:
            out = out.with_effects_file(Path(base_dir) / str(effects_file), source=source)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> CircuitNodes:
        path = Path(path)
        if not path.is_file():
            raise EvaluationError(f"circuit file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EvaluationError(f"{path}: not valid JSON ({err})") from None
        out = cls.from_dict(data, source=str(path), base_dir=path.parent)
        out.meta.setdefault("path", str(path))
        return out

    def with_effects_file(self, path: str | Path, *, source: str = "circuit") -> CircuitNodes:
        """:meth:`with_effects` with the dense effects read from ``path`` (a file written by
        ``graph.save_effects``); :class:`EvaluationError` naming the file if it is missing or bad."""
        from feature_circuits.circuit.graph import CircuitError, load_effects

        try:
            effects = load_effects(path, self.aggregation)
        except CircuitError as err:
            raise EvaluationError(f"{source}: effects_file: {err}") from None
        out = self.with_effects(effects, source=f"{source} (effects file {path})")
        out.meta["effects_file"] = str(path)
        return out

    def with_effects(self, effects: Mapping[str, Tensor], *, source: str = "effects") -> CircuitNodes:
        """The same circuit with ``nodes`` = every node of the dense ``effects`` ((F+1,) or (s, F+1)
        per site, error node last). The stored nodes must agree with the dense effects (same site,
        same effect up to float32 rounding), which catches an effects file from another run."""
        dense = CircuitNodes.from_effects(effects, self.aggregation)
        for n in self.nodes:
            eff = effects.get(n.site)
            if eff is None:
                raise EvaluationError(f"{source}: no effects for site {n.site!r} of circuit node {n}")
            n_feat = eff.shape[-1] - 1
            idx = n_feat if n.feature is None else n.feature
            row = eff if n.position is None else (eff[n.position] if 0 <= n.position < eff.shape[0] else None)
            if row is None or not 0 <= idx <= n_feat:
                raise EvaluationError(
                    f"{source}: circuit node {n} is outside the effects of shape {tuple(eff.shape)}"
                )
            val = float(row[idx])
            if not math.isclose(val, n.effect, rel_tol=1e-5, abs_tol=1e-7):
                raise EvaluationError(
                    f"{source}: circuit node {n.site}/{'err' if n.feature is None else n.feature} has effect "
                    f"{n.effect:g} in the circuit but {val:g} in the effects file (from another run?)"
                )
        meta = dict(self.meta)
        meta["effects_sizes"] = {site: int(t.shape[-1]) - 1 for site, t in effects.items()}
        return CircuitNodes(
            aggregation=self.aggregation,
            nodes=dense.nodes,
            node_threshold=self.node_threshold,
            meta=meta,
            all_nodes=True,
        )

    @classmethod
    def from_circuit(cls, circuit: Any) -> CircuitNodes:
        """From a ``graph.Circuit``, a ``graph.AggregatedNodes`` (dense effects), a parsed circuit.json
        dict, or anything with the same fields / a ``to_dict``."""
        if isinstance(circuit, CircuitNodes):
            return circuit
        effects = _field(circuit, "effects")
        if isinstance(effects, Mapping) and _field(circuit, "aggregation") is not None:
            # graph.AggregatedNodes: dense effects of every node (no discovery threshold)
            return cls.from_effects(effects, _field(circuit, "aggregation"))
        if isinstance(circuit, Mapping):
            if circuit and all(isinstance(v, Tensor) for v in circuit.values()):
                raise EvaluationError(
                    "got a mapping of effect tensors: wrap it as CircuitNodes.from_effects(effects, aggregation)"
                )
            return cls.from_dict(circuit)
        to_dict = getattr(circuit, "to_dict", None)
        if callable(to_dict):
            return cls.from_dict(to_dict())
        agg = _field(circuit, "aggregation")
        data = {
            "aggregation": getattr(agg, "value", agg),
            "node_threshold": _field(circuit, "node_threshold"),
            "nodes": list(_field(circuit, "nodes", [])),
        }
        for key in ("model", "saes", "method", "dataset", "split"):
            data[key] = _field(circuit, key)
        return cls.from_dict(data)

    @classmethod
    def from_effects(
        cls,
        effects: Mapping[str, Tensor],
        aggregation: Aggregation | str,
        node_threshold: float | None = None,
    ) -> CircuitNodes:
        """From dense aggregated effects per site: (F+1,) under ``sum`` or (s, F+1) under ``none``
        (error node last). Every nonzero entry becomes a node (above ``node_threshold`` if given;
        without it the result holds every node: ``all_nodes``)."""
        agg = Aggregation(aggregation)
        nodes = []
        for site, eff in effects.items():
            eff = torch.as_tensor(eff).detach().cpu().double()
            want = 1 if agg is Aggregation.SUM else 2
            if eff.dim() != want:
                raise EvaluationError(f"effects[{site!r}] has shape {tuple(eff.shape)}; expected {want} dims")
            grid = eff.unsqueeze(0) if agg is Aggregation.SUM else eff
            n_feat = grid.shape[-1] - 1
            cut = 0.0 if node_threshold is None else node_threshold
            nz = (grid.abs() > cut).nonzero()
            values = grid[nz[:, 0], nz[:, 1]].tolist()
            for (pos, idx), val in zip(nz.tolist(), values):
                nodes.append(
                    CircuitNode(
                        site=site,
                        position=None if agg is Aggregation.SUM else pos,
                        feature=None if idx == n_feat else idx,
                        effect=float(val),
                    )
                )
        return cls(
            aggregation=agg, nodes=nodes, node_threshold=node_threshold, all_nodes=node_threshold is None
        )

    def selected(self, threshold: float) -> list[CircuitNode]:
        return [n for n in self.nodes if abs(n.effect) > threshold]


def _parse_node(raw: Any, agg: Aggregation) -> CircuitNode:
    site = _field(raw, "site")
    if not isinstance(site, str):
        raise TypeError("site must be a string")
    feature = _field(raw, "feature")
    is_error = bool(_field(raw, "is_error", feature is None))
    if is_error:
        feature = None
    elif feature is None:
        raise ValueError("feature is null but is_error is false")
    else:
        feature = int(feature)
    position = _field(raw, "position")
    if agg is Aggregation.NONE:
        if position is None:
            raise ValueError("position is null but aggregation is 'none'")
        position = int(position)
    else:
        position = None
    return CircuitNode(site=site, position=position, feature=feature, effect=float(_field(raw, "effect")))


# --------------------------------------------------------------------------------------------------
# Thresholds, free layers, masks


def default_free_layers(n_layers: int) -> int:
    """Layers ``< n_layers // 3`` (and the embedding) are always kept."""
    return n_layers // 3


def default_thresholds(circuit: CircuitNodes) -> list[float]:
    """The spec's grid ``logspace(-4, 0, 15)``, extended upwards with the same ratio (10^(4/14)) until
    it passes the largest |effect| of the circuit, so the sweep always reaches the empty circuit."""
    grid = list(np.logspace(-4, 0, 15))
    ratio = 10 ** (4 / 14)
    top = max((abs(n.effect) for n in circuit.nodes), default=0.0)
    while grid[-1] <= top and len(grid) < 200:
        grid.append(grid[-1] * ratio)
    return [float(t) for t in grid]


def _is_free(site: Site, free_layers: int) -> bool:
    return site.kind is SiteKind.EMBED or site.layer < free_layers


@dataclass(frozen=True)
class SiteMask:
    """Which nodes of one site are kept: ``f`` (P, F) bool and ``err`` (P, 1) bool, P = 1 (broadcast
    over positions, aggregation ``sum``) or s (aggregation ``none``)."""

    f: Tensor
    err: Tensor

    @property
    def all_kept(self) -> bool:
        return bool(self.f.all()) and bool(self.err.all())


def _sizes(sites: Sequence[Site], dictionaries: Mapping[str, nn.Module]) -> dict[str, int]:
    return {s.name: dict_size(dictionaries[s.name]) for s in sites}


def _check_nodes(
    circuit: CircuitNodes, sites: Sequence[Site], sizes: Mapping[str, int], seq_len: int | None
) -> None:
    names = {s.name for s in sites}
    for n in circuit.nodes:
        if n.site not in names:
            raise EvaluationError(
                f"circuit node at unknown site {n.site!r}; the model's sites are {sorted(names)}"
            )
        if n.feature is not None and not 0 <= n.feature < sizes[n.site]:
            raise EvaluationError(
                f"circuit node {n.site}/{n.feature}: feature index out of range for a dictionary of size "
                f"{sizes[n.site]} (wrong --saes?)"
            )
        if n.position is not None and seq_len is not None and not 0 <= n.position < seq_len:
            raise EvaluationError(
                f"circuit node {n.site}@{n.position}: position out of range for evaluation examples of "
                f"{seq_len} tokens (a position-aligned circuit needs examples of the discovery length)"
            )


def keep_masks(
    nodes: Iterable[CircuitNode],
    sites: Sequence[Site],
    sizes: Mapping[str, int],
    *,
    n_positions: int,
    complement: bool = False,
    variant: str = STANDARD_VARIANT,
    free_layers: int = 0,
) -> dict[str, SiteMask | None]:
    """Keep masks per site (None: every node kept, the site is left untouched).

    ``n_positions``: 1 under aggregation ``sum`` (node positions must be None), s under ``none``.
    ``complement``: keep exactly the nodes NOT in ``nodes``. Then the variant's forced error keeps
    and the free layers are applied.
    """
    if variant not in VARIANTS:
        raise EvaluationError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    masks: dict[str, list[Tensor]] = {
        s.name: [
            torch.zeros(n_positions, sizes[s.name], dtype=torch.bool),
            torch.zeros(n_positions, 1, dtype=torch.bool),
        ]
        for s in sites
    }
    # per site: (position, feature) of positioned nodes and features of position-free ones (-1: error)
    at: dict[str, tuple[list[int], list[int]]] = {}
    every: dict[str, list[int]] = {}
    for n in nodes:
        feat = -1 if n.feature is None else n.feature
        if n.position is None:
            every.setdefault(n.site, []).append(feat)
        else:
            pos, fs = at.setdefault(n.site, ([], []))
            pos.append(n.position)
            fs.append(feat)
    for name, feats in every.items():
        f, err = masks[name]
        idx = torch.tensor(feats, dtype=torch.long)
        f[:, idx[idx >= 0]] = True
        if bool((idx < 0).any()):
            err[:, 0] = True
    for name, (pos, feats) in at.items():
        f, err = masks[name]
        p, idx = torch.tensor(pos, dtype=torch.long), torch.tensor(feats, dtype=torch.long)
        is_f = idx >= 0
        f[p[is_f], idx[is_f]] = True
        err[p[~is_f], 0] = True
    out: dict[str, SiteMask | None] = {}
    for s in sites:
        f, err = masks[s.name]
        if complement:
            f, err = ~f, ~err
        if variant == "no_errors_ablated" or (variant == "resid_errors_kept" and s.kind is SiteKind.RESID):
            err = torch.ones_like(err)
        mask = SiteMask(f, err)
        out[s.name] = None if _is_free(s, free_layers) or mask.all_kept else mask
    return out


def node_count(nodes: Iterable[CircuitNode], sites: Sequence[Site], free_layers: int) -> int:
    """Number of circuit nodes outside the free layers."""
    by_name = {s.name: s for s in sites}
    return sum(1 for n in nodes if not _is_free(by_name[n.site], free_layers))


# --------------------------------------------------------------------------------------------------
# Forwards


def _metric(logits: Tensor, clean_answer: Tensor, patch_answer: Tensor) -> Tensor:
    last = logits[:, -1, :]
    return last.gather(1, clean_answer[:, None]).squeeze(1) - last.gather(1, patch_answer[:, None]).squeeze(1)


def _batch_dev(batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        batch.clean.to(device),
        batch.patch.to(device),
        batch.clean_answer.to(device),
        batch.patch_answer.to(device),
    )


def positions_aligned(batches: Sequence[Any]) -> bool:
    """Whether every evaluation example has the same token length: then means are taken per position
    (spec section 7), whatever the circuit's aggregation."""
    return len({int(b.patch.shape[1]) for b in batches}) == 1


@torch.no_grad()
def compute_means(
    loaded: Any,
    dictionaries: Mapping[str, nn.Module],
    batches: Sequence[Any],
    *,
    per_position: bool,
    sites: Sequence[Site] | None = None,
    progress: Any = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean features and error per site over the PATCH inputs of ``batches`` (plain model forward).

    Returns ``{site: (mean_f, mean_err)}`` with shapes (P, F) and (P, d): P = s when
    ``per_position`` (every batch must have the same length; see :func:`positions_aligned`), else
    P = 1 (averaged over every token of every example).
    """
    sites = list(loaded.sites if sites is None else sites)
    if not batches:
        raise EvaluationError("no evaluation examples")
    lengths = {int(b.patch.shape[1]) for b in batches}
    if per_position and len(lengths) != 1:
        raise EvaluationError(
            f"per-position means need evaluation examples of one token length; "
            f"found lengths {sorted(lengths)}"
        )
    sums: dict[str, list[Tensor]] = {}
    count = 0
    lm = loaded.lm
    for batch in batches:
        _, patch, _, _ = _batch_dev(batch, loaded.device)
        acts: dict[str, Any] = {}
        with lm.trace(patch):
            for site in sites:
                acts[site.name] = get_activation(lm, site).save()
        for site in sites:
            f, err = encode_with_error(dictionaries[site.name], acts[site.name])
            f, err = f.double(), err.double()
            if per_position:
                f, err = f.sum(0), err.sum(0)
            else:
                f, err = f.sum((0, 1))[None], err.sum((0, 1))[None]
            if site.name in sums:
                sums[site.name][0] += f
                sums[site.name][1] += err
            else:
                sums[site.name] = [f, err]
        count += patch.shape[0] if per_position else patch.shape[0] * patch.shape[1]
        if progress is not None:
            progress.update(1)
    return {
        name: (f.div(count).to(loaded.dtype), e.div(count).to(loaded.dtype)) for name, (f, e) in sums.items()
    }


@torch.no_grad()
def ablated_metric(
    loaded: Any,
    dictionaries: Mapping[str, nn.Module],
    batches: Sequence[Any],
    means: Mapping[str, tuple[Tensor, Tensor]],
    masks: Mapping[str, SiteMask | None],
    *,
    progress: Any = None,
) -> float:
    """Mean over examples of logit(clean answer) - logit(patch answer) at the last position, in clean
    forwards where every node outside ``masks`` is replaced by its mean (composing in forward order)."""
    return ablated_metrics(loaded, dictionaries, batches, means, [masks], stack=1, progress=progress)[0]


@torch.no_grad()
def ablated_metrics(
    loaded: Any,
    dictionaries: Mapping[str, nn.Module],
    batches: Sequence[Any],
    means: Mapping[str, tuple[Tensor, Tensor]],
    configs: Sequence[Mapping[str, SiteMask | None]],
    *,
    stack: int = 1,
    progress: Any = None,
) -> list[float]:
    """:func:`ablated_metric` for several mask configurations; ``stack`` configurations share one
    forward (the batch is repeated along the batch axis, configuration-major)."""
    lm = loaded.lm
    sites = list(loaded.sites)
    dev = loaded.device
    results = [0.0] * len(configs)
    n_examples = sum(int(b.clean.shape[0]) for b in batches)
    stack = max(1, int(stack))
    for g0 in range(0, len(configs), stack):
        group = configs[g0 : g0 + stack]
        k = len(group)
        # per site: stacked keep masks (k, 1, P, F) and (k, 1, P, 1), or None when nothing is ablated
        stacked: dict[str, tuple[Tensor, Tensor] | None] = {}
        for site in sites:
            ms = [cfg.get(site.name) for cfg in group]
            if all(m is None for m in ms):
                stacked[site.name] = None
                continue
            ref = next(m for m in ms if m is not None)
            kf = torch.stack([torch.ones_like(ref.f) if m is None else m.f for m in ms]).to(dev)
            ke = torch.stack([torch.ones_like(ref.err) if m is None else m.err for m in ms]).to(dev)
            stacked[site.name] = (kf[:, None], ke[:, None])
        for batch in batches:
            clean, _, ca, pa = _batch_dev(batch, dev)
            b = clean.shape[0]
            ids = clean.repeat(k, 1) if k > 1 else clean
            out: dict[str, Any] = {}
            with lm.trace(ids):
                for site in sites:
                    mask = stacked[site.name]
                    if mask is None:
                        continue
                    keep_f, keep_err = mask
                    mean_f, mean_err = means[site.name]
                    ae = dictionaries[site.name]
                    x = get_activation(lm, site)
                    f, err = encode_with_error(ae, x)
                    f = torch.where(keep_f, f.view(k, b, *f.shape[1:]), mean_f).view(f.shape)
                    err = torch.where(keep_err, err.view(k, b, *err.shape[1:]), mean_err).view(err.shape)
                    set_activation(lm, site, ae.decode(f) + err)
                out["logits"] = lm.output.logits.save()
            m = _metric(out["logits"], ca.repeat(k), pa.repeat(k)).double().view(k, b).sum(1)
            for j in range(k):
                results[g0 + j] += float(m[j])
            if progress is not None:
                progress.update(k)
    return [r / n_examples for r in results]


def _canonical(
    masks: dict[str, SiteMask | None], dictionaries: Mapping[str, nn.Module]
) -> dict[str, SiteMask | None]:
    """Identity dictionaries (neurons) have a zero error whose mean is zero: ablating it is a no-op,
    so their error nodes count as kept (lets variants that differ only there share a forward)."""
    out = {}
    for name, m in masks.items():
        if m is not None and isinstance(dictionaries[name], IdentityDictionary):
            m = SiteMask(m.f, torch.ones_like(m.err))
            if m.all_kept:
                m = None
        out[name] = m
    return out


def _mask_digest(masks: Mapping[str, SiteMask | None]) -> str:
    h = hashlib.sha1()
    for name in sorted(masks):
        m = masks[name]
        h.update(name.encode())
        if m is None:
            h.update(b"-")
        else:
            h.update(np.packbits(m.f.cpu().numpy()).tobytes())
            h.update(np.packbits(m.err.cpu().numpy()).tobytes())
            h.update(str(tuple(m.f.shape)).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The sweep


@dataclass(kw_only=True)
class VariantCurve:
    """One variant's sweep: per threshold the node count, faithfulness and completeness, and the raw
    metrics m(C), m(M minus C); plus m(M) and m(empty) for this variant."""

    n_nodes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    m_circuit: list[float]
    m_complement: list[float]
    m_full: float
    m_empty: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_nodes": self.n_nodes,
            "faithfulness": [_json_float(x) for x in self.faithfulness],
            "completeness": [_json_float(x) for x in self.completeness],
            "m_circuit": self.m_circuit,
            "m_complement": self.m_complement,
            "m_full": self.m_full,
            "m_empty": self.m_empty,
        }


def _json_float(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


@dataclass(kw_only=True)
class EvalResult:
    """The sweep for every variant; the top-level properties are the standard variant's."""

    thresholds: list[float]
    variants: dict[str, VariantCurve]
    below_discovery_threshold: list[bool]
    discovery_node_threshold: float | None
    all_nodes: bool = False  # swept over every node's effect (effects file), not only the stored nodes
    aggregation: str
    free_layers: int
    n_nodes_total: int
    num_examples: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def standard(self) -> VariantCurve:
        return self.variants.get(STANDARD_VARIANT) or next(iter(self.variants.values()))

    @property
    def n_nodes(self) -> list[int]:
        return self.standard.n_nodes

    @property
    def faithfulness(self) -> list[float]:
        return self.standard.faithfulness

    @property
    def completeness(self) -> list[float]:
        return self.standard.completeness

    def to_dict(self) -> dict[str, Any]:
        std = self.standard.to_dict()
        out: dict[str, Any] = {
            "thresholds": self.thresholds,
            "n_nodes": std["n_nodes"],
            "faithfulness": std["faithfulness"],
            "completeness": std["completeness"],
            "standard_variant": STANDARD_VARIANT
            if STANDARD_VARIANT in self.variants
            else next(iter(self.variants)),
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "below_discovery_threshold": self.below_discovery_threshold,
            "discovery_node_threshold": self.discovery_node_threshold,
            "sweep_nodes": "all" if self.all_nodes else "stored",
            "note": (
                (
                    "thresholds apply to the aggregated effects of every node (the circuit's effects file), "
                    "so thresholds below discovery_node_threshold give larger circuits. "
                    if self.all_nodes
                    else "thresholds apply to the node effects stored in the circuit, which holds only nodes with "
                    "|effect| > discovery_node_threshold: every threshold at or below it gives the same node set "
                    "(flagged in below_discovery_threshold). "
                )
                + f"Node counts exclude the embedding and the first {self.free_layers} layer(s), which are always "
                "kept, and the error nodes a variant keeps by force."
            ),
            "aggregation": self.aggregation,
            "free_layers": self.free_layers,
            "n_nodes_total": self.n_nodes_total,
            "num_examples": self.num_examples,
            "metric": "logit(clean answer) - logit(patch answer) at the last position, mean over examples",
            "ablation": "mean over patch inputs" + (" per position" if self.aggregation == "none" else ""),
        }
        out.update({k: v for k, v in self.meta.items() if k not in out})
        return out


def _faith(m: float, m_full: float, m_empty: float) -> float:
    denom = m_full - m_empty
    if denom == 0:
        return float("nan")
    return (m - m_empty) / denom


def evaluate_circuit(
    loaded: Any,
    dictionaries: Mapping[str, nn.Module],
    circuit: Any,
    pairs: Sequence[Any],
    *,
    thresholds: Sequence[float] | None = None,
    variants: Sequence[str] = tuple(VARIANTS),
    batch_size: int = 32,
    free_layers: int | None = None,
    means: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    stack: int | None = None,
    max_rows: int = 128,
    progress: bool = False,
) -> EvalResult:
    """Sweep node thresholds over ``circuit`` (a :class:`CircuitNodes`, a graph ``Circuit``, a parsed
    circuit.json dict) and measure faithfulness and completeness by mean ablation on ``pairs``
    (``feature_circuits.data.Pair``), for each variant. Means (over the patch inputs of ``pairs``)
    are computed once (or passed in) and reused; identical ablation masks are evaluated once, and
    ``stack`` mask configurations share a forward (default: as many as fit in ``max_rows`` rows)."""
    from feature_circuits.data import make_batches

    circ = CircuitNodes.from_circuit(circuit)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise EvaluationError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    sites = list(loaded.sites)
    missing = [s.name for s in sites if s.name not in dictionaries]
    if missing:
        raise EvaluationError(f"no dictionary for site(s) {missing}")
    sizes = _sizes(sites, dictionaries)
    free = default_free_layers(loaded.n_layers) if free_layers is None else int(free_layers)
    thr = [float(t) for t in (default_thresholds(circ) if thresholds is None else thresholds)]
    if not thr:
        raise EvaluationError("no thresholds")
    if any(not math.isfinite(t) or t < 0 for t in thr):
        raise EvaluationError(f"thresholds must be finite and >= 0, got {thr}")
    batches = make_batches(pairs, loaded.tokenizer, batch_size)
    if not batches:
        raise EvaluationError("no evaluation examples")
    per_position = circ.aggregation is Aggregation.NONE
    seq_len = int(batches[0].clean.shape[1]) if per_position else None
    if per_position and len({int(b.clean.shape[1]) for b in batches}) != 1:
        lengths = sorted({int(b.clean.shape[1]) for b in batches})
        raise EvaluationError(
            f"the circuit is position-aligned (aggregation 'none'): evaluation examples must all have one "
            f"token length, found {lengths}"
        )
    tokens = circ.meta.get("tokens")
    if per_position and tokens and len(tokens) != seq_len:
        raise EvaluationError(
            f"the circuit is position-aligned over {len(tokens)} tokens ({' '.join(map(str, tokens))!r}) but the "
            f"evaluation examples have {seq_len}: evaluate on data of the same template"
        )
    _check_nodes(circ, sites, sizes, seq_len)
    for site, n_feat in (circ.meta.get("effects_sizes") or {}).items():
        if site in sizes and n_feat != sizes[site]:
            raise EvaluationError(
                f"the circuit's node effects have {n_feat} features at site {site}, the dictionary has "
                f"{sizes[site]} (wrong --saes?)"
            )
    n_positions = seq_len if per_position else 1
    # means per position whenever the evaluation examples are aligned (also for 'sum' circuits, whose
    # masks cover all positions at once); a passed-in ``means`` must have been computed the same way
    aligned = positions_aligned(batches)
    if means is not None:
        want = int(batches[0].patch.shape[1]) if aligned else 1
        got = {int(mf.shape[0]) for mf, _ in means.values()}
        if got != {want}:
            raise EvaluationError(f"means over {sorted(got)} position(s) given; these examples need {want}")

    # Every (variant, node set, complement) configuration; identical masks share one evaluation, so
    # faithfulness(M) = 1, faithfulness(empty) = 0 and completeness(M) = 0 hold exactly.
    # nodes by decreasing |effect|: the selection at t (|effect| > t) is a prefix
    ranked = sorted(circ.nodes, key=lambda n: -abs(n.effect))
    neg_mag = [-abs(n.effect) for n in ranked]  # ascending
    selections = [ranked[: bisect.bisect_left(neg_mag, -t)] for t in thr]
    distinct_sizes = sorted({0} | {len(sel) for sel in selections})
    by_size = {len(sel): sel for sel in selections}
    by_size.setdefault(0, [])
    digest_of: dict[tuple[str, bool, int], str] = {}
    configs: dict[str, dict[str, SiteMask | None]] = {}
    for variant in variants:
        for size in distinct_sizes:
            for complement in (False, True):
                masks = keep_masks(
                    by_size[size],
                    sites,
                    sizes,
                    n_positions=n_positions,
                    complement=complement,
                    variant=variant,
                    free_layers=free,
                )
                masks = _canonical(masks, dictionaries)
                dg = _mask_digest(masks)
                digest_of[(variant, complement, size)] = dg
                configs.setdefault(dg, masks)
    order = list(configs)
    if stack is None:
        rows = max(int(b.clean.shape[0]) for b in batches)
        stack = max(1, max_rows // rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(order) * len(batches) + (0 if means is not None else len(batches))
        bar = tqdm(total=total, desc="evaluate", unit="fwd")
    try:
        if means is None:
            means = compute_means(
                loaded, dictionaries, batches, per_position=aligned, sites=sites, progress=bar
            )
        values = ablated_metrics(
            loaded, dictionaries, batches, means, [configs[d] for d in order], stack=stack, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()
    metric_of = dict(zip(order, values))

    def value(variant: str, complement: bool, size: int) -> float:
        return metric_of[digest_of[(variant, complement, size)]]

    curves: dict[str, VariantCurve] = {}
    for variant in variants:
        m_full = value(variant, True, 0)  # the complement of nothing: everything kept
        m_empty = value(variant, False, 0)
        mc = [value(variant, False, len(sel)) for sel in selections]
        mk = [value(variant, True, len(sel)) for sel in selections]
        if m_full == m_empty:
            warnings.warn(
                f"variant {variant}: m(M) == m(empty) = {m_full}; faithfulness is undefined (nan)",
                stacklevel=2,
            )
        curves[variant] = VariantCurve(
            n_nodes=[node_count(sel, sites, free) for sel in selections],
            faithfulness=[_faith(x, m_full, m_empty) for x in mc],
            completeness=[_faith(x, m_full, m_empty) for x in mk],
            m_circuit=mc,
            m_complement=mk,
            m_full=m_full,
            m_empty=m_empty,
        )
    per_site = [(sizes[s.name] + 1) * n_positions for s in sites if not _is_free(s, free)]
    disc = circ.node_threshold
    return EvalResult(
        thresholds=thr,
        variants=curves,
        below_discovery_threshold=[disc is not None and not circ.all_nodes and t <= disc for t in thr],
        discovery_node_threshold=disc,
        all_nodes=circ.all_nodes,
        aggregation=circ.aggregation.value,
        free_layers=free,
        n_nodes_total=int(sum(per_site)),
        num_examples=sum(len(b.pairs) for b in batches),
        meta={
            **{
                k: v
                for k, v in circ.meta.items()
                if k in ("model", "saes", "method", "dataset", "split", "path")
            },
            "means": "per position" if aligned else "over all tokens (examples of different lengths)",
        },
    )
