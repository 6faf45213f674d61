"""Resumable forwards: exact patching that runs only what a patch can change (docs/algorithms.md,
"Resuming from the patched site").

A patch at one position ``p`` of a site in layer ``L`` cannot change anything before that site, nor
(the model is causal) any position before ``p``. So a patched forward starts from the clean run's
state: the input of layer ``L`` (of layer ``L + 1`` for ``resid_L``, of layer 0 for ``embed``) at
positions ``>= p``, with the clean keys and values of positions ``< p`` as a key/value cache in
every later layer. The HF modules of the model do the work (each decoder layer, the rotary module,
the final norm and the unembedding): the runner only supplies the cache, the positions and the
causal (or sliding-window) mask, so GPT-NeoX's parallel residual, Gemma's post-norms, soft-capping
and sliding windows come from the model's own code. The site's value is replaced by a forward hook
on the site's module (a pre-hook for sites that read a module's input, ``attn_z_L``), so every site
kind patches exactly what a full nnsight re-run patches.

    runner = resumable(loaded)                   # None: unknown architecture -> full re-runs
    clean = runner.clean(ids)                    # hidden states, keys/values and logits per layer
    logits = runner.patched_logits(clean, site, rows, positions, vectors)

``rows``/``positions``/``vectors``: one patch per row, ``x_site[rows[i], positions[i]] += vectors[i]``
(rows index the clean batch; several patches of one site share one forward). The rows are packed:
each runs only its own positions from the patched one on, as consecutive tokens of one flat
sequence, so the token-wise work (projections, MLPs, norms) is done once per token that can change;
the attention scatters the packed queries back to full rows against the clean keys and values.

A runner is built only for a model whose resumed forward reproduces its own full forward on a probe
input (:func:`resumable` checks, once per model); otherwise callers fall back to full re-runs.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from feature_circuits.errors import UnsupportedModelError
from feature_circuits.model.sites import get_submodule
from feature_circuits.types import Site, SiteKind

__all__ = [
    "CleanRun",
    "ResumableForward",
    "reads_last_position_only",
    "resumable",
]

#: Attention implementations the runner resumes (it builds their masks).
_MASKED_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class _Packing:
    """The layout of a packed resumed forward: row ``i`` of the chunk contributes its positions
    ``keep[i]`` (those from its own patched position on) as consecutive tokens of one flat
    sequence (1, T, d), row-major; ``prefix[l]`` are the clean keys and values of those rows
    (n, kv_heads, s, head_dim) in layer ``l``, into which the new ones are scattered."""

    keep: Tensor
    prefix: dict[int, tuple[Tensor, Tensor]]


#: The packing of the resumed forward running now (None: the clean run, unpacked).
_PACKING: contextvars.ContextVar[_Packing | None] = contextvars.ContextVar("_PACKING", default=None)


def _resumed_attention(
    impl: str, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs
):
    """The model's own attention function (``impl``: sdpa, or the model's eager one). In a packed
    resumed forward (:class:`_Packing`) the flat queries (1, heads, T, head_dim) are scattered back
    to full rows (n, heads, s, head_dim), zeros at the positions a row does not run, so the
    attention runs with the full forward's mask and kernel against keys and values of full length
    (:class:`_PrefixCache` returns them), and the rows of the tokens run are returned, packed again.
    Each output row depends on its own query only; the zero queries' outputs are dropped."""
    if impl == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as inner
    else:
        inner = sys.modules[type(module).__module__].eager_attention_forward
    packing = _PACKING.get()
    if packing is None:
        return inner(module, query, key, value, *args, **kwargs)
    keep = packing.keep
    n, seq = keep.shape
    q = query.new_zeros(n, seq, query.shape[1], query.shape[3])
    q[keep] = query[0].transpose(0, 1)
    out, _weights = inner(module, q.transpose(1, 2), key, value, *args, **kwargs)
    return out[keep].unsqueeze(0), None


#: The attention implementation a resumed forward switches the model's config to, per original one.
_RESUMED = {impl: f"feature_circuits_resumed_{impl}" for impl in _MASKED_IMPLEMENTATIONS}


def _register_resumed_attention() -> None:
    from transformers import AttentionInterface

    for impl, name in _RESUMED.items():
        AttentionInterface.register(name, functools.partial(_resumed_attention, impl))


