"""The shipped tasks built for any tokenizer (docs/algorithms.md, "Tasks for any tokenizer").

The shipped files (``sva_simple``, ``sva_nounpp``, ``sva_within_rc``, ``sva_rc``, ``ioi``; ``train``
and ``test`` splits) are the embedded word-level tokenizer's rendering of the project's templates
(:mod:`feature_circuits.toy.grammar`). A BPE tokenizer (Pythia, Llama, Gemma) splits some of their
words into several tokens, so an answer is no longer one token or the clean and patch prefixes no
longer have equal lengths. :func:`build_task` makes the same task for that tokenizer instead:

1. **Word filter.** Every word list a template draws from is checked with the leading space the
   word has in the sentence (``" is"``, ``" Mary"``, tokenized after a word): answer words
   (agreeing verbs, IOI names) must be one token; a noun's singular and plural must have the same
   number of tokens (the varied noun is the only clean/patch difference of an SVA prefix); every
   other word (prepositions, relative-clause verbs of ``sva_rc``, places, objects) must contain no
   unknown token. Dropped words are reported.
2. **The same seeded sampler and hold-out rule** as the shipped files, over the kept words only
   (:func:`feature_circuits.toy.grammar.generate_sva_pairs` / ``generate_ioi_pairs``, seed 0 by
   default): train and test come from disjoint combinations exactly as in the shipped files.
3. **Pair check.** Each candidate is validated with :func:`feature_circuits.data.tokenize_pair`
   (single-token answers that follow the prefix as separate tokens, equal clean/patch lengths); the
   ones that fail are dropped and counted.

IOI text uses natural punctuation (``"Then, Mary and John went to the store. Mary gave a ring to"``)
unless the tokenizer cannot read it (a whitespace-split word-level vocabulary), where the shipped
spacing (``"Then , Mary ..."``) is kept. :func:`feature_circuits.data.load_pairs` uses the shipped
file itself whenever every line of it is valid for the tokenizer (the embedded model always), and
:func:`build_task` otherwise; the :class:`TaskBuild` it returns says what was kept
(:meth:`TaskBuild.summary`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from feature_circuits.data import Pair, token_ids, tokenize_pairs, tokenizer_key, unknown_token_id
from feature_circuits.errors import DatasetError, FeatureCircuitsError
from feature_circuits.toy import DATA_DIR, grammar

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TASKS",
    "TaskBuild",
    "TaskBuildError",
    "WordCheck",
    "build_task",
    "lexicon_for",
    "natural_punctuation",
    "shipped_size",
    "shipped_task",
]

#: Shipped task name -> its template: an SVA structure of :mod:`~feature_circuits.toy.grammar`, or "ioi".
TASKS: dict[str, str] = {**{name: s for s, name in grammar.DATASET_NAMES.items()}, "ioi": "ioi"}
_SPLITS = ("train", "test")
#: How many dropped words a summary names per word list.
_MAX_NAMED = 5


class TaskBuildError(FeatureCircuitsError, ValueError):
    """The tokenizer cannot express a task: too few usable words, or no valid pair."""


@dataclass(frozen=True)
class WordCheck:
    """One word list of a task under a tokenizer: the words kept and the dropped ones with why."""

    role: str
    kept: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        total = len(self.kept) + len(self.dropped)
        text = f"{self.role} {len(self.kept)}/{total}"
        if self.dropped:
            named = ", ".join(f"{w} ({why})" for w, why in self.dropped[:_MAX_NAMED])
            more = f", +{len(self.dropped) - _MAX_NAMED} more" if len(self.dropped) > _MAX_NAMED else ""
            text += f" (dropped: {named}{more})"
        return text


@dataclass(frozen=True, kw_only=True)
class TaskBuild:
    """The pairs of one task and split built for one tokenizer, and what the filters dropped.

    ``candidates``: distinct candidate pairs the sampler drew from the kept words; ``rejected``: how
    many of them failed the pair check (``first_problem`` the first reason); ``shipped_valid`` /
    ``shipped_total``: how many lines of the shipped file are valid for this tokenizer as they are
    (None when not checked)."""

    task: str
    split: str
    seed: int
    tokenizer: str
    requested: int
    pairs: tuple[Pair, ...]
    words: tuple[WordCheck, ...]
    candidates: int
    rejected: int
    first_problem: str | None
    punctuation: str
    shipped_valid: int | None = None
    shipped_total: int | None = None

    def summary(self) -> str:
        """One paragraph for the run's log: pairs built, words kept per list, pairs that survived."""
        head = (
            f"{self.task}/{self.split}: built {len(self.pairs)} of {self.requested} pairs for tokenizer "
            f"{self.tokenizer!r} from the templates (seed {self.seed}, {self.punctuation} punctuation)"
        )
        if self.shipped_total is not None:
            head += (
                f"; the shipped file has {self.shipped_valid} of {self.shipped_total} lines valid for "
                "this tokenizer"
            )
        words = "; ".join(w.describe() for w in self.words)
        survived = self.candidates - self.rejected
        checked = f"{survived} of {self.candidates} candidate pairs survived the pair check"
        if self.rejected and self.first_problem:
            checked += f" (first failure: {self.first_problem})"
        return f"{head}. Words kept: {words}. {checked}."


