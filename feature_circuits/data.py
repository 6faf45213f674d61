"""Contrastive prompt datasets (docs/algorithms.md, "Datasets"): loading, validation, tokenization
(once per pair) and batching.

A dataset is a JSON Lines file, one example per line::

    {"clean_prefix": "The keys", "patch_prefix": "The key", "clean_answer": " are",
     "patch_answer": " is", "case": "simple"}

``case`` is optional; other extra keys are allowed and ignored. Every example is validated against
the tokenizer of the model it will be run on, because the attribution metric reads the logits of the
answer tokens at the last prefix position:

* each answer must be exactly one token where it stands, after the prefix:
  ``tokens(prefix + answer) == tokens(prefix) + [answer token]`` after both prefixes (otherwise a
  merge across the boundary, or a missing leading space, means the metric would read the wrong
  token); it must not be the unknown token, and the two answers must differ (tokens are taken with
  ``add_special_tokens=False``);
* the clean and patch prefixes must have the same number of tokens (position-aligned patching and
  aggregation compare position ``t`` of the clean run with position ``t`` of the patch run).

Every error is a :class:`DatasetError` whose message starts with ``path:line:`` (1-based line).

Each pair is tokenized once: :func:`load_pairs` validates it with the tokenizer and keeps the token
ids on the pair (:attr:`Pair.tokens`, a :class:`TokenizedPair` that remembers which tokenizer made
it); :func:`make_batches` reuses them and tokenizes only pairs without tokens from that tokenizer.

Each file is tokenized in batched tokenizer calls (a fast tokenizer encodes a list far quicker than
one text per call). Two readings go beyond the file's letter, both reported in
:attr:`PairList.report`: answers without a leading space after a prefix that does not end in one
(the Marks et al. files) are read as ``" " + answer`` when only that reading is valid; and a shipped
task file that is not valid as it is for the tokenizer (a BPE model) is replaced by the same task
built for that tokenizer (:mod:`feature_circuits.tasks`; docs/algorithms.md, "Tasks for any
tokenizer").

Blank lines: trailing blank lines at the end of the file are ignored (an editor's final newline, or
several); a blank line *between* examples is reported as an error, since it usually means a line was
lost or a file was concatenated badly.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from feature_circuits.errors import DatasetError, DatasetNotFoundError, UnknownDatasetError
from feature_circuits.toy import DATA_DIR

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedTokenizerBase

    from feature_circuits.tasks import TaskBuild

__all__ = [
    "Batch",
    "DatasetError",
    "Pair",
    "PairList",
    "TokenizedPair",
    "UnknownDatasetError",
    "as_hf_dataset",
    "available_datasets",
    "load_pairs",
    "make_batches",
    "resolve_dataset",
    "token_ids",
    "tokenize_pair",
    "tokenize_pairs",
    "tokenizer_key",
    "unknown_token_id",
]

REQUIRED_KEYS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
OPTIONAL_KEYS = ("case",)
SPLITS = ("train", "test")


@dataclass(frozen=True, kw_only=True)
class TokenizedPair:
    """Token ids of a validated :class:`Pair`, and which tokenizer produced them (``tokenizer``:
    :func:`tokenizer_key`)."""

    clean: tuple[int, ...]
    patch: tuple[int, ...]
    clean_answer: int
    patch_answer: int
    tokenizer: str = ""

    def __post_init__(self) -> None:
        if len(self.clean) != len(self.patch) or not self.clean:
            raise ValueError(
                f"TokenizedPair: clean and patch need the same, non-zero length "
                f"({len(self.clean)} vs {len(self.patch)})"
            )


@dataclass(frozen=True, kw_only=True)
class Pair:
    """One contrastive example. ``source``/``line`` say where it came from (for error messages);
    ``tokens`` are its token ids once validated against a tokenizer (not part of equality)."""

    clean_prefix: str
    patch_prefix: str
    clean_answer: str
    patch_answer: str
    case: str | None = None
    source: str = "<memory>"
    line: int = 0
    tokens: TokenizedPair | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def tokens_for(self, tokenizer: PreTrainedTokenizerBase, key: str | None = None) -> TokenizedPair:
        """The token ids of this pair under ``tokenizer``: the stored ones if that tokenizer made
        them, else a fresh :func:`tokenize_pair`. ``key``: :func:`tokenizer_key` of ``tokenizer``,
        when the caller has it already."""
        key = tokenizer_key(tokenizer) if key is None else key
        if self.tokens is not None and self.tokens.tokenizer == key:
            return self.tokens
        return tokenize_pair(self, tokenizer, key=key)


def tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    """What identifies a tokenizer for reusing token ids: its name or path, its size and a digest
    of its vocabulary (computed once per :func:`load_pairs` / :func:`make_batches` call)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    digest = hashlib.sha1(vocab.encode("utf-8")).hexdigest()[:16]
    return f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{digest}"


