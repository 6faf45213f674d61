"""How much memory a discovery run needs, and the largest batch that fits (``--batch-size auto``).

    est = estimate_memory(loaded, dicts, batch_size=16, seq_len=12, edges=True)
    print(est.describe())                    # "memory estimate: model 0.27 GiB, SAEs 2.3 GiB, ..."
    b = choose_batch_size(loaded, dicts, seq_len=12, edges=True, limit=num_examples)

The estimate has three parts (bytes; ``e`` is the element size of the compute dtype, ``b`` the batch,
``s`` the sequence length, ``F`` a site's features, of which ``F_a`` are stored when the sparse feature
path keeps only the active ones, ``d`` its width):

* **model**: the parameters and buffers of the HF model, as allocated;
* **SAEs**: the parameters of every dictionary (``2 F d + F + d`` when a dictionary has no
  ``parameters()``);
* **per batch**, which grows linearly with ``b``:

  - SAE states, per site: clean, patch, delta, gradient and effect tensors, ``5 b s (F_a + d) e``,
    plus what autograd keeps of the dense encoder pass for the backward (the pre-activation and the
    features, ``2 b s F e``);
  - model activations autograd keeps, per layer: ``b s (12 d + 2 d_mlp) e`` plus the attention
    probabilities ``2 b h s^2 e``; and the logits with their gradient, ``2 b s V e``;
  - edges (when computed): a second graph of the same size held while the batched vector-Jacobian
    products run, and their cotangents, ``2 b s F e`` per site.

On the sparse feature path (``sparse=True``; docs/algorithms.md, "Sparse feature path") the
states are the active slots only, ``b s F_a (4 e + 16)`` per site (four value arrays and the int64
row and feature of each slot) plus ``5 b s d e`` of d-wide errors and gradients; the encoder runs
without autograd over row chunks, so instead of ``2 b s F e`` per site there is one transient of at
most the chunk budget (``min(2 b s F, budget) (2 e + 1)``, for the largest site), which does not
grow with ``b``; and the edges' cotangents are d wide (``64 b s d e`` per site for a chunk of 64
VJP rows). ``F_a`` is not known before a run: :func:`probe_active_features` measures it on a few
prompts (twice the mean number of active features per token: the clean and the patch input's).

It is an upper-bound style estimate (every term the dense path can hold at once), checked against
the tensors one batch really allocates in ``tests/test_memory.py``; docs/methods.md compares it with
measured peaks. :func:`available_bytes` is what the device has free now: CUDA
``torch.cuda.mem_get_info``; CPU ``MemAvailable`` of ``/proc/meminfo`` (``psutil`` when installed).
:func:`choose_batch_size` keeps a safety margin (default: use at most 70% of it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.model import LoadedModel

__all__ = [
    "MemoryEstimate",
    "available_bytes",
    "choose_batch_size",
    "estimate_memory",
    "probe_active_features",
]

GIB = 2**30
#: Fraction of the free memory ``--batch-size auto`` plans to use.
DEFAULT_MARGIN = 0.7


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one discovery run (see the module docstring for each term)."""

    model_bytes: int
    sae_bytes: int
    per_batch_bytes: int
    batch_size: int
    seq_len: int
    sae_state_bytes: int  # the SAE-state part of ``per_batch_bytes``
    activation_bytes: int  # the model-activation part
    edge_bytes: int  # the edge part
    #: the part of ``per_batch_bytes`` that does not grow with the batch (the sparse path's encoder chunk)
    transient_bytes: int = 0
    #: features per token the sparse path is assumed to store (None: the dense path)
    active_features: int | None = None

    @property
    def fixed_bytes(self) -> int:
        return self.model_bytes + self.sae_bytes

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.per_batch_bytes

    def describe(self) -> str:
        g = GIB
        return (
            f"memory estimate: model {self.model_bytes / g:.2f} GiB, SAEs {self.sae_bytes / g:.2f} GiB, "
            f"per batch of {self.batch_size} x {self.seq_len} tokens {self.per_batch_bytes / g:.2f} GiB "
            f"(SAE states {self.sae_state_bytes / g:.2f}, model activations "
            f"{self.activation_bytes / g:.2f}, edges {self.edge_bytes / g:.2f}); "
            f"total {self.total_bytes / g:.2f} GiB"
            + (
                ""
                if self.active_features is None
                else f" (sparse feature path, {self.active_features} stored features per site and token)"
            )
        )


def _module_bytes(module: Any) -> int | None:
    params = getattr(module, "parameters", None)
    if params is None:
        return None
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = getattr(module, "buffers", None)
    if buffers is not None:
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return int(total)