# --------------------------------------------------------------------------------------------------
# Shipped files


def shipped_task(path: str | Path, data_dir: str | Path | None = None) -> tuple[str, str] | None:
    """``(task, split)`` when ``path`` is a shipped dataset file (``DATA_DIR/<task>_<split>.jsonl``),
    else None."""
    path = Path(path)
    root = Path(DATA_DIR if data_dir is None else data_dir)
    try:
        if path.resolve().parent != root.resolve():
            return None
    except OSError:
        return None
    for task in TASKS:
        for split in _SPLITS:
            if path.name == f"{task}_{split}.jsonl":
                return task, split
    return None


def shipped_size(task: str, split: str, data_dir: str | Path | None = None) -> int:
    """Number of examples of the shipped split (what :func:`build_task` builds by default)."""
    path = Path(DATA_DIR if data_dir is None else data_dir) / f"{task}_{split}.jsonl"
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# --------------------------------------------------------------------------------------------------
# Word filter


#: The text a word is tokenized after, as in the templates (every sentence starts with a word).
_CONTEXT = "The"


def _spaced(tokenizer: PreTrainedTokenizerBase, word: str) -> list[int]:
    """The tokens of ``" " + word`` after a word, as in a sentence (a SentencePiece tokenizer marks
    a text's first word, so ``" is"`` alone may be two tokens where ``"The is"`` ends in one)."""
    head = token_ids(tokenizer, _CONTEXT)
    full = token_ids(tokenizer, f"{_CONTEXT} {word}")
    return full[len(head) :] if full[: len(head)] == head else token_ids(tokenizer, " " + word)


def _show(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return "[" + ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(list(ids))) + "]"


def _why_not_known(tokenizer: PreTrainedTokenizerBase, word: str) -> str | None:
    ids = _spaced(tokenizer, word)
    unk = unknown_token_id(tokenizer)
    if not ids:
        return "no tokens"
    if unk is not None and unk in ids:
        return "unknown token"
    return None


def _why_not_single(tokenizer: PreTrainedTokenizerBase, word: str) -> str | None:
    problem = _why_not_known(tokenizer, word)
    if problem:
        return problem
    ids = _spaced(tokenizer, word)
    return None if len(ids) == 1 else f"{len(ids)} tokens {_show(tokenizer, ids)}"


def _check_words(
    tokenizer: PreTrainedTokenizerBase, role: str, words: Sequence[str], single: bool
) -> WordCheck:
    why = _why_not_single if single else _why_not_known
    kept, dropped = [], []
    for w in words:
        problem = why(tokenizer, w)
        if problem is None:
            kept.append(w)
        else:
            dropped.append((w, problem))
    return WordCheck(role, tuple(kept), tuple(dropped))