# --------------------------------------------------------------------------------------------------
# Tokenization checks


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (how every prefix and answer is tokenized)."""
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in out]


def unknown_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The unknown-token id, unless it doubles as BOS/EOS/PAD (GPT-NeoX uses <|endoftext|> for all)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    shared = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return None if unk in shared else int(unk)


_ids = token_ids
_unk_id = unknown_token_id


def _tok_str(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return repr(tokenizer.convert_ids_to_tokens(list(ids)))


class _Encoder:
    """:func:`token_ids` with a cache that :meth:`prime` fills with one batched tokenizer call (a
    fast tokenizer encodes a list far quicker than the same texts one call each)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def prime(self, texts: Iterable[str]) -> None:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            out = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            self.cache.update((t, [int(i) for i in ids]) for t, ids in zip(missing, out, strict=True))

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = token_ids(self.tokenizer, text)
        return self.cache[text]


def _pair_texts(pair: Pair) -> list[str]:
    """Every text :func:`tokenize_pair` encodes for ``pair`` (and for its leading-space reading)."""
    prefixes = (pair.clean_prefix, pair.patch_prefix)
    answers = {pair.clean_answer, pair.patch_answer}
    answers |= {" " + a for a in answers if not a[:1].isspace()}
    return [*prefixes, *(p + a for p in prefixes for a in answers)]