class _PrefixCache:
    """A key/value cache in the duck type HF attention modules call (``update``). In a packed
    resumed forward (:class:`_Packing`) the new keys and values (1, kv_heads, T, head_dim) are
    scattered into the clean ones of the chunk's rows, which are returned at full length; with
    ``record`` (the clean run) the new ones are kept and returned as they are."""

    def __init__(self, packing: _Packing | None = None, record: bool = False):
        self.packing = packing
        self.record = record
        self.new: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[Tensor, Tensor]:
        if self.record:
            self.new[layer_idx] = (key_states, value_states)
        if self.packing is None:
            return key_states, value_states
        keep = self.packing.keep
        full = []
        for clean, new in zip(self.packing.prefix[layer_idx], (key_states, value_states), strict=True):
            t = clean.transpose(1, 2).clone()  # (n, s, kv_heads, head_dim)
            t[keep] = new[0].transpose(0, 1).to(t.dtype)
            full.append(t.transpose(1, 2))
        return full[0], full[1]


@dataclass(frozen=True, kw_only=True)
class CleanRun:
    """The clean run of a batch ``ids`` (b, s): ``hidden[l]`` is the input of layer ``l`` (b, s, d),
    ``hidden[n_layers]`` the last layer's output; ``keys[l]`` / ``values[l]`` the attention cache of
    layer ``l`` (b, kv_heads, s, head_dim); ``logits`` (b, s, V)."""

    ids: Tensor
    hidden: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    logits: Tensor

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])