def _check_number_pairs(
    tokenizer: PreTrainedTokenizerBase, role: str, pairs: Sequence[tuple[str, str]], *, single: bool
) -> WordCheck:
    """(singular, plural) pairs: both single tokens (``single``, answers) or of equal token length."""
    kept, dropped = [], []
    for sg, pl in pairs:
        why = _why_not_single if single else _why_not_known
        problem = why(tokenizer, sg) or why(tokenizer, pl)
        if problem is None and not single:
            a, b = _spaced(tokenizer, sg), _spaced(tokenizer, pl)
            if len(a) != len(b):
                problem = f"{len(a)} vs {len(b)} tokens {_show(tokenizer, a)} vs {_show(tokenizer, b)}"
        if problem is None:
            kept.append(f"{sg}/{pl}")
        else:
            dropped.append((f"{sg}/{pl}", problem))
    return WordCheck(role, tuple(kept), tuple(dropped))


def _kept_pairs(check: WordCheck, pool: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    keep = set(check.kept)
    return tuple(p for p in pool if f"{p[0]}/{p[1]}" in keep)


def _require(check: WordCheck, need: int, task: str) -> None:
    if len(check.kept) < need:
        example = f" (e.g. {check.dropped[0][0]}: {check.dropped[0][1]})" if check.dropped else ""
        raise TaskBuildError(
            f"task {task}: this tokenizer keeps {len(check.kept)} {check.role}, at least {need} needed"
            f"{example}; it cannot express the task's pairs"
        )


def lexicon_for(
    task: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[grammar.Lexicon, tuple[WordCheck, ...]]:
    """The words of ``task``'s templates that ``tokenizer`` can express (see the module docstring),
    and the check of every word list. Raises :class:`TaskBuildError` when too few words are left."""
    if task not in TASKS:
        raise TaskBuildError(f"unknown task {task!r}; shipped tasks: {', '.join(TASKS)}")
    template = TASKS[task]
    lex = grammar.Lexicon()
    if template == "ioi":
        names = _check_words(tokenizer, "names (answers: one token)", grammar.NAMES, single=True)
        places = _check_words(tokenizer, "places", grammar.PLACES, single=False)
        objects = _check_words(tokenizer, "objects", grammar.OBJECTS, single=False)
        _require(names, 2, task)
        _require(places, 1, task)
        _require(objects, 1, task)
        checks = (names, places, objects)
        lexicon = grammar.Lexicon(
            nouns=lex.nouns,
            agree_verbs=lex.agree_verbs,
            rc_verbs=lex.rc_verbs,
            prepositions=lex.prepositions,
            names=names.kept,
            places=places.kept,
            objects=objects.kept,
        )
        return lexicon, checks
    nouns = _check_number_pairs(
        tokenizer, "nouns (singular/plural of equal length)", grammar.NOUNS, single=False
    )
    _require(nouns, 1 if template == "simple" else 2, task)
    checks_list = [nouns]
    agree, rc, preps = lex.agree_verbs, lex.rc_verbs, lex.prepositions
    if template in ("simple", "nounpp", "rc"):
        verbs = _check_number_pairs(tokenizer, "verbs (answers: one token)", grammar.AGREE_VERBS, single=True)
        _require(verbs, 1, task)
        checks_list.append(verbs)
        agree = _kept_pairs(verbs, grammar.AGREE_VERBS)
    if template in ("within_rc", "rc"):
        answers = template == "within_rc"
        role = "relative-clause verbs (answers: one token)" if answers else "relative-clause verbs"
        rcv = _check_number_pairs(tokenizer, role, grammar.RC_VERBS, single=answers)
        _require(rcv, 1, task)
        checks_list.append(rcv)
        rc = _kept_pairs(rcv, grammar.RC_VERBS)
    if template == "nounpp":
        prep_check = _check_words(tokenizer, "prepositions", grammar.PREPOSITIONS, single=False)
        _require(prep_check, 1, task)
        checks_list.append(prep_check)
        preps = prep_check.kept
    lexicon = grammar.Lexicon(
        nouns=_kept_pairs(nouns, grammar.NOUNS),
        agree_verbs=agree,
        rc_verbs=rc,
        prepositions=preps,
        names=lex.names,
        places=lex.places,
        objects=lex.objects,
    )
    return lexicon, tuple(checks_list)


# --------------------------------------------------------------------------------------------------
# Building


_SPACED_PUNCT = re.compile(r" ([,.;:!?])")


def natural_punctuation(text: str) -> str:
    """``"Then , Mary went to the store . Mary"`` -> ``"Then, Mary went to the store. Mary"``."""
    return _SPACED_PUNCT.sub(r"\1", text)


def _reads_natural_punctuation(tokenizer: PreTrainedTokenizerBase) -> bool:
    """False for a tokenizer that has no token for punctuation glued to a word (whitespace-split
    word-level vocabularies such as the embedded one)."""
    unk = unknown_token_id(tokenizer)
    return unk is None or unk not in token_ids(tokenizer, "Then, Mary went to the store. Mary")


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def build_task(
    task: str,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    n: int | None = None,
    *,
    seed: int = 0,
    shipped_valid: int | None = None,
    shipped_total: int | None = None,
) -> TaskBuild:
    """``n`` pairs (default: as many as the shipped split has) of shipped ``task`` and ``split``
    (``train``/``test``) for ``tokenizer``: word filter, the shipped files' seeded sampler and hold-out
    rule over the kept words, and the pair check (module docstring). Each pair carries its token
    ids. Fewer than ``n`` only when the kept words admit fewer distinct combinations; none at all
    raises :class:`TaskBuildError`. ``shipped_valid``/``shipped_total`` are recorded for the summary."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    lexicon, checks = lexicon_for(task, tokenizer)
    n = shipped_size(task, split) if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    template = TASKS[task]
    natural = template == "ioi" and _reads_natural_punctuation(tokenizer)
    name = _tokenizer_name(tokenizer)
    source = f"<{task}_{split} built for {name}>"
    key = tokenizer_key(tokenizer)

    def draw(m: int) -> list[dict]:
        # the first m distinct candidates of the seeded sampler (a longer draw extends a shorter one)
        if template == "ioi":
            rows = grammar.generate_ioi_pairs(m, split, seed, lexicon=lexicon, strict=False)
        else:
            rows = grammar.generate_sva_pairs(template, m, split, seed, lexicon=lexicon, strict=False)
        if natural:
            rows = [
                {**r, "clean_prefix": natural_punctuation(r["clean_prefix"]),
                 "patch_prefix": natural_punctuation(r["patch_prefix"])}
                for r in rows
            ]  # fmt: skip
        return rows

    pairs: list[Pair] = []
    candidates, rejected, first_problem = 0, 0, None
    drawn: list[dict] = []
    want = n
    while len(pairs) < n:
        more = draw(want)[len(drawn) :]
        if not more:
            break  # the kept words admit no further distinct candidate
        drawn += more
        fresh = [Pair(**r, source=source, line=0) for r in more]
        for pair, tokens in zip(fresh, tokenize_pairs(fresh, tokenizer, key=key), strict=True):
            if len(pairs) >= n:
                break
            candidates += 1
            if isinstance(tokens, DatasetError):
                rejected += 1
                first_problem = first_problem or tokens.problem
            else:
                pairs.append(replace(pair, line=len(pairs) + 1, tokens=tokens))
        want = len(drawn) + 2 * (n - len(pairs)) + 8
    if not pairs:
        raise TaskBuildError(
            f"task {task} ({split}): no valid pair for tokenizer {name!r} out of {candidates} "
            f"candidates (first problem: {first_problem or 'none drawn'})"
        )
    return TaskBuild(
        task=task,
        split=split,
        seed=seed,
        tokenizer=name,
        requested=n,
        pairs=tuple(pairs),
        words=checks,
        candidates=candidates,
        rejected=rejected,
        first_problem=first_problem,
        punctuation="natural" if natural else "spaced",
        shipped_valid=shipped_valid,
        shipped_total=shipped_total,
    )