def tokenize_pair(
    pair: Pair,
    tokenizer: PreTrainedTokenizerBase,
    *,
    key: str | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> TokenizedPair:
    """Tokenize and validate one pair; raises :class:`DatasetError` naming ``pair.source:pair.line``.
    ``key``: :func:`tokenizer_key` of ``tokenizer`` if the caller has it (recorded on the result);
    ``encode``: a :func:`token_ids` of ``tokenizer`` to use (e.g. a cached one)."""

    def fail(problem: str) -> DatasetError:
        return DatasetError(pair.source, pair.line, problem)

    def _ids(_tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        return token_ids(tokenizer, text) if encode is None else encode(text)

    unk = _unk_id(tokenizer)
    prefixes: dict[str, list[int]] = {}
    for which in ("clean", "patch"):
        text = getattr(pair, f"{which}_prefix")
        ids = _ids(tokenizer, text)
        if not ids:
            raise fail(f"{which}_prefix {text!r} tokenizes to no tokens")
        if unk is not None and unk in ids:
            raise fail(f"{which}_prefix {text!r} contains the unknown token: {_tok_str(tokenizer, ids)}")
        prefixes[which] = ids
    if len(prefixes["clean"]) != len(prefixes["patch"]):
        raise fail(
            "clean and patch prefixes have different token lengths "
            f"({len(prefixes['clean'])} vs {len(prefixes['patch'])}): "
            f"{_tok_str(tokenizer, prefixes['clean'])} vs {_tok_str(tokenizer, prefixes['patch'])}; "
            "position-aligned patching needs equal lengths"
        )
    answers: dict[str, int] = {}
    for which in ("clean", "patch"):
        answer = getattr(pair, f"{which}_answer")
        # The metric reads the answer logit after the prefix: the answer token is what the tokenizer
        # produces after this very prefix (so a tokenizer that adds a word-initial marker to a text's
        # start, such as SentencePiece's dummy prefix, is read in context), after both prefixes.
        found: int | None = None
        for pwhich in ("clean", "patch"):
            head = prefixes[pwhich]
            joined = _ids(tokenizer, getattr(pair, f"{pwhich}_prefix") + answer)
            if joined[: len(head)] != head:
                raise fail(
                    f"{which}_answer {answer!r} does not tokenize as a separate token after the "
                    f"{pwhich}_prefix: tokens(prefix + answer) = {_tok_str(tokenizer, joined)} does not "
                    f"start with tokens(prefix) = {_tok_str(tokenizer, head)}"
                )
            rest = joined[len(head) :]
            if len(rest) != 1:
                raise fail(
                    f"{which}_answer {answer!r} is {len(rest)} tokens {_tok_str(tokenizer, rest)} after the "
                    f"{pwhich}_prefix, expected exactly one (did you forget or add a leading space?)"
                )
            if found is not None and rest[0] != found:
                raise fail(
                    f"{which}_answer {answer!r} is a different token after the clean and the patch prefix"
                )
            found = rest[0]
        assert found is not None
        if unk is not None and found == unk:
            raise fail(f"{which}_answer {answer!r} is the unknown token")
        answers[which] = found
    if answers["clean"] == answers["patch"]:
        raise fail(
            f"clean_answer {pair.clean_answer!r} and patch_answer {pair.patch_answer!r} are the same "
            "token; the logit-difference metric would be identically zero"
        )
    return TokenizedPair(
        clean=tuple(prefixes["clean"]),
        patch=tuple(prefixes["patch"]),
        clean_answer=answers["clean"],
        patch_answer=answers["patch"],
        tokenizer=tokenizer_key(tokenizer) if key is None else key,
    )


def tokenize_pairs(
    pairs: Sequence[Pair], tokenizer: PreTrainedTokenizerBase, *, key: str | None = None
) -> list[TokenizedPair | DatasetError]:
    """:func:`tokenize_pair` of every pair, all their texts encoded in one batched tokenizer call;
    each item is the pair's tokens, or the :class:`DatasetError` that pair raises."""
    key = tokenizer_key(tokenizer) if key is None else key
    encode = _Encoder(tokenizer)
    encode.prime(t for p in pairs for t in _pair_texts(p))
    out: list[TokenizedPair | DatasetError] = []
    for pair in pairs:
        try:
            out.append(tokenize_pair(pair, tokenizer, key=key, encode=encode))
        except DatasetError as err:
            out.append(err)
    return out


# --------------------------------------------------------------------------------------------------
# Loading


def _no_duplicate_keys(items: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in items:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _parse_line(path: Path, lineno: int, raw: bytes) -> Pair:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(path, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DatasetError(path, lineno, "blank line between examples")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # duplicate key
        raise DatasetError(path, lineno, f"invalid JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise DatasetError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise DatasetError(
            path, lineno, f"missing key(s) {', '.join(missing)} (required: {', '.join(REQUIRED_KEYS)})"
        )
    for key in REQUIRED_KEYS:
        if not isinstance(obj[key], str):
            raise DatasetError(path, lineno, f"{key} must be a string, got {type(obj[key]).__name__}")
    case = obj.get("case")
    if case is not None and not isinstance(case, str):
        raise DatasetError(path, lineno, f"case must be a string or null, got {type(case).__name__}")
    for key in ("clean_prefix", "patch_prefix"):
        if not obj[key].strip():
            raise DatasetError(path, lineno, f"{key} is empty")
    for key in ("clean_answer", "patch_answer"):
        if not obj[key]:
            raise DatasetError(path, lineno, f"{key} is empty")
    return Pair(
        clean_prefix=obj["clean_prefix"],
        patch_prefix=obj["patch_prefix"],
        clean_answer=obj["clean_answer"],
        patch_answer=obj["patch_answer"],
        case=case,
        source=str(path),
        line=lineno,
    )


def _content_lines(path: Path) -> list[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every line up to the last non-blank one."""
    lines = path.read_bytes().split(b"\n")
    numbered = [(i + 1, line.rstrip(b"\r")) for i, line in enumerate(lines)]
    while numbered and not numbered[-1][1].strip():
        numbered.pop()
    return numbered


class PairList(list[Pair]):
    """The pairs :func:`load_pairs` returns (a plain list of :class:`Pair`), with ``report``: a line
    for the run's log when the loader did more than read the file (a shipped task built for another
    tokenizer, answers read with a leading space), else None; ``build``: the
    :class:`~feature_circuits.tasks.TaskBuild` when the pairs were built for the tokenizer."""

    report: str | None = None
    build: TaskBuild | None = None


def _without_leading_space(pair: Pair) -> Pair | None:
    """The pair with a leading space added to every answer that has none, when that is how the
    answer follows its prefix in the sentence (the Marks et al. files write ``"clean_answer": "is"``
    after ``"The keys"``); None when no answer changes."""
    if any(p[-1:].isspace() for p in (pair.clean_prefix, pair.patch_prefix)):
        return None
    clean, patch = pair.clean_answer, pair.patch_answer
    new_clean = clean if clean[:1].isspace() else " " + clean
    new_patch = patch if patch[:1].isspace() else " " + patch
    if (new_clean, new_patch) == (clean, patch):
        return None
    return replace(pair, clean_answer=new_clean, patch_answer=new_patch)


def _tokenized(
    pair: Pair, tokenizer: PreTrainedTokenizerBase, key: str, encode: _Encoder
) -> tuple[Pair, bool]:
    """The pair with its tokens, and whether its answers were read with a leading space (only when
    they fail as written and pass that way; the original error otherwise)."""
    try:
        return replace(pair, tokens=tokenize_pair(pair, tokenizer, key=key, encode=encode)), False
    except DatasetError:
        spaced = _without_leading_space(pair)
        if spaced is None:
            raise
        try:
            return replace(spaced, tokens=tokenize_pair(spaced, tokenizer, key=key, encode=encode)), True
        except DatasetError:
            pass
        raise


#: Lines whose texts one batched tokenizer call encodes.
_PRIME_LINES = 512


def _load(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    skip_invalid: bool,
    limit: int | None,
    build: bool = True,
) -> PairList:
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset file not found: {path}")
    lines = _content_lines(path)
    if not lines:
        raise DatasetError(path, 1, "dataset file is empty (no examples)")
    from feature_circuits.tasks import shipped_task

    # a shipped task file is checked whole: used as it is when every line is valid for this
    # tokenizer (the embedded one), else the task is built for the tokenizer (feature_circuits.tasks)
    shipped = None if tokenizer is None or not build else shipped_task(path)
    pairs: list[Pair] = []
    skipped: list[DatasetError] = []
    respaced = 0
    key = "" if tokenizer is None else tokenizer_key(tokenizer)
    encode = None if tokenizer is None else _Encoder(tokenizer)
    parsed: dict[int, Pair | DatasetError] = {}
    for index, (lineno, _raw) in enumerate(lines):
        if index % _PRIME_LINES == 0:  # parse the next chunk, encode its texts in one call
            for ln, rw in lines[index : index + _PRIME_LINES]:
                try:
                    parsed[ln] = _parse_line(path, ln, rw)
                except DatasetError as err:
                    parsed[ln] = err
            if encode is not None:
                chunk = [parsed[ln] for ln, _ in lines[index : index + _PRIME_LINES]]
                encode.prime(t for p in chunk if isinstance(p, Pair) for t in _pair_texts(p))
        try:
            pair = parsed.pop(lineno)
            if isinstance(pair, DatasetError):
                raise pair
            if tokenizer is not None and encode is not None:
                pair, added_space = _tokenized(pair, tokenizer, key, encode)
                respaced += added_space
        except DatasetError as err:
            if not skip_invalid and shipped is None:
                raise
            skipped.append(err)
            continue
        pairs.append(pair)
        if shipped is None and limit is not None and len(pairs) >= limit:
            break
    if shipped is not None and tokenizer is not None:
        if skipped:
            return _built(shipped, tokenizer, limit, valid=len(pairs), total=len(lines))
        pairs = pairs[:limit]
    if skipped:
        listing = "\n".join(f"  {err}" for err in skipped)
        warnings.warn(
            f"{path}: skipped {len(skipped)} invalid line(s), kept {len(pairs)}:\n{listing}",
            stacklevel=3,
        )
    if not pairs:
        raise DatasetError(path, lines[-1][0], f"no valid examples (all {len(skipped)} lines were invalid)")
    out = PairList(pairs)
    if respaced:
        out.report = (
            f"{path}: {respaced} of {len(pairs)} examples have answers without a leading space (the Marks "
            "et al. files' format); read as ' ' + answer, the token that follows the prefix in the sentence"
        )
    return out


def _built(
    shipped: tuple[str, str], tokenizer: PreTrainedTokenizerBase, limit: int | None, *, valid: int, total: int
) -> PairList:
    from feature_circuits.tasks import build_task

    task, split = shipped
    build = build_task(task, split, tokenizer, limit, shipped_valid=valid, shipped_total=total)
    out = PairList(build.pairs)
    out.report, out.build = build.summary(), build
    return out


def load_pairs(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> PairList:
    """Load and validate a JSON Lines dataset of contrastive pairs (docs/algorithms.md, "Datasets");
    each returned pair carries its token ids (:attr:`Pair.tokens`).

    Raises :class:`DatasetError` (``path:line: problem``) on the first invalid line, or, with
    ``skip_invalid=True``, skips invalid lines and emits one :class:`UserWarning` listing each skipped
    ``path:line: reason`` and their count. ``limit`` keeps the first ``limit`` valid examples (lines
    after that are not read). A file with no examples is an error either way.

    Answers written without a leading space after a prefix that does not end in one (the Marks et
    al. files: ``"clean_answer": "is"``) are read as ``" " + answer`` when only that reading is
    valid. A shipped task file (:func:`resolve_dataset` of ``sva_rc``, ``ioi``, ...) is used as it is
    when all its lines are valid for ``tokenizer``; otherwise the task is built for ``tokenizer``
    from the templates (:func:`feature_circuits.tasks.build_task`, ``limit`` pairs or as many as the
    shipped split has). Either is said in the result's :attr:`PairList.report`.
    """
    return _load(path, tokenizer, skip_invalid=skip_invalid, limit=limit)


# --------------------------------------------------------------------------------------------------
# Dataset names


def available_datasets(data_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Shipped dataset names mapped to their available splits (from ``<name>_<split>.jsonl`` files)."""
    data_dir = Path(DATA_DIR if data_dir is None else data_dir)
    found: dict[str, list[str]] = {}
    for split in SPLITS:
        for f in sorted(data_dir.glob(f"*_{split}.jsonl")):
            found.setdefault(f.name[: -len(f"_{split}.jsonl")], []).append(split)
    return dict(sorted(found.items()))


def resolve_dataset(
    name_or_path: str | Path, split: str = "train", *, data_dir: str | Path | None = None
) -> Path:
    """Turn a dataset name or a path into the path of a ``.jsonl`` file.

    An existing file is used as is (``split`` is then ignored). Otherwise ``name_or_path`` is taken as
    a shipped dataset name (e.g. ``sva_rc``) and maps to ``DATA_DIR / f"{name}_{split}.jsonl"``.
    Unknown names raise :class:`UnknownDatasetError` listing the available names and splits.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    name = str(name_or_path)
    looks_like_path = candidate.suffix in (".jsonl", ".json") or "/" in name or "\\" in name
    if looks_like_path:
        raise DatasetNotFoundError(f"dataset file not found: {candidate}")
    data_dir = Path(DATA_DIR if data_dir is None else data_dir)
    target = data_dir / f"{name}_{split}.jsonl"
    if target.is_file():
        return target
    available = available_datasets(data_dir)
    listing = ", ".join(f"{n} ({'/'.join(s)})" for n, s in available.items()) or "none"
    if name in available:
        raise UnknownDatasetError(
            f"dataset {name!r} has no {split!r} split in {data_dir} (available splits: "
            f"{', '.join(available[name])})"
        )
    raise UnknownDatasetError(
        f"unknown dataset {name!r}: not an existing file and not a shipped dataset in {data_dir}; "
        f"available: {listing}"
    )


# --------------------------------------------------------------------------------------------------
# Batching


@dataclass(frozen=True, eq=False)
class Batch:
    """Equal-length examples: ``clean``/``patch`` are ``(b, s)`` token ids, answers are ``(b,)``;
    ``pairs`` the examples, one per row."""

    clean: Tensor
    patch: Tensor
    clean_answer: Tensor
    patch_answer: Tensor
    pairs: tuple[Pair, ...]

    def __post_init__(self) -> None:
        b = self.clean.shape[0]
        if self.clean.dim() != 2 or self.patch.shape != self.clean.shape:
            raise ValueError(
                f"Batch: clean and patch must be (b, s) of one shape, got {tuple(self.clean.shape)} "
                f"and {tuple(self.patch.shape)}"
            )
        if tuple(self.clean_answer.shape) != (b,) or tuple(self.patch_answer.shape) != (b,):
            raise ValueError(
                f"Batch: answers must be ({b},), got {tuple(self.clean_answer.shape)} and "
                f"{tuple(self.patch_answer.shape)}"
            )
        if self.pairs and len(self.pairs) != b:
            raise ValueError(f"Batch: {len(self.pairs)} pairs for {b} rows")

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def select(self, idx: Tensor) -> Batch:
        """Rows ``idx`` of this batch, in that order (repeats allowed): a batch of ``len(idx)`` rows
        whose pairs follow the rows (none if this batch has none)."""
        rows = idx.reshape(-1).to(device="cpu", dtype=torch.long)
        pairs = tuple(self.pairs[i] for i in rows.tolist()) if self.pairs else ()
        return Batch(
            clean=self.clean[rows.to(self.clean.device)],
            patch=self.patch[rows.to(self.patch.device)],
            clean_answer=self.clean_answer[rows.to(self.clean_answer.device)],
            patch_answer=self.patch_answer[rows.to(self.patch_answer.device)],
            pairs=pairs,
        )

    @classmethod
    def from_tokens(cls, tokens: Sequence[TokenizedPair], pairs: Sequence[Pair] = ()) -> Batch:
        """A batch of pre-tokenized examples (all of one length)."""
        return cls(
            clean=torch.tensor([t.clean for t in tokens], dtype=torch.long),
            patch=torch.tensor([t.patch for t in tokens], dtype=torch.long),
            clean_answer=torch.tensor([t.clean_answer for t in tokens], dtype=torch.long),
            patch_answer=torch.tensor([t.patch_answer for t in tokens], dtype=torch.long),
            pairs=tuple(pairs),
        )


def make_batches(pairs: Iterable[Pair], tokenizer: PreTrainedTokenizerBase, batch_size: int) -> list[Batch]:
    """Group pairs into unpadded batches of equal token length.

    No padding is ever used: with rotary position embeddings left padding shifts every position and
    right padding moves the answer position, and position-aligned aggregation (docs/algorithms.md,
    "Aggregation and the circuit graph") sums effects at the same position across examples, which is
    only meaningful when every example in a batch has its tokens at the same positions. So each batch
    holds examples of a single length.

    Token ids come from the pairs (:meth:`Pair.tokens_for`): pairs loaded by :func:`load_pairs`
    with this tokenizer are not tokenized again.

    Order is deterministic: batches are sorted by length (ascending), and within a length examples
    keep their original order; each batch has at most ``batch_size`` examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    by_len: dict[int, list[tuple[Pair, TokenizedPair]]] = {}
    key = tokenizer_key(tokenizer)
    for pair in pairs:
        tok = pair.tokens_for(tokenizer, key)
        by_len.setdefault(len(tok.clean), []).append((pair, tok))
    batches: list[Batch] = []
    for length in sorted(by_len):
        group = by_len[length]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            batches.append(Batch.from_tokens([t for _, t in chunk], [p for p, _ in chunk]))
    return batches


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets


def as_hf_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> datasets.Dataset:
    """Validate ``path`` (schema always; token checks too when ``tokenizer`` is given) and load it as a
    :class:`datasets.Dataset` with ``datasets.load_dataset("json", ...)``."""
    import datasets

    path = Path(path)
    _load(path, tokenizer, skip_invalid=False, limit=None, build=False)
    return datasets.load_dataset("json", data_files=str(path), split="train")
