"""Node and edge attribution (docs/algorithms.md, "Methods" and "Edge effects").

    loaded, dicts = load_for_attribution("embedded", "embedded")
    nodes = node_effects(loaded, dicts, batch, Method.RELP)
    edges = edge_effects(loaded, dicts, batch, nodes, node_threshold=0.1)

* :mod:`.results`: the typed results (:class:`NodeEffects`, :class:`EdgeEffects`);
* :mod:`.forward`: the clean / patch forwards every method shares;
* :mod:`.exact`, :mod:`.atp`, :mod:`.relp`, :mod:`.ig`: one module per method, each registered in
  :mod:`.registry` with its options dataclass;
* :mod:`.edges`: edge effects between direct-path site pairs.

The metric is one of :mod:`feature_circuits.metrics` (default ``logit_diff``, or ``answer_logit``
without a counterfactual).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from feature_circuits.attribution.edges import SitePair, edge_effects
from feature_circuits.attribution.registry import (
    METHODS,
    AtpOptions,
    ExactOptions,
    IGOptions,
    MethodOptions,
    MethodSpec,
    NodeRequest,
    RelPOptions,
    method_spec,
)
from feature_circuits.attribution.results import EdgeEffects, NodeEffects, SiteState, SparseSiteState
from feature_circuits.data import Batch
from feature_circuits.dictionaries import Dictionary
from feature_circuits.metrics import Metric, answer_logit, logit_diff
from feature_circuits.model.loading import DeviceMap, LoadedModel
from feature_circuits.model.lrp import LRPController, get_lrp_controller, install_lrp
from feature_circuits.types import LRPConfig, Method

if TYPE_CHECKING:
    from feature_circuits.dictionaries.marks import SAESource

__all__ = [
    "METHODS",
    "AtpOptions",
    "EdgeEffects",
    "ExactOptions",
    "IGOptions",
    "LRPConfig",
    "LRPController",
    "Method",
    "MethodOptions",
    "MethodSpec",
    "NodeEffects",
    "NodeRequest",
    "RelPOptions",
    "SitePair",
    "SiteState",
    "SparseSiteState",
    "edge_effects",
    "get_lrp_controller",
    "install_lrp",
    "load_for_attribution",
    "method_spec",
    "node_effects",
]


def load_for_attribution(
    model: str | os.PathLike[str] | None = None,
    saes: str | Path | SAESource | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    *,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    tensor_parallel: bool = False,
) -> tuple[LoadedModel, dict[str, Dictionary]]:
    """Load a model with the LRP rules installed (all off) and its dictionaries: ``(loaded, dicts)``.
    ``device_map`` / ``max_memory`` / ``offload_folder``: split the model over devices
    (:func:`~feature_circuits.model.loading.load_model`); each dictionary then goes on its site's
    device. ``tensor_parallel``: shard the weights over the torchrun job's ranks (the dictionaries
    are replicated on every rank)."""
    from feature_circuits.dictionaries.marks import load_dictionaries
    from feature_circuits.model.loading import load_model

    loaded = load_model(
        model,
        device=device,
        dtype=dtype,
        before_wrap=install_lrp,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        tensor_parallel=tensor_parallel,
    )
    dicts = load_dictionaries(loaded.sites, saes, device=loaded.device, dtype=loaded.dtype, model=loaded)
    return loaded, dicts


def node_effects(
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batch: Batch,
    method: Method | str,
    *,
    metric: Metric | None = None,
    options: MethodOptions | None = None,
    counterfactual: bool = True,
    sites: Sequence[str] | None = None,
    feature_path: str = "auto",
) -> NodeEffects:
    """Node effects (b, s, F+1) per site of one batch, error node last, by ``method``.

    ``metric(logits (b,s,V), batch) -> (b,)``: default :func:`~feature_circuits.metrics.logit_diff`,
    or :func:`~feature_circuits.metrics.answer_logit` when ``counterfactual=False`` (zero-ablation
    mode: the patch state is zero features and zero error). ``options``: the method's options
    dataclass (:class:`ExactOptions`, :class:`AtpOptions`, :class:`RelPOptions`, :class:`IGOptions`;
    default its defaults). ``sites``: restrict to these site names. ``feature_path``: ``auto``
    (sparse for large dictionaries, :func:`~feature_circuits.attribution.forward.use_sparse`),
    ``dense`` or ``sparse`` (on the sparse path ``effects`` are sparse COO tensors and the states
    :class:`SparseSiteState`; ``NodeEffects.dense()`` converts); exact is always dense.
    """
    spec = method_spec(method)
    if metric is None:
        metric = logit_diff if counterfactual else answer_logit
    req = NodeRequest(
        loaded=loaded,
        dictionaries=dictionaries,
        batch=batch,
        metric=metric,
        counterfactual=counterfactual,
        sites=None if sites is None else tuple(sites),
        feature_path=feature_path,
    )
    return spec.node_effects(req, spec.check_options(options))