def _config_int(config: Any, *names: str, default: int) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def estimate_memory(
    loaded: LoadedModel,
    dicts: Mapping[str, Dictionary],
    *,
    batch_size: int,
    seq_len: int,
    edges: bool = True,
    active_features: int | None = None,
    sparse: bool = False,
) -> MemoryEstimate:
    """The memory of a run of ``loaded`` with ``dicts`` on batches of ``batch_size`` x ``seq_len``
    tokens (``active_features``: features stored per site and token by the sparse path; None: all).
    ``sparse``: the sparse feature path's terms (see the module docstring)."""
    import torch

    from feature_circuits.attribution.forward import encode_budget

    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    e = torch.empty((), dtype=loaded.dtype).element_size()
    cfg = loaded.hf_model.config
    d = loaded.d_model
    d_mlp = _config_int(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * d)
    heads = _config_int(cfg, "num_attention_heads", "n_head", default=max(1, d // 64))
    vocab = _config_int(cfg, "vocab_size", default=1)
    model_bytes = _module_bytes(loaded.hf_model) or 0
    sae_bytes = 0
    bs = batch_size * seq_len
    state = graph = transient = cot = 0
    budget = encode_budget(torch.device(loaded.device))
    for site in loaded.all_sites:
        ae = dicts.get(site.name)
        if ae is None:
            continue
        f_all = int(ae.dict_size)
        d_site = int(ae.activation_dim)
        own = _module_bytes(ae)
        sae_bytes += own if own is not None else (2 * f_all * d_site + f_all + d_site) * e
        f_kept = f_all if active_features is None else min(f_all, int(active_features))
        if sparse:
            state += bs * f_kept * (4 * e + 16) + 5 * bs * d_site * e
            transient = max(transient, min(2 * bs * f_all, budget) * (2 * e + 1))
            cot += 64 * bs * d_site * e
        else:
            state += 5 * bs * (f_kept + d_site) * e
            graph += 2 * bs * f_all * e
    n_layers = loaded.n_layers
    acts = n_layers * (bs * (12 * d + 2 * d_mlp) + 2 * batch_size * heads * seq_len * seq_len) * e
    acts += 2 * bs * vocab * e
    sae_state = state + graph + transient
    edge = (acts + graph + cot) if edges else 0
    return MemoryEstimate(
        model_bytes=model_bytes,
        sae_bytes=sae_bytes,
        per_batch_bytes=sae_state + acts + edge,
        batch_size=batch_size,
        seq_len=seq_len,
        sae_state_bytes=sae_state,
        activation_bytes=acts,
        edge_bytes=edge,
        transient_bytes=transient,
        active_features=active_features if sparse else None,
    )


def probe_active_features(loaded: LoadedModel, dicts: Mapping[str, Dictionary], *ids: torch.Tensor) -> int:
    """Features the sparse path will store per site and token, measured on the prompts ``ids``
    (each (b, s), e.g. a batch's clean and patch ids): twice the largest (over the sites) mean
    number of non-zero features per token -- the path keeps the union of the clean and the patch
    input's -- at most the dictionary size."""
    import torch

    from feature_circuits.attribution.forward import attribution_sites, collect_activations

    sites = attribution_sites(loaded, dicts)
    counts: dict[str, list[float]] = {s.name: [0.0, 0.0] for s in sites}  # active, tokens
    with torch.no_grad():
        for x_ids in ids:
            acts, _ = collect_activations(loaded, x_ids, sites)
            for s in sites:
                n = (dicts[s.name].encode(acts.pop(s.name)) != 0).sum(-1)
                counts[s.name][0] += float(n.sum())
                counts[s.name][1] += n.numel()
    worst = 0
    for s in sites:
        active, tokens = counts[s.name]
        mean = active / max(tokens, 1.0)
        worst = max(worst, min(int(dicts[s.name].dict_size), math.ceil(2 * mean)))
    return worst


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes(device: torch.device | str) -> int:
    """Memory free for a run on ``device`` now: CUDA free memory (``torch.cuda.mem_get_info``); on
    the CPU ``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable``
    of /proc/meminfo, else the physical memory."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    avail = _meminfo_available()
    if avail is not None:
        return avail
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_batch_size(
    loaded: LoadedModel,
    dicts: Mapping[str, Dictionary],
    *,
    seq_len: int,
    edges: bool = True,
    limit: int | None = None,
    free_bytes: int | None = None,
    margin: float = DEFAULT_MARGIN,
    active_features: int | None = None,
    sparse: bool = False,
) -> int:
    """The largest batch size whose estimated per-batch memory fits in ``margin`` of the memory free
    on the model's device (``free_bytes`` overrides what is measured; the model and the SAEs are
    already loaded, so they are counted in what is no longer free). At least 1, at most ``limit``
    (the number of examples) when given."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    free = available_bytes(loaded.device) if free_bytes is None else int(free_bytes)
    budget = margin * free
    one = estimate_memory(
        loaded,
        dicts,
        batch_size=1,
        seq_len=seq_len,
        edges=edges,
        active_features=active_features,
        sparse=sparse,
    )
    # per-batch memory is linear in b (attention included) past the sparse path's bounded encoder
    # chunk: b = (budget - chunk) // per-example bytes (a slight underestimate of b: the chunk of
    # one example may be below the budget)
    per_example = max(1, one.per_batch_bytes - one.transient_bytes)
    b = int(max(0.0, budget - one.transient_bytes) // per_example)
    if limit is not None:
        b = min(b, int(limit))
    return max(1, b)
