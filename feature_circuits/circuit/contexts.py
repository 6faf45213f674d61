"""Where each circuit node fires (docs/algorithms.md, "Feature contexts"): its mean activation on
the clean and on the patch inputs, and its top activating token contexts over the discovery prompts
and an optional ``--contexts`` file of extra text.

One batched pass: per batch one plain forward (clean and patch rows together, every dictionary of a
circuit site encoding), of which only the circuit's features (and the norm of each error node) are
gathered; a running ``torch.topk`` merge keeps each node's ``top_k`` strongest (sequence, position)
per source, so no activation is stored beyond the batch. Contexts are built at the end from the
token ids of the winning sequences: a window of up to ``before`` tokens before and ``after`` after
the firing token, each token decoded on its own, as raw text (escaping is the page's job).

Choices:

* a context is a place where the node *fires*: only activations > 0 are kept (a feature that never
  fires has no contexts; for identity dictionaries a negative neuron value does not count);
* each discovery prompt (clean or patch prefix) is counted once for the contexts, however many
  pairs share it (the means count every example);
* up to ``top_k`` contexts per source (``discovery``, ``contexts``), stored together strongest first;
* under ``--aggregation none`` a node is a feature at one position: its contexts are those of the
  feature at any position (the same for each position's node), its means are taken at its position;
  under ``sum`` the means are over every example and position;
* ``--contexts`` text: plain text (one document per line) or, for ``.jsonl``/``.json``, JSON Lines
  with a ``"text"`` string; blank lines are skipped; a document is cut into pieces of at most
  :data:`MAX_DOC_TOKENS` tokens (fewer when the model's positions are fewer), run right-padded in
  batches of similar length (a piece's real positions are unchanged by padding in a causal model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from feature_circuits.circuit.schema import Circuit, Context, Node, NodeActivation
from feature_circuits.errors import DatasetError, DatasetNotFoundError
from feature_circuits.progress import progress
from feature_circuits.types import Aggregation

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from feature_circuits.data import Batch
    from feature_circuits.dictionaries import Dictionary
    from feature_circuits.model import LoadedModel

__all__ = [
    "DEFAULT_AFTER",
    "DEFAULT_BEFORE",
    "DEFAULT_TOP_K",
    "MAX_DOC_TOKENS",
    "read_contexts_file",
    "record_activations",
]

DEFAULT_TOP_K = 8
DEFAULT_BEFORE = 8
DEFAULT_AFTER = 4
#: Longest piece of a ``--contexts`` document run in one forward (tokens).
MAX_DOC_TOKENS = 128
SOURCES = ("discovery", "contexts")
_POS_STRIDE = 1 << 24  # a location is sequence * _POS_STRIDE + position


# --------------------------------------------------------------------------------------------------
# The --contexts file


def read_contexts_file(path: str | Path) -> list[str]:
    """The documents of a ``--contexts`` file: one per non-blank line; for ``.jsonl``/``.json`` each
    line is a JSON object with a ``"text"`` string. Errors are :class:`DatasetError`
    (``path:line: problem``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"--contexts: file not found: {path}")
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    docs: list[str] = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise DatasetError(path, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            continue
        if not jsonl:
            docs.append(text)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(
                path, lineno, f'expected a JSON object with a "text" key, got {type(obj).__name__}'
            )
        if "text" not in obj:
            raise DatasetError(
                path, lineno, f'missing key "text" (keys: {", ".join(map(str, obj)) or "none"})'
            )
        if not isinstance(obj["text"], str):
            raise DatasetError(path, lineno, f'"text" must be a string, got {type(obj["text"]).__name__}')
        if obj["text"].strip():
            docs.append(obj["text"])
    if not docs:
        raise DatasetError(path, 1, "no documents (the file is empty or blank)")
    return docs


# --------------------------------------------------------------------------------------------------
# Which activations to gather


@dataclass
class _SiteUnits:
    """The circuit's nodes of one site as columns ("units"): each distinct feature, then the error
    node if the circuit has it; the running top-k of every unit per source; the sums for the means."""

    features: list[int]
    has_error: bool
    top_k: int
    vals: dict[str, Tensor] = field(default_factory=dict)  # source -> (U, k)
    locs: dict[str, Tensor] = field(default_factory=dict)  # source -> (U, k) sequence*stride+pos
    sums: dict[str, Tensor] = field(default_factory=dict)  # side -> (U,) or (s, U)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.features) + int(self.has_error)

    def unit_of(self, node: Node) -> int:
        return len(self.features) if node.feature is None else self.features.index(node.feature)

    def gather(self, f: Tensor, err: Tensor) -> Tensor:
        """(rows, s, U): the circuit's features of this site, then the error norm."""
        cols = []
        if self.features:
            idx = torch.tensor(self.features, device=f.device, dtype=torch.long)
            cols.append(f.index_select(-1, idx).float())
        if self.has_error:
            cols.append(err.float().flatten(2).norm(dim=-1, keepdim=True))
        return torch.cat(cols, dim=-1)

    def add_means(self, side: str, acts: Tensor, by_position: bool) -> None:
        total = acts.sum(0) if by_position else acts.sum((0, 1))
        self.sums[side] = total if side not in self.sums else self.sums[side] + total
        self.counts[side] = self.counts.get(side, 0) + (
            acts.shape[0] if by_position else acts.shape[0] * acts.shape[1]
        )

    def merge_top(self, source: str, acts: Tensor, seq_ids: Tensor, valid: Tensor) -> None:
        """Merge ``acts`` (rows, s, U) into the running top-k of ``source``; ``seq_ids`` (rows,) are
        the rows' sequence numbers, ``valid`` (rows, s) the positions that may be a context."""
        rows, s, units = acts.shape
        masked = acts.masked_fill(~(valid.unsqueeze(-1) & (acts > 0)), float("-inf"))
        cand = masked.reshape(rows * s, units).T  # (U, rows*s)
        pos = torch.arange(s, device=acts.device).expand(rows, s)
        loc = (seq_ids.to(acts.device).unsqueeze(1) * _POS_STRIDE + pos).reshape(-1)
        cand_loc = loc.unsqueeze(0).expand(units, -1)
        if source in self.vals:
            cand = torch.cat([self.vals[source], cand], dim=1)
            cand_loc = torch.cat([self.locs[source], cand_loc], dim=1)
        k = min(self.top_k, cand.shape[1])
        vals, idx = torch.topk(cand, k, dim=1)
        self.vals[source], self.locs[source] = vals, cand_loc.gather(1, idx)

    def to(self, device: torch.device | str) -> _SiteUnits:
        """The same tallies with every tensor on ``device``."""
        return _SiteUnits(
            list(self.features),
            self.has_error,
            self.top_k,
            {k: v.to(device) for k, v in self.vals.items()},
            {k: v.to(device) for k, v in self.locs.items()},
            {k: v.to(device) for k, v in self.sums.items()},
            dict(self.counts),
        )

    def merge(self, other: _SiteUnits, seq_map: Tensor) -> None:
        """Add ``other``'s sums and counts and merge its top-k into this one's; ``seq_map[i]`` is
        this tally's sequence number of ``other``'s sequence ``i``. A context found by both (the
        same sequence and position) is kept once."""
        for side, total in other.sums.items():
            self.sums[side] = total if side not in self.sums else self.sums[side] + total
            self.counts[side] = self.counts.get(side, 0) + other.counts[side]
        for source, vals in other.vals.items():
            loc = other.locs[source]
            seq, pos = loc.div(_POS_STRIDE, rounding_mode="floor"), loc.remainder(_POS_STRIDE)
            locs = seq_map.to(seq.device)[seq] * _POS_STRIDE + pos
            if source in self.vals:
                vals = torch.cat([self.vals[source], vals], dim=1)
                locs = torch.cat([self.locs[source], locs], dim=1)
            # drop repeated locations (the later copy), then the top k again
            sorted_locs, order = locs.sort(dim=1, stable=True)
            dup = torch.zeros_like(locs, dtype=torch.bool)
            dup.scatter_(1, order[:, 1:], sorted_locs[:, 1:] == sorted_locs[:, :-1])
            vals = vals.masked_fill(dup, float("-inf"))
            k = min(self.top_k, vals.shape[1])
            top, idx = torch.topk(vals, k, dim=1)
            self.vals[source], self.locs[source] = top, locs.gather(1, idx)


@dataclass
class ContextTally:
    """Everything the contexts pass accumulates (per site its :class:`_SiteUnits`, and the token
    ids of every candidate sequence), mergeable across data-parallel ranks (:meth:`merge`, used
    through :meth:`feature_circuits.distributed.DataParallel.merge`)."""

    units: dict[str, _SiteUnits]
    sequences: list[tuple[int, ...]]

    def cpu(self) -> ContextTally:
        return ContextTally({k: u.to("cpu") for k, u in self.units.items()}, list(self.sequences))

    def merge(self, other: ContextTally) -> None:
        """Add ``other`` (another rank's tally of the same circuit, on the same device) into this one:
        its sequences are renumbered (a sequence both saw is one sequence), sums add up, top-k lists merge."""
        index: dict[tuple[int, ...], int] = {}
        for i, seq in enumerate(self.sequences):
            index.setdefault(seq, i)
        seq_map = []
        for seq in other.sequences:
            if seq not in index:
                index[seq] = len(self.sequences)
                self.sequences.append(seq)
            seq_map.append(index[seq])
        remap = torch.tensor(seq_map, dtype=torch.long)
        for name, u in self.units.items():
            u.merge(other.units[name], remap)


# --------------------------------------------------------------------------------------------------
# The pass


def _max_tokens(loaded: LoadedModel) -> int:
    limits = [MAX_DOC_TOKENS]
    positions = getattr(loaded.hf_model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def _doc_pieces(
    tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], max_tokens: int
) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    encoded = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    for ids in encoded:
        ids = [int(i) for i in ids]
        out += [tuple(ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens)]
    return out


#: Tokens per discovery row that a forward of ``--contexts`` pieces may use (with ``2 * batch_size``
#: rows): short documents share a forward, long ones get fewer rows.
_TOKENS_PER_ROW = 32


def _pack(pieces: list[tuple[int, ...]], budget: int) -> list[list[tuple[int, ...]]]:
    """Pieces grouped into forwards of at most ``budget`` padded tokens (rows x longest piece),
    shortest first so that a forward pads little; every piece is in exactly one group."""
    order = sorted((p for p in pieces if p), key=len)
    groups: list[list[tuple[int, ...]]] = []
    for piece in order:
        if groups and (len(groups[-1]) + 1) * len(piece) <= budget:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    return groups


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def record_activations(
    circuit: Circuit,
    loaded: LoadedModel,
    dictionaries: Mapping[str, Dictionary],
    batches: Sequence[Batch],
    *,
    top_k: int = DEFAULT_TOP_K,
    before: int = DEFAULT_BEFORE,
    after: int = DEFAULT_AFTER,
    contexts: str | Path | None = None,
    batch_size: int = 16,
    enabled: bool = True,
    shard: Callable[[list[list[tuple[int, ...]]]], list[list[tuple[int, ...]]]] | None = None,
    merge: Callable[[ContextTally], ContextTally] | None = None,
) -> Circuit:
    """``circuit`` with every node's :class:`NodeActivation` (mean activation on the clean and the
    patch rows of ``batches``, top ``top_k`` contexts per source over the discovery prompts and the
    ``contexts`` file), and ``timing_s["contexts"]``; see the module docstring. ``top_k=0`` (or a
    circuit without nodes) returns ``circuit`` unchanged. ``batch_size``: the discovery batch size
    (a forward of the ``contexts`` file runs up to ``2 * batch_size * 32`` padded tokens of document
    pieces, shortest first); ``enabled``: the progress bar. Data parallel: ``batches`` are this
    rank's shard, ``shard`` picks this rank's share of the ``contexts`` file's chunks, and ``merge``
    combines every rank's :class:`ContextTally` (``DataParallel.shard`` / ``.merge``), so every rank
    returns the contexts of all the data."""
    if top_k < 0 or before < 0 or after < 0:
        raise ValueError(f"top_k, before and after must be >= 0, got {top_k}, {before}, {after}")
    if top_k == 0 or not circuit.nodes:
        return circuit
    t0 = time.perf_counter()
    from feature_circuits.attribution.forward import collect_activations
    from feature_circuits.dictionaries import encode_with_error

    docs = read_contexts_file(contexts) if contexts is not None else []
    units: dict[str, _SiteUnits] = {}
    for node in circuit.nodes:
        if node.site not in dictionaries:
            continue
        u = units.setdefault(node.site, _SiteUnits([], False, top_k))
        if node.feature is None:
            u.has_error = True
        elif node.feature not in u.features:
            u.features.append(node.feature)
    if not units:
        return circuit
    sites = [s for s in loaded.all_sites if s.name in units]
    by_position = circuit.aggregation is Aggregation.NONE
    sequences: list[tuple[int, ...]] = []
    seen: dict[tuple[int, ...], int] = {}

    @torch.no_grad()
    def run(ids: Tensor) -> dict[str, Tensor]:
        # one site's dense (rows, s, F) features at a time, reduced at once to the circuit's units
        acts, _ = collect_activations(loaded, ids, sites)
        out = {}
        for name, u in units.items():
            f, err = encode_with_error(dictionaries[name], acts.pop(name))
            out[name] = u.gather(f, err)
            del f, err
        return out

    for batch in progress(batches, desc="feature contexts", unit="batch", enabled=enabled):
        b = len(batch)
        acts = run(torch.cat([batch.clean, batch.patch]))
        rows = [tuple(int(i) for i in r) for r in torch.cat([batch.clean, batch.patch]).tolist()]
        fresh = []
        for r in rows:  # each distinct prompt is a context candidate once
            fresh.append(r not in seen)
            if r not in seen:
                seen[r] = len(sequences)
                sequences.append(r)
        seq_ids = torch.tensor([seen[r] for r in rows], dtype=torch.long)
        valid = torch.tensor(fresh, dtype=torch.bool).unsqueeze(1).expand(len(rows), batch.seq_len)
        for name, u in units.items():
            a = acts[name]
            u.add_means("clean", a[:b], by_position)
            u.add_means("patch", a[b:], by_position)
            u.merge_top("discovery", a, seq_ids, valid.to(a.device))

    if docs:
        pieces = _doc_pieces(loaded.tokenizer, docs, _max_tokens(loaded))
        pad = _pad_id(loaded.tokenizer)
        chunks = _pack(pieces, budget=2 * batch_size * _TOKENS_PER_ROW)
        if shard is not None:
            chunks = shard(chunks)
        for chunk in progress(chunks, desc="feature contexts (--contexts)", unit="batch", enabled=enabled):
            chunk = [p for p in chunk if p]
            if not chunk:
                continue
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            valid = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, p in enumerate(chunk):  # right padding: a causal model's real positions are unchanged
                ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
                valid[i, : len(p)] = True
            seq_ids = torch.arange(len(sequences), len(sequences) + len(chunk), dtype=torch.long)
            sequences.extend(chunk)
            acts = run(ids)
            for name, u in units.items():
                u.merge_top("contexts", acts[name], seq_ids, valid.to(acts[name].device))

    if merge is not None:
        tally = merge(ContextTally(units, sequences).cpu())
        units, sequences = tally.units, tally.sequences
    decode = _Decoder(loaded.tokenizer)
    nodes = []
    for node in circuit.nodes:
        u = units.get(node.site)
        if u is None:
            nodes.append(node)
            continue
        j = u.unit_of(node)
        means = {}
        for side in ("clean", "patch"):
            total = u.sums[side]
            if by_position:
                pos = node.position if node.position is not None else 0
                value = float(total[pos, j]) / u.counts[side] if pos < total.shape[0] else 0.0
            else:
                value = float(total[j]) / u.counts[side]
            means[side] = value
        found: list[Context] = []
        for source in SOURCES:
            if source not in u.vals:
                continue
            for v, loc in zip(u.vals[source][j].tolist(), u.locs[source][j].tolist(), strict=True):
                if v == float("-inf"):
                    continue
                seq, pos = divmod(int(loc), _POS_STRIDE)
                ids = sequences[seq]
                start = max(0, pos - before)
                window = ids[start : pos + after + 1]
                found.append(Context(tokens=decode(window), index=pos - start, activation=v, source=source))
        found.sort(key=lambda c: -c.activation)
        activation = NodeActivation(
            mean_clean=means["clean"], mean_patch=means["patch"], contexts=tuple(found)
        )
        nodes.append(node.model_copy(update={"activation": activation}))
    timing = {**circuit.timing_s, "contexts": round(time.perf_counter() - t0, 4)}
    return circuit.model_copy(update={"nodes": tuple(nodes), "timing_s": timing})


class _Decoder:
    """Each token id decoded on its own (cached)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> tuple[str, ...]:
        out = []
        for i in ids:
            if i not in self.cache:
                self.cache[i] = str(self.tokenizer.decode([int(i)]))
            out.append(self.cache[i])
        return tuple(out)