class ResumableForward:
    """Runs a causal LM layer by layer from any layer and position, on its own HF modules (see the
    module docstring). :class:`~feature_circuits.errors.UnsupportedModelError` when the model's
    layout is not one it knows (embedding, ``layers``, rotary module, final norm, unembedding) or its
    attention implementation takes no explicit mask."""

    def __init__(self, model: nn.Module):
        if model.training:
            raise UnsupportedModelError("resumable forward: the model is in training mode (dropout)")
        config: Any = model.config
        base: Any = getattr(model, "gpt_neox", None) or getattr(model, "model", None)
        if base is None or not hasattr(base, "layers"):
            raise UnsupportedModelError(f"resumable forward: {type(model).__name__} has no decoder layers")
        self.model = model
        self.config: Any = config
        self.base_path = "gpt_neox" if hasattr(model, "gpt_neox") else "model"
        self.layers: Sequence[nn.Module] = list(base.layers)
        hf: Any = model
        self.embed: nn.Module = hf.get_input_embeddings()
        self.emb_dropout: nn.Module | None = getattr(base, "emb_dropout", None)
        norm = getattr(base, "final_layer_norm", None) or getattr(base, "norm", None)
        head = hf.get_output_embeddings()
        rotary = getattr(base, "rotary_emb", None)
        if norm is None or head is None or rotary is None:
            raise UnsupportedModelError(
                f"resumable forward: {type(model).__name__} lacks a final norm, unembedding or rotary module"
            )
        self.norm: nn.Module = norm
        self.head: nn.Module = head
        self.rotary: Any = rotary
        self.rotary_by_type = "layer_type" in inspect.signature(rotary.forward).parameters
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in _MASKED_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"resumable forward: attention implementation {impl!r} (known: {_MASKED_IMPLEMENTATIONS})"
            )
        self.attn_impl = impl
        _register_resumed_attention()
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("resumable forward: bidirectional attention is not causal")
        n = len(self.layers)
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if types is None:
            types = ["sliding_attention" if window is not None else "full_attention"] * n
        if len(types) < n or any(t not in ("full_attention", "sliding_attention") for t in types[:n]):
            raise UnsupportedModelError(f"resumable forward: unknown layer types {sorted(set(types))}")
        self.layer_types: list[str] = list(types[:n])
        self.sliding_window: int | None = None if window is None else int(window)
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_kw = "layer_past" if "layer_past" in params else "past_key_values"
        self._module_index = {id(m): i for i, m in enumerate(self.layers)}

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------------------ building blocks

    def _mask(self, seq: int, window: int | None, like: Tensor) -> Tensor | None:
        """The full (seq x seq) mask the model's own forward builds for an unpadded input: None
        for sdpa without a window (its causal kernel), else boolean (sdpa) or additive (eager)."""
        if self.attn_impl == "sdpa" and window is None:
            return None
        q = torch.arange(seq, device=like.device).view(-1, 1)
        k = torch.arange(seq, device=like.device).view(1, -1)
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        allowed = allowed.view(1, 1, seq, seq)
        if self.attn_impl == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.where(allowed, zero, torch.finfo(like.dtype).min)

    def _run(
        self, h: Tensor, start: int, position_ids: Tensor, seq: int, cache: _PrefixCache
    ) -> list[Tensor]:
        """Layers ``start ..`` on ``h`` (tokens at ``position_ids`` (1, q) of inputs of length
        ``seq``; packed when ``cache.packing``); the input of every layer run and the last output
        (``n_layers - start + 1`` tensors)."""
        out = [h]
        if start >= self.n_layers:
            return out
        kinds = sorted(set(self.layer_types[start:]))
        if self.rotary_by_type:
            pos_emb = {t: self.rotary(h, position_ids, t) for t in kinds}
        else:
            shared = self.rotary(h, position_ids)
            pos_emb = dict.fromkeys(kinds, shared)
        masks = {
            t: self._mask(seq, self.sliding_window if t == "sliding_attention" else None, h) for t in kinds
        }
        self.config._attn_implementation = _RESUMED[self.attn_impl]
        token = _PACKING.set(cache.packing)
        try:
            for li in range(start, self.n_layers):
                t = self.layer_types[li]
                h = self.layers[li](
                    h,
                    attention_mask=masks[t],
                    position_ids=position_ids,
                    position_embeddings=pos_emb[t],
                    **{self.cache_kw: cache},
                )
                if isinstance(h, tuple):  # older layer implementations
                    h = h[0]
                out.append(h)
        finally:
            _PACKING.reset(token)
            self.config._attn_implementation = self.attn_impl
        return out

    def _logits(self, h: Tensor) -> Tensor:
        logits = self.head(self.norm(h))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _embed(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        if self.emb_dropout is not None:
            h = self.emb_dropout(h)
        return h

    # ------------------------------------------------------------------------------------- public

    @torch.no_grad()
    def clean(self, ids: Tensor) -> CleanRun:
        """The clean run of ``ids`` (b, s): every layer's input, keys/values and the logits."""
        seq = int(ids.shape[1])
        cache = _PrefixCache(record=True)
        positions = torch.arange(seq, device=ids.device).view(1, -1)
        hidden = self._run(self._embed(ids), 0, positions, seq, cache)
        if len(cache.new) != self.n_layers:
            raise UnsupportedModelError(
                f"resumable forward: {len(cache.new)} of {self.n_layers} layers used the key/value cache"
            )
        keys = [cache.new[i][0] for i in range(self.n_layers)]
        values = [cache.new[i][1] for i in range(self.n_layers)]
        return CleanRun(ids=ids, hidden=hidden, keys=keys, values=values, logits=self._logits(hidden[-1]))

    def start_layer(self, site: Site) -> int:
        """The first layer a patch of ``site`` has to run: 0 for ``embed``, ``L + 1`` for
        ``resid_L``, ``L`` for the sites inside layer ``L``."""
        if site.kind is SiteKind.EMBED:
            return 0
        if site.kind is SiteKind.RESID:
            return site.layer + 1
        return site.layer

    @torch.no_grad()
    def patched_logits(
        self,
        clean: CleanRun,
        site: Site,
        rows: Tensor,
        positions: Tensor,
        vectors: Tensor,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """Logits of the clean input of ``clean.ids[rows]`` with ``vectors[i]`` added to the site's
        activation at ``positions[i]`` in row ``i``: (n, s, V), or (n, 1, V) -- the last position --
        with ``last_only``. Equal (to float rounding) to a full re-run with the same patch."""
        seq = clean.seq_len
        dev = clean.hidden[0].device
        rows = rows.to(dev)
        positions = positions.to(dev)
        start = self.start_layer(site)
        # packed layout: row i runs its positions >= positions[i], as consecutive tokens
        keep = torch.arange(seq, device=dev).view(1, -1) >= positions.view(-1, 1)  # (n, s)
        lengths = seq - positions
        first = torch.cumsum(lengths, 0) - lengths  # the patched token of each row
        n_tokens = int(lengths.sum())
        add = torch.zeros(1, n_tokens, vectors.shape[-1], dtype=vectors.dtype, device=dev)
        add[0, first] = vectors.to(dev)
        h = clean.hidden[start][rows][keep].unsqueeze(0)
        if site.kind in (SiteKind.EMBED, SiteKind.RESID):
            h = h + add.to(h.dtype)
            handle = None
        else:
            handle = self._patch_hook(site, add)
        prefix = {li: (clean.keys[li][rows], clean.values[li][rows]) for li in range(start, self.n_layers)}
        cache = _PrefixCache(_Packing(keep=keep, prefix=prefix))
        position_ids = keep.nonzero()[:, 1].view(1, -1)
        try:
            out = self._run(h, start, position_ids, seq, cache)[-1][0]  # (T, d)
        finally:
            if handle is not None:
                handle.remove()
        if last_only:
            return self._logits(out[first + lengths - 1]).unsqueeze(1)
        logits = clean.logits[rows].clone()
        logits[keep] = self._logits(out).to(logits.dtype)
        return logits

    def _patch_hook(self, site: Site, add: Tensor) -> torch.utils.hooks.RemovableHandle:
        module = get_submodule(self.model, site.module_path)
        if not any(module is m or _contains(m, module) for m in self.layers[site.layer : site.layer + 1]):
            raise UnsupportedModelError(
                f"resumable forward: site {site.name} ({site.module_path}) is not in layer {site.layer}"
            )
        if site.reads_input:

            def pre_hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (args[0] + add.to(args[0].dtype), *args[1:])

            return module.register_forward_pre_hook(pre_hook)

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
            if site.output_is_tuple:
                return (out[0] + add.to(out[0].dtype), *out[1:])
            return out + add.to(out.dtype)

        return module.register_forward_hook(hook)


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def reads_last_position_only(metric: Callable[..., Tensor], logits: Tensor, answers: Any) -> bool:
    """Whether ``metric`` gives the same values on the last position's logits alone (b, 1, V) as on
    all of them (b, s, V), for these clean logits: then a patched forward needs only the last
    position's unembedding. Any error on the short logits means no."""
    if logits.shape[1] == 1:
        return True
    try:
        short = metric(logits[:, -1:], answers)
    except (IndexError, RuntimeError, ValueError):
        return False
    return bool(torch.equal(short, metric(logits, answers)))


#: Attribute of an HF model that holds its runner (or the reason it has none).
_ATTR = "_feature_circuits_resumable"


def _self_check(runner: ResumableForward) -> str | None:
    """A reason the runner does not reproduce the model, or None: a probe input run in full by the
    model, cleanly by the runner, and resumed from layer 0 with a zero patch, one row from position 1
    and one from halfway along (a packed forward of two lengths)."""
    model = runner.model
    param = next(model.parameters())
    vocab = int(getattr(runner.config, "vocab_size", 2))
    seq = 6
    if runner.sliding_window is not None:
        seq = max(seq, min(runner.sliding_window + 3, 64))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 1), (2, seq), generator=gen).to(param.device)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        clean = runner.clean(ids)
        embed_site = Site(kind=SiteKind.EMBED, layer=-1, d_model=int(clean.hidden[0].shape[-1]))
        half = torch.tensor([1, seq // 2], device=param.device)
        resumed = runner.patched_logits(
            clean,
            embed_site,
            torch.arange(2),
            half,
            torch.zeros(2, embed_site.d_model, dtype=clean.hidden[0].dtype),
        )
    scale = float(want.abs().max()) + 1.0
    tol = scale * (1e-9 if want.dtype == torch.float64 else 1e-4 if want.dtype == torch.float32 else 3e-2)
    for what, got in (("clean", clean.logits), ("resumed", resumed)):
        err = float((got - want).abs().max())
        if not err <= tol:
            return f"the {what} run differs from the model's forward by {err:.3g} (tolerance {tol:.3g})"
    return None


def resumable(loaded: Any) -> ResumableForward | None:
    """The resumable runner of a :class:`~feature_circuits.model.loading.LoadedModel` (or an HF
    model), or None -- with a warning, once per model -- when the model is not one it can run or
    its resumed forward does not reproduce the model's own (the caller then re-runs in full)."""
    model: nn.Module = getattr(loaded, "hf_model", loaded)
    got = model.__dict__.get(_ATTR)
    if got is None:
        try:
            runner = ResumableForward(model)
            reason = _self_check(runner)
        except UnsupportedModelError as err:
            runner, reason = None, str(err)
        except (RuntimeError, TypeError, ValueError, AttributeError) as err:
            runner, reason = None, f"resumable forward failed on a probe ({type(err).__name__}: {err})"
        if reason is not None or runner is None:
            warnings.warn(
                f"exact patching re-runs the whole model for every patch: {reason}",
                RuntimeWarning,
                stacklevel=2,
            )
            got = reason or "unsupported"
        else:
            got = runner
        model.__dict__[_ATTR] = got
    return got if isinstance(got, ResumableForward) else None
