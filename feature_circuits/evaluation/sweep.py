"""The threshold sweep of a circuit: faithfulness and completeness by ablation, plan -> run -> score.

Definitions (docs/algorithms.md, "Evaluation"):

* **Faithfulness and completeness.** With m the metric averaged over the evaluation examples
  (:mod:`feature_circuits.metrics`; by default the one the circuit was discovered with), M the full
  model and "empty" every node ablated: faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty)) and
  completeness(C) = faithfulness(M minus C). Both are ratios of metric differences, so they do not
  depend on the metric's sign. faithfulness(M) = 1, faithfulness(empty) = 0 and completeness(M) = 0
  hold exactly: identical keep masks share one forward.
* **What is swept** (:class:`SweepSource`). The circuit's nodes with their aggregated effects, as one
  dense tensor per site ``(P, F + 1)`` (error node last; ``P = 1`` under aggregation ``sum``, ``s``
  under ``none``). With the dense effects of every node (the circuit's effects file, read by
  :func:`circuit_effects`, or a :class:`~feature_circuits.circuit.AggregatedNodes`) thresholds below
  the discovery threshold give larger circuits. A circuit without them has only its stored nodes
  (those above the discovery threshold; every other node counts as effect 0): thresholds at or
  below the discovery threshold all give the whole stored circuit and are flagged
  (:attr:`EvalResult.below_discovery_threshold`).
* **The circuit as stored.** Before the sweep, the circuit exactly as circuit.json holds it: its
  own node set (at its own threshold), scored like every point of the sweep
  (:attr:`VariantCurve.stored`). When the effects file disagrees with circuit.json (nodes above the
  threshold in the file but not in the circuit: removed by hand; stored nodes at or below it:
  added by hand) the result says so (:attr:`EvalResult.warnings`) and the sweep, too, runs over the
  stored nodes only.
* **Plan.** For each threshold t the circuit C_t is every node with |effect| > t (a comparison per
  site tensor; the selections grow as t falls). For each variant and each distinct C_t (plus the
  empty selection) the keep masks of C_t and of its complement (:func:`.masks.keep_masks`, free
  layers always kept) are built; identical masks are evaluated once. The complement of the empty
  selection keeps everything: m(M). The empty selection itself gives m(empty).
* **Run.** Means over the patch inputs once (:func:`.ablation.compute_means`, or passed in), then
  every distinct mask configuration (:func:`.ablation.ablated_metrics`), ``stack`` configurations
  per forward.
* **Score.** Per variant the curves of node counts (outside the free layers), faithfulness and
  completeness, with the raw metric values (:class:`VariantCurve`).
* **Integrated scores** (:mod:`.scores`, docs/algorithms.md, "Integrated scores"). Per variant the
  faithfulness of the top-``k`` circuits on a fixed grid of sizes and its scores (``auc``, ``cpr``,
  ``cmd``); the random baseline of the standard variant (same node count per site, seeded draws);
  bootstrap intervals over examples from the per-example metric values of the forwards already
  run. Their mask configurations run after (and never in one forward with) the sweep's, so the
  sweep's numbers do not depend on them.
* **Ablation kind** (:class:`~.ablation.AblationKind`): ``mean`` (the standard), ``zero``, ``patch``
  or ``resample``.

The neuron baseline is a circuit discovered with identity dictionaries (``saes="neurons"``), whose
error is identically zero: ablating it is a no-op, so its error nodes count as kept.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from feature_circuits.circuit import AggregatedNodes, Circuit, CircuitError, Node, load_effects
from feature_circuits.data import Batch, Pair, make_batches
from feature_circuits.dictionaries import IdentityDictionary
from feature_circuits.errors import EvaluationError
from feature_circuits.evaluation.ablation import (
    AblationKind,
    FromInputs,
    MaskConfig,
    Values,
    ablated_metric_values,
    compute_means,
    parse_ablation,
    positions_aligned,
    resample_inputs,
    zero_values,
)
from feature_circuits.evaluation.masks import (
    STANDARD_VARIANT,
    SiteMask,
    Variant,
    default_free_layers,
    is_free,
    keep_masks,
    node_count,
    parse_variant,
    select,
)
from feature_circuits.evaluation.scores import (
    AUC_SIZES,
    MIB_FRACTIONS,
    Baseline,
    Grid,
    Intervals,
    Scores,
    bootstrap_counts,
    percentile_interval,
    random_selection,
    ranked_selections,
    resampled_means,
    site_counts,
)
from feature_circuits.metrics import MetricName, get_metric
from feature_circuits.types import Aggregation, Method, Site, error_index

if TYPE_CHECKING:
    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.model import LoadedModel

__all__ = [
    "CircuitPoint",
    "EvalResult",
    "SweepSource",
    "VariantCurve",
    "check_effects_agree",
    "circuit_effects",
    "default_thresholds",
    "effects_disagreement",
    "evaluate_circuit",
    "sweep_source",
]


# --------------------------------------------------------------------------------------------------
# What is swept


@dataclass(frozen=True, kw_only=True)
class SweepSource:
    """The node effects a sweep thresholds and where they came from.

    ``effects`` holds the dense effects of every node (``{site: (F+1,) or (s, F+1)}``, error node
    last) when known; otherwise only the stored ``nodes`` are swept. ``provenance`` names the
    circuit's model, saes, method, dataset and split (empty for bare effects).
    """

    aggregation: Aggregation
    metric: MetricName = MetricName.LOGIT_DIFF
    effects: Mapping[str, Tensor] | None = None
    nodes: tuple[Node, ...] = ()
    node_threshold: float | None = None
    tokens: tuple[str, ...] | None = None
    provenance: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # e.g. the effects file and the stored nodes disagree

    @property
    def all_nodes(self) -> bool:
        """Whether every node's effect is known (dense effects), not only the stored nodes'."""
        return self.effects is not None


def sweep_source(
    circuit: Circuit | AggregatedNodes, effects: Mapping[str, Tensor] | None = None
) -> SweepSource:
    """What :func:`evaluate_circuit` sweeps for a stored circuit (with the dense ``effects`` of every
    node when given: they must agree with the stored nodes, see :func:`check_effects_agree`) or for
    the aggregated effects of a discovery run (every node, no discovery threshold)."""
    if isinstance(circuit, AggregatedNodes):
        if effects is not None:
            raise EvaluationError("effects= is for a stored Circuit; AggregatedNodes already holds them")
        return SweepSource(aggregation=Aggregation(circuit.aggregation), effects=circuit.effects)
    if not isinstance(circuit, Circuit):
        raise EvaluationError(
            f"expected a Circuit or AggregatedNodes, got {type(circuit).__name__} (wrap dense effects "
            "per site as circuit.AggregatedNodes)"
        )
    aggregation = Aggregation(circuit.aggregation)
    notes: tuple[str, ...] = ()
    if effects is not None:
        check_effects_agree(circuit, effects, source="effects")
        note = effects_disagreement(circuit, effects)
        if note is not None:
            notes, effects = (f"{note}; evaluating the stored nodes only, the sweep included",), None
    return SweepSource(
        aggregation=aggregation,
        warnings=notes,
        metric=MetricName(circuit.metric),
        effects=effects,
        nodes=tuple(circuit.nodes),
        node_threshold=float(circuit.node_threshold),
        tokens=None if circuit.tokens is None else tuple(circuit.tokens),
        provenance={
            "model": circuit.model,
            "saes": circuit.saes,
            "method": Method(circuit.method).value,
            "dataset": circuit.dataset,
            "split": circuit.split,
        },
    )


def check_effects_agree(circuit: Circuit, effects: Mapping[str, Tensor], *, source: str) -> None:
    """Every stored node of ``circuit`` must have the same effect in the dense ``effects`` (up to
    float32 rounding), which catches an effects file from another run; :class:`EvaluationError`
    starting with ``source`` otherwise."""
    want = 1 if Aggregation(circuit.aggregation) is Aggregation.SUM else 2
    for n in circuit.nodes:
        eff = effects.get(n.site)
        if eff is None:
            raise EvaluationError(f"{source}: no effects for site {n.site!r} of circuit node {n.id}")
        idx = error_index(eff.shape[-1] - 1) if n.feature is None else n.feature
        if eff.dim() == want == 1:
            row = eff
        elif eff.dim() == want == 2 and n.position is not None and 0 <= n.position < eff.shape[0]:
            row = eff[n.position]
        else:
            row = None
        if row is None or not 0 <= idx < eff.shape[-1]:
            raise EvaluationError(
                f"{source}: circuit node {n.id} is outside the effects of shape {tuple(eff.shape)}"
            )
        val = float(row[idx])
        if not math.isclose(val, n.effect, rel_tol=1e-5, abs_tol=1e-7):
            raise EvaluationError(
                f"{source}: circuit node {n.id} has effect {n.effect:g} in the circuit but {val:g} in the "
                "effects file (from another run?)"
            )


def effects_disagreement(circuit: Circuit, effects: Mapping[str, Tensor]) -> str | None:
    """How the dense ``effects`` disagree with the circuit's node set, or None: nodes above the
    circuit's threshold in the effects but not in the circuit (removed by hand), stored nodes at or
    below it (added by hand). A float32 rounding margin keeps nodes at the threshold out of it."""
    t = float(circuit.node_threshold)
    margin = t * (1 + 1e-5) + 1e-7
    stored: set[tuple[str, int | None, int]] = set()
    for n in circuit.nodes:
        eff = effects[n.site]  # present: check_effects_agree
        stored.add((n.site, n.position, error_index(eff.shape[-1] - 1) if n.feature is None else n.feature))
    removed: list[str] = []
    for site, eff in effects.items():
        grid = eff.detach().abs().reshape(-1, eff.shape[-1]) if eff.dim() == 2 else eff.detach().abs()[None]
        for pos, idx in torch.nonzero(grid > margin).tolist():
            key = (site, pos if eff.dim() == 2 else None, idx)
            if key not in stored:
                feature = None if idx == error_index(eff.shape[-1] - 1) else idx
                removed.append(Node.make_id(site, feature, key[1]))
    added = [n.id for n in circuit.nodes if abs(n.effect) < t * (1 - 1e-5) - 1e-7]
    problems = []
    if removed:
        problems.append(
            f"{len(removed)} node(s) with |effect| > {t:g} in the effects file are not in circuit.json "
            f"(removed by hand?), e.g. {', '.join(removed[:3])}"
        )
    if added:
        problems.append(
            f"{len(added)} node(s) of circuit.json have |effect| at or below its threshold {t:g} "
            f"(added by hand?), e.g. {', '.join(added[:3])}"
        )
    return "; ".join(problems) or None


def circuit_effects(circuit: Circuit, circuit_path: str | Path) -> dict[str, Tensor] | None:
    """The dense effects of every node named by the circuit's ``effects_file`` (relative to the
    directory of ``circuit_path``, its circuit.json), checked against the stored nodes; None when the
    circuit has no effects file. :class:`EvaluationError` naming the file when it is missing, not an
    effects file, or from another run."""
    if circuit.effects_file is None:
        return None
    path = Path(circuit_path).parent / circuit.effects_file
    try:
        effects = load_effects(path, circuit.aggregation)
    except CircuitError as err:
        raise EvaluationError(f"{circuit_path}: effects_file: {err}") from None
    check_effects_agree(circuit, effects, source=f"{circuit_path} (effects file {path})")
    return effects


# --------------------------------------------------------------------------------------------------
# Plan


def default_thresholds(max_effect: float) -> list[float]:
    """The grid ``logspace(-4, 0, 15)``, extended upwards with the same ratio (10^(4/14)) until it
    passes ``max_effect`` (the largest |effect| of the circuit), so the sweep always reaches the
    empty circuit."""
    grid = list(np.logspace(-4, 0, 15))
    ratio = 10 ** (4 / 14)
    while grid[-1] <= max_effect and len(grid) < 200:
        grid.append(grid[-1] * ratio)
    return [float(t) for t in grid]


_Index = dict[str, tuple[list[int], list[int], list[float]]]


def _stored_index(
    src: SweepSource, sites: Sequence[Site], sizes: Mapping[str, int], n_positions: int
) -> _Index:
    """Per site the (row, column, effect) of each stored node in a ``(P, F + 1)`` grid."""
    per_position = src.aggregation is Aggregation.NONE
    index: dict[str, tuple[list[int], list[int], list[float]]] = {s.name: ([], [], []) for s in sites}
    for n in src.nodes:
        if n.site not in index:
            raise EvaluationError(
                f"circuit node {n.id} at unknown site {n.site!r}; the model's sites are {sorted(index)}"
            )
        n_feat = sizes[n.site]
        if n.feature is not None and not 0 <= n.feature < n_feat:
            raise EvaluationError(
                f"circuit node {n.id}: feature index out of range for a dictionary of size {n_feat} "
                "(wrong --saes?)"
            )
        pos = 0
        if per_position:
            if n.position is None:
                raise EvaluationError(f"circuit node {n.id} has no position but the aggregation is 'none'")
            if not 0 <= n.position < n_positions:
                raise EvaluationError(
                    f"circuit node {n.id}: position out of range for evaluation examples of {n_positions} "
                    "tokens (a position-aligned circuit needs examples of the discovery length)"
                )
            pos = n.position
        rows, cols, vals = index[n.site]
        rows.append(pos)
        cols.append(error_index(n_feat) if n.feature is None else n.feature)
        vals.append(float(n.effect))
    return index


def _scatter(
    index: _Index, sites: Sequence[Site], sizes: Mapping[str, int], n_positions: int, *, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The stored nodes as dense ``(P, F + 1)`` tensors: their effects (float64, 0 where absent) or,
    with ``dtype=torch.bool``, the selection of exactly those nodes."""
    out = {}
    for s in sites:
        dense = torch.zeros(n_positions, sizes[s.name] + 1, dtype=dtype)
        rows, cols, vals = index[s.name]
        values = (
            torch.ones(len(vals), dtype=torch.bool)
            if dtype == torch.bool
            else torch.tensor(vals, dtype=dtype)
        )
        dense[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = values
        out[s.name] = dense
    return out


def _given_effects(
    effects: Mapping[str, Tensor],
    aggregation: Aggregation,
    sites: Sequence[Site],
    sizes: Mapping[str, int],
    n_positions: int,
) -> dict[str, Tensor]:
    """Dense effects (``(F+1,)`` or ``(s, F+1)`` per site) as ``(P, F + 1)`` float64 tensors over the
    model's sites (zeros for a site without effects)."""
    names = {s.name for s in sites}
    want = 1 if aggregation is Aggregation.SUM else 2
    out = {s.name: torch.zeros(n_positions, sizes[s.name] + 1, dtype=torch.float64) for s in sites}
    for name, eff in effects.items():
        if name not in names:
            raise EvaluationError(
                f"node effects at unknown site {name!r}; the model's sites are {sorted(names)}"
            )
        if eff.dim() != want:
            raise EvaluationError(f"effects[{name!r}] has shape {tuple(eff.shape)}; expected {want} dims")
        if eff.shape[-1] - 1 != sizes[name]:
            raise EvaluationError(
                f"the circuit's node effects have {eff.shape[-1] - 1} features at site {name}, the "
                f"dictionary has {sizes[name]} (wrong --saes?)"
            )
        grid = eff.detach().cpu().double().reshape(-1, eff.shape[-1])
        if grid.shape[0] > n_positions and bool(grid[n_positions:].any()):
            raise EvaluationError(
                f"node effects at {name}: position out of range for evaluation examples of {n_positions} "
                "tokens (a position-aligned circuit needs examples of the discovery length)"
            )
        rows = min(grid.shape[0], n_positions)
        out[name][:rows] = grid[:rows]
    return out


def _canonical(masks: MaskConfig, dictionaries: Mapping[str, Dictionary]) -> dict[str, SiteMask | None]:
    """Identity dictionaries (neurons) have a zero error whose mean is zero: ablating it is a no-op,
    so their error nodes count as kept (lets variants that differ only there share a forward)."""
    out: dict[str, SiteMask | None] = {}
    for name, m in masks.items():
        if m is not None and isinstance(dictionaries[name], IdentityDictionary):
            m = SiteMask(f=m.f, err=torch.ones_like(m.err))
            if m.all_kept:
                m = None
        out[name] = m
    return out


def _mask_digest(masks: MaskConfig) -> str:
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


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """Per threshold the selection size (every site) and node count (outside the free layers); the
    distinct mask configurations in evaluation order, and which one each (variant, complement,
    selection size) uses (the selections grow as the threshold falls, so a size names one)."""

    sizes: tuple[int, ...]
    n_nodes: tuple[int, ...]
    configs: dict[str, MaskConfig]
    digest_of: dict[tuple[Variant, bool, int], str]
    stored_n_nodes: int | None = None  # the stored circuit's node count, its masks under key _STORED


#: The key of the stored circuit's selection in :attr:`_Plan.digest_of` (sizes are >= 0).
_STORED = -1


def _plan(
    dense: Mapping[str, Tensor],
    thresholds: Sequence[float],
    variants: Sequence[Variant],
    sites: Sequence[Site],
    dictionaries: Mapping[str, Dictionary],
    free_layers: int,
    stored: Mapping[str, Tensor] | None = None,
) -> _Plan:
    empty = {name: torch.zeros_like(eff, dtype=torch.bool) for name, eff in dense.items()}
    by_size: dict[int, Mapping[str, Tensor]] = {0: empty}
    if stored is not None:
        by_size[_STORED] = stored
    sizes, counts = [], []
    for t in thresholds:
        sel = select(dense, t)
        size = sum(int(s.sum()) for s in sel.values())
        by_size.setdefault(size, sel)
        sizes.append(size)
        counts.append(node_count(sel, sites, free_layers))
    configs: dict[str, MaskConfig] = {}
    digest_of: dict[tuple[Variant, bool, int], str] = {}
    for variant in variants:
        for size in sorted(by_size):
            for complement in (False, True):
                masks = keep_masks(
                    by_size[size], sites, complement=complement, variant=variant, free_layers=free_layers
                )
                masks = _canonical(masks, dictionaries)
                digest = _mask_digest(masks)
                digest_of[(variant, complement, size)] = digest
                configs.setdefault(digest, masks)
    return _Plan(
        sizes=tuple(sizes),
        n_nodes=tuple(counts),
        configs=configs,
        digest_of=digest_of,
        stored_n_nodes=None if stored is None else node_count(stored, sites, free_layers),
    )


# --------------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True, kw_only=True)
class CircuitPoint:
    """The circuit exactly as stored (its own nodes, at its own threshold), scored like a point of
    the sweep: node count outside the free layers, faithfulness, completeness, m(C), m(M minus C)."""

    n_nodes: int
    faithfulness: float
    completeness: float
    m_circuit: float
    m_complement: float


@dataclass(frozen=True, kw_only=True)
class VariantCurve:
    """One variant's sweep: per threshold the node count, faithfulness and completeness, and the raw
    metrics m(C) and m(M minus C); plus m(M) and m(empty) for this variant."""

    n_nodes: tuple[int, ...]
    faithfulness: tuple[float, ...]
    completeness: tuple[float, ...]
    m_circuit: tuple[float, ...]
    m_complement: tuple[float, ...]
    m_full: float
    m_empty: float
    #: the circuit as stored (None for bare aggregated effects); not part of the curve's equality
    stored: CircuitPoint | None = field(default=None, compare=False)
    #: faithfulness of the top-k circuit at every size of :attr:`EvalResult.grid` (``Grid.sizes``)
    grid_faithfulness: tuple[float, ...] = field(default=(), compare=False)
    #: the integrated scores of :attr:`grid_faithfulness` (None without a grid)
    scores: Scores | None = field(default=None, compare=False)
    #: bootstrap intervals over examples (None when not computed)
    intervals: Intervals | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        lengths = {len(self.n_nodes), len(self.faithfulness), len(self.completeness)}
        lengths |= {len(self.m_circuit), len(self.m_complement)}
        if len(lengths) != 1:
            raise ValueError(f"VariantCurve: per-threshold fields of different lengths {sorted(lengths)}")


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """The sweep for every variant; :attr:`n_nodes`, :attr:`faithfulness` and :attr:`completeness`
    are the standard variant's. ``meta`` holds the circuit's provenance (model, saes, method,
    dataset, split) and whatever a caller adds (:meth:`with_meta`)."""

    thresholds: tuple[float, ...]
    variants: Mapping[Variant, VariantCurve]
    below_discovery_threshold: tuple[bool, ...]
    discovery_node_threshold: float | None
    all_nodes: bool  # swept over every node's effect (effects file), not only the stored nodes
    aggregation: Aggregation
    metric: MetricName
    free_layers: int
    n_nodes_total: int
    num_examples: int
    means_per_position: bool
    meta: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # e.g. the effects file disagrees with the stored nodes
    ablation: AblationKind = AblationKind.MEAN
    seed: int = 0  # of the resample ablation, the bootstrap and the random baseline
    grid: Grid | None = None  # the sizes of the integrated scores (None: not computed)
    baseline: Baseline | None = None  # the random-circuit baseline of the standard variant

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("EvalResult: no variants")
        n = len(self.thresholds)
        if len(self.below_discovery_threshold) != n or any(
            len(c.n_nodes) != n for c in self.variants.values()
        ):
            raise ValueError("EvalResult: per-threshold fields must have one entry per threshold")

    @property
    def standard_variant(self) -> Variant:
        """The standard variant when it was evaluated, else the first one."""
        return STANDARD_VARIANT if STANDARD_VARIANT in self.variants else next(iter(self.variants))

    @property
    def standard(self) -> VariantCurve:
        return self.variants[self.standard_variant]

    @property
    def n_nodes(self) -> tuple[int, ...]:
        return self.standard.n_nodes

    @property
    def faithfulness(self) -> tuple[float, ...]:
        return self.standard.faithfulness

    @property
    def completeness(self) -> tuple[float, ...]:
        return self.standard.completeness

    @property
    def scores(self) -> Scores | None:
        """The standard variant's integrated scores."""
        return self.standard.scores

    @property
    def intervals(self) -> Intervals | None:
        """The standard variant's bootstrap intervals."""
        return self.standard.intervals

    def with_meta(self, **items: str) -> EvalResult:
        """The same result with ``items`` added to :attr:`meta` (e.g. the evaluation dataset)."""
        return replace(self, meta={**self.meta, **items})


def _faith(m: float, m_full: float, m_empty: float) -> float:
    """(m - m(empty)) / (m(M) - m(empty)), computed as (m(empty) - m) / (m(empty) - m(M)): the same
    ratio, and for ``logit_diff`` bit for bit (a zero's sign included) the value of the opposite sign
    convention earlier versions measured with."""
    denom = m_empty - m_full
    if denom == 0:
        return float("nan")
    return (m_empty - m) / denom


def _score(
    plan: _Plan, variants: Sequence[Variant], value_of: Mapping[str, float]
) -> dict[Variant, VariantCurve]:
    curves: dict[Variant, VariantCurve] = {}
    for variant in variants:
        m_full = value_of[plan.digest_of[(variant, True, 0)]]  # the complement of nothing: everything kept
        m_empty = value_of[plan.digest_of[(variant, False, 0)]]
        mc = tuple(value_of[plan.digest_of[(variant, False, size)]] for size in plan.sizes)
        mk = tuple(value_of[plan.digest_of[(variant, True, size)]] for size in plan.sizes)
        if m_full == m_empty:
            warnings.warn(
                f"variant {variant.value}: m(M) == m(empty) = {m_full}; faithfulness is undefined (nan)",
                stacklevel=3,
            )
        point = None
        if plan.stored_n_nodes is not None:
            sc = value_of[plan.digest_of[(variant, False, _STORED)]]
            sk = value_of[plan.digest_of[(variant, True, _STORED)]]
            point = CircuitPoint(
                n_nodes=plan.stored_n_nodes,
                faithfulness=_faith(sc, m_full, m_empty),
                completeness=_faith(sk, m_full, m_empty),
                m_circuit=sc,
                m_complement=sk,
            )
        curves[variant] = VariantCurve(
            stored=point,
            n_nodes=plan.n_nodes,
            faithfulness=tuple(_faith(x, m_full, m_empty) for x in mc),
            completeness=tuple(_faith(x, m_full, m_empty) for x in mk),
            m_circuit=mc,
            m_complement=mk,
            m_full=m_full,
            m_empty=m_empty,
        )
    return curves


# --------------------------------------------------------------------------------------------------
# The sweep


def _as_batches(data: Sequence[Batch] | Sequence[Pair], loaded: LoadedModel, batch_size: int) -> list[Batch]:
    if all(isinstance(x, Batch) for x in data):
        batches = [x for x in data if isinstance(x, Batch)]
    elif all(isinstance(x, Pair) for x in data):
        batches = make_batches([x for x in data if isinstance(x, Pair)], loaded.tokenizer, batch_size)
    else:
        raise EvaluationError("evaluation data must be a sequence of data.Pair or of data.Batch")
    if not batches:
        raise EvaluationError("no evaluation examples")
    return batches


def _metric_name(name: MetricName | str) -> MetricName:
    get_metric(name)  # ConfigError naming the choices
    return MetricName(name)


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    thr = [float(t) for t in thresholds]
    if not thr:
        raise EvaluationError("no thresholds")
    if any(not math.isfinite(t) or t < 0 for t in thr):
        raise EvaluationError(f"thresholds must be finite and >= 0, got {thr}")
    return thr


def _positions(src: SweepSource, batches: Sequence[Batch]) -> int:
    """Positions of the keep masks: 1 under ``sum``; under ``none`` the one token length of the
    evaluation examples, which must match the circuit's tokens."""
    if src.aggregation is Aggregation.SUM:
        return 1
    lengths = sorted({b.seq_len for b in batches})
    if len(lengths) != 1:
        raise EvaluationError(
            "the circuit is position-aligned (aggregation 'none'): evaluation examples must all have one "
            f"token length, found {lengths}"
        )
    seq_len = lengths[0]
    if src.tokens and len(src.tokens) != seq_len:
        raise EvaluationError(
            f"the circuit is position-aligned over {len(src.tokens)} tokens ({' '.join(src.tokens)!r}) but "
            f"the evaluation examples have {seq_len}: evaluate on data of the same template"
        )
    return seq_len


def evaluate_circuit(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    circuit: Circuit | AggregatedNodes,
    data: Sequence[Batch] | Sequence[Pair],
    *,
    effects: Mapping[str, Tensor] | None = None,
    metric: MetricName | str | None = None,
    thresholds: Sequence[float] | None = None,
    variants: Sequence[Variant | str] = tuple(Variant),
    batch_size: int = 32,
    free_layers: int | None = None,
    means: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    stack: int | None = None,
    max_rows: int = 128,
    progress: bool = False,
    ablation: AblationKind | str = AblationKind.MEAN,
    seed: int = 0,
    bootstrap: int = 200,
    baseline_draws: int = 5,
    auc_sizes: Sequence[int] = AUC_SIZES,
    fractions: Sequence[float] = MIB_FRACTIONS,
    scores: bool = True,
) -> EvalResult:
    """Sweep node thresholds over ``circuit`` and measure faithfulness and completeness by mean
    ablation on ``data`` (pairs, batched by ``batch_size``, or batches), for each variant.

    ``effects``: the dense effects of every node of a stored circuit (:func:`circuit_effects`), so
    the sweep reaches below the discovery threshold. ``metric``: default the circuit's own.
    ``thresholds``: default :func:`default_thresholds`. ``free_layers``: default
    :func:`~.masks.default_free_layers`. ``means``: over the patch inputs of ``data``, computed the
    same way (per position when the examples are aligned); computed here when not given (mean
    ablation only). ``stack`` mask configurations share a forward (default: as many as fit in
    ``max_rows`` rows).

    ``ablation``: what an ablated node takes (:class:`~.ablation.AblationKind`). The integrated
    scores are read on the grid ``auc_sizes`` / ``fractions`` (:class:`~.scores.Grid`); ``bootstrap``
    resamples of the examples give their intervals (0: none) and ``baseline_draws`` random circuits
    per grid size the baseline (0: none); ``seed`` seeds the resample ablation, the bootstrap and
    the baseline. ``scores=False``: only the threshold sweep (no grid, scores, intervals or baseline).
    """
    src = sweep_source(circuit, effects)
    kind = parse_ablation(ablation)
    if means is not None and kind is not AblationKind.MEAN:
        raise EvaluationError(f"means= is for mean ablation, not {kind.value!r}")
    if bootstrap < 0 or baseline_draws < 0:
        raise EvaluationError(
            f"bootstrap and baseline_draws must be >= 0, got {bootstrap} and {baseline_draws}"
        )
    variant_list = [parse_variant(v) for v in variants]
    if not variant_list:
        raise EvaluationError("no variants; choose from " + ", ".join(v.value for v in Variant))
    metric_name = src.metric if metric is None else _metric_name(metric)
    # partial coverage: only the sites with a dictionary are spliced (docs/algorithms.md, "Sites")
    sites = list(loaded.spliced_sites(dictionaries))
    if not sites:
        raise EvaluationError("no dictionary for any site")
    sizes = {s.name: int(dictionaries[s.name].dict_size) for s in sites}
    free = default_free_layers(loaded.n_layers) if free_layers is None else int(free_layers)
    batches = _as_batches(data, loaded, batch_size)
    n_positions = _positions(src, batches)
    index = _stored_index(src, sites, sizes, n_positions)
    if src.effects is not None:
        dense = _given_effects(src.effects, src.aggregation, sites, sizes, n_positions)
    else:
        dense = _scatter(index, sites, sizes, n_positions, dtype=torch.float64)
    stored = (
        None if src.node_threshold is None else _scatter(index, sites, sizes, n_positions, dtype=torch.bool)
    )
    top = max((float(d.abs().max()) for d in dense.values()), default=0.0)
    thr = _check_thresholds(default_thresholds(top) if thresholds is None else thresholds)
    aligned = positions_aligned(batches)
    if means is not None:
        want = batches[0].patch.shape[1] if aligned else 1
        got = {int(mf.shape[0]) for mf, _ in means.values()}
        if got != {want}:
            raise EvaluationError(f"means over {sorted(got)} position(s) given; these examples need {want}")

    n_total = sum((sizes[s.name] + 1) * n_positions for s in sites if not is_free(s, free))
    plan = _plan(dense, thr, variant_list, sites, dictionaries, free, stored)
    ranked_only = None if src.all_nodes or stored is None else stored
    n_ranked = n_total if ranked_only is None else node_count(ranked_only, sites, free)
    grid = Grid(n_total=n_total, n_ranked=n_ranked, auc_sizes=tuple(auc_sizes), fractions=tuple(fractions))
    standard = STANDARD_VARIANT if STANDARD_VARIANT in variant_list else variant_list[0]
    draws = baseline_draws if scores else 0
    extra = _GridPlan(configs={}, top={}, random={}, draws=0)
    if scores:
        extra = _grid_plan(
            plan, dense, grid, variant_list, standard, sites, dictionaries, free, ranked_only, draws, seed
        )
    values = _ablation_values(kind, loaded, dictionaries, batches, means, aligned, seed)
    value_of, per_example = _run(
        loaded, dictionaries, batches, plan, extra.configs, values, metric_name, stack, max_rows, progress
    )
    curves = _score(plan, variant_list, value_of)
    if scores:
        curves = {
            v: _integrate(c, v, plan, extra, grid, value_of, per_example, bootstrap, seed)
            for v, c in curves.items()
        }
    baseline = _baseline(extra, grid, standard, curves[standard], value_of, draws, seed)

    disc = src.node_threshold
    return EvalResult(
        ablation=kind,
        seed=int(seed),
        grid=grid if scores else None,
        baseline=baseline,
        thresholds=tuple(thr),
        variants=curves,
        below_discovery_threshold=tuple(disc is not None and not src.all_nodes and t <= disc for t in thr),
        discovery_node_threshold=disc,
        all_nodes=src.all_nodes,
        aggregation=src.aggregation,
        metric=metric_name,
        free_layers=free,
        n_nodes_total=n_total,
        num_examples=sum(len(b) for b in batches),
        means_per_position=aligned,
        meta=dict(src.provenance),
        warnings=src.warnings,
    )


def _ablation_values(
    kind: AblationKind,
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    means: Mapping[str, tuple[Tensor, Tensor]] | None,
    aligned: bool,
    seed: int,
) -> Values | None:
    """What ablated nodes take for ``kind``; None: the means, computed in :func:`_run`."""
    if kind is AblationKind.MEAN:
        return means
    if kind is AblationKind.ZERO:
        return zero_values(loaded.spliced_sites(dictionaries), loaded.device, loaded.dtype)
    if kind is AblationKind.PATCH:
        return FromInputs(tuple(b.patch for b in batches), AblationKind.PATCH)
    return resample_inputs(batches, seed)


def _run(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    plan: _Plan,
    extra: Mapping[str, MaskConfig],
    values: Values | None,
    metric: MetricName,
    stack: int | None,
    max_rows: int,
    progress: bool,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The metric of every distinct mask configuration of ``plan`` and then of ``extra`` (in forwards
    of their own, so the sweep's values do not depend on ``extra``): averaged over the examples and
    per example. Means are computed first when ``values`` is None (mean ablation)."""
    from tqdm.auto import tqdm

    if stack is None:
        stack = max(1, max_rows // max(len(b) for b in batches))
    value_of: dict[str, float] = {}
    per_example: dict[str, np.ndarray] = {}
    parts = [list(plan.configs), [d for d in extra if d not in plan.configs]]
    n_from = len(batches) if isinstance(values, FromInputs) else 0  # a source forward per batch and part
    total = sum(len(o) * len(batches) + (n_from if o else 0) for o in parts)
    total += len(batches) if values is None else 0
    bar = tqdm(total=total, desc="evaluate", unit="fwd", disable=not progress)
    configs = {**extra, **plan.configs}
    try:
        if values is None:
            aligned = positions_aligned(batches)
            values = compute_means(loaded, dictionaries, batches, per_position=aligned, progress=bar)
        for order in parts:
            if not order:
                continue
            got = ablated_metric_values(
                loaded,
                dictionaries,
                batches,
                values,
                [configs[d] for d in order],
                metric=get_metric(metric),
                stack=stack,
                progress=bar,
            )
            if n_from:
                bar.update(n_from)
            value_of.update(zip(order, got.mean, strict=True))
            per_example.update(zip(order, got.per_example, strict=True))
    finally:
        bar.close()
    return value_of, per_example


# --------------------------------------------------------------------------------------------------
# Integrated scores, bootstrap intervals, random baseline


@dataclass(frozen=True, kw_only=True)
class _GridPlan:
    """The mask configurations of the grid: per (variant, size) the top-k circuit's digest, per
    (draw, size) the random circuit's (standard variant); ``configs`` those not in the sweep."""

    configs: dict[str, MaskConfig]
    top: dict[tuple[Variant, int], str]
    random: dict[tuple[int, int], str]
    draws: int


def _grid_plan(
    plan: _Plan,
    dense: Mapping[str, Tensor],
    grid: Grid,
    variants: Sequence[Variant],
    standard: Variant,
    sites: Sequence[Site],
    dictionaries: Mapping[str, Dictionary],
    free_layers: int,
    ranked_only: Mapping[str, Tensor] | None,
    draws: int,
    seed: int,
) -> _GridPlan:
    selections = ranked_selections(dense, sites, free_layers, grid.sizes, ranked_only=ranked_only)
    configs: dict[str, MaskConfig] = {}

    def digest_of(selection: Mapping[str, Tensor], variant: Variant) -> str:
        masks = keep_masks(selection, sites, variant=variant, free_layers=free_layers)
        masks = _canonical(masks, dictionaries)
        digest = _mask_digest(masks)
        if digest not in plan.configs:
            configs.setdefault(digest, masks)
        return digest

    top = {(v, k): digest_of(selections[k], v) for v in variants for k in grid.sizes}
    gen = torch.Generator().manual_seed(int(seed))
    random: dict[tuple[int, int], str] = {}
    for d in range(draws):
        for k in grid.sizes:
            counts = site_counts(selections[k], sites, free_layers)
            random[(d, k)] = digest_of(random_selection(dense, sites, free_layers, counts, gen), standard)
    return _GridPlan(configs=configs, top=top, random=random, draws=draws)


def _faith_array(m: np.ndarray, m_full: np.ndarray, m_empty: np.ndarray) -> np.ndarray:
    """:func:`_faith` elementwise (NaN where m(M) == m(empty))."""
    denom = m_empty - m_full
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (m_empty - m) / denom
    return np.where(denom == 0, np.nan, out)


def _pairs(a: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((float(lo), float(hi)) for lo, hi in a.reshape(-1, 2))


def _integrate(
    curve: VariantCurve,
    variant: Variant,
    plan: _Plan,
    gp: _GridPlan,
    grid: Grid,
    value_of: Mapping[str, float],
    per_example: Mapping[str, np.ndarray],
    bootstrap: int,
    seed: int,
) -> VariantCurve:
    """``curve`` with its grid faithfulness, scores and (``bootstrap`` > 0) intervals."""
    faith = {k: _faith(value_of[gp.top[(variant, k)]], curve.m_full, curve.m_empty) for k in grid.sizes}
    scores = grid.scores(faith)
    intervals = None
    if bootstrap > 0:
        rows = {
            "full": [plan.digest_of[(variant, True, 0)]],
            "empty": [plan.digest_of[(variant, False, 0)]],
            "circuit": [plan.digest_of[(variant, False, size)] for size in plan.sizes],
            "complement": [plan.digest_of[(variant, True, size)] for size in plan.sizes],
            "grid": [gp.top[(variant, k)] for k in grid.sizes],
        }
        if curve.stored is not None:
            rows["stored"] = [
                plan.digest_of[(variant, False, _STORED)],
                plan.digest_of[(variant, True, _STORED)],
            ]
        n = next(iter(per_example.values())).shape[0]
        counts = bootstrap_counts(n, bootstrap, seed)
        boot = {
            name: resampled_means(np.stack([per_example[d] for d in ds]), counts) for name, ds in rows.items()
        }
        full, empty = boot["full"][0], boot["empty"][0]
        f_c = _faith_array(boot["circuit"], full, empty)
        f_k = _faith_array(boot["complement"], full, empty)
        f_g = _faith_array(boot["grid"], full, empty)
        auc, c, d = grid.score_arrays({k: f_g[i] for i, k in enumerate(grid.sizes)})
        stored = None
        if "stored" in boot:
            fs = _faith_array(boot["stored"], full, empty)
            si = percentile_interval(fs)
            stored = {"faithfulness": _pairs(si[0])[0], "completeness": _pairs(si[1])[0]}
        intervals = Intervals(
            level=0.95,
            draws=bootstrap,
            seed=int(seed),
            scores={
                name: _pairs(percentile_interval(a))[0] for name, a in (("auc", auc), ("cpr", c), ("cmd", d))
            },
            faithfulness=_pairs(percentile_interval(f_c)),
            completeness=_pairs(percentile_interval(f_k)),
            grid_faithfulness=_pairs(percentile_interval(f_g)),
            stored=stored,
        )
    return replace(
        curve, grid_faithfulness=tuple(faith[k] for k in grid.sizes), scores=scores, intervals=intervals
    )


def _baseline(
    gp: _GridPlan,
    grid: Grid,
    standard: Variant,
    curve: VariantCurve,
    value_of: Mapping[str, float],
    draws: int,
    seed: int,
) -> Baseline | None:
    """The random baseline of the standard variant (None without draws)."""
    if draws <= 0:
        return None
    f = np.array(
        [
            [_faith(value_of[gp.random[(d, k)]], curve.m_full, curve.m_empty) for k in grid.sizes]
            for d in range(draws)
        ]
    )
    draw_scores = tuple(grid.scores({k: f[d, i] for i, k in enumerate(grid.sizes)}) for d in range(draws))
    std = f.std(0, ddof=1) if draws > 1 else np.zeros(f.shape[1])
    return Baseline(
        variant=standard.value,
        draws=draws,
        seed=int(seed),
        grid_faithfulness_mean=tuple(float(x) for x in f.mean(0)),
        grid_faithfulness_std=tuple(float(x) for x in std),
        draw_scores=draw_scores,
    )
