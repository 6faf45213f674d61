"""The shipped tasks built for a BPE tokenizer (feature_circuits.tasks, and load_pairs of a shipped
name): single-token answers, equal clean/patch lengths, seeded, the shipped hold-out rule; the
embedded tokenizer keeps the shipped files; the Marks et al. file format loads."""

from __future__ import annotations

import json
import random
import re

import pytest

from feature_circuits.data import DatasetError, load_pairs, resolve_dataset, tokenize_pair, tokenize_pairs
from feature_circuits.tasks import (
    TASKS,
    TaskBuild,
    TaskBuildError,
    build_task,
    lexicon_for,
    natural_punctuation,
    shipped_size,
    shipped_task,
)
from feature_circuits.toy import DATA_DIR, grammar
from tests.helpers import tiny_tokenizer

#: IOI text in the tokenizer's training corpus uses only these names, so only they become one token.
IOI_NAMES = grammar.NAMES[:8]


def _corpus() -> list[str]:
    rng = random.Random(0)
    sva = {"simple": 0.2, "nounpp": 0.3, "rc": 0.5}
    text = [grammar.corpus_sentence(rng, sva).text for _ in range(3000)]
    for b, a in zip(IOI_NAMES, IOI_NAMES[1:] + IOI_NAMES[:1], strict=True):
        for place, obj in zip(grammar.PLACES, grammar.OBJECTS, strict=True):
            text += [grammar.ioi_prefix(b, a, place, obj) + f" {a} ."] * 3
    return [natural_punctuation(t) for t in text]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2 / Pythia style: leading-space tokens such as 'Ġis') trained here on
    the grammar's text, wrapped in a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=550, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _assert_valid_for(pairs, tok) -> None:
    for p in pairs:
        clean, patch = _ids(tok, p.clean_prefix), _ids(tok, p.patch_prefix)
        assert len(clean) == len(patch) > 0
        for answer in (p.clean_answer, p.patch_answer):
            (token,) = _ids(tok, answer)  # one token, with its leading space
            assert answer.startswith(" ")
            assert _ids(tok, p.clean_prefix + answer) == [*clean, token]
        assert p.tokens is not None and p.tokens == tokenize_pair(p, tok)
        assert list(p.tokens.clean) == clean and list(p.tokens.patch) == patch


def _signature(p) -> tuple[str, str, str, str]:
    return (p.clean_prefix, p.patch_prefix, p.clean_answer, p.patch_answer)


def test_the_tokenizer_splits_some_task_words(bpe):
    """The premise: some shipped lines are invalid for this tokenizer (as for Pythia or Llama)."""
    from feature_circuits.data import Pair

    rows = [json.loads(line) for line in (DATA_DIR / "sva_rc_train.jsonl").read_text().splitlines()]
    checked = tokenize_pairs([Pair(**row) for row in rows], bpe)
    invalid = sum(isinstance(t, DatasetError) for t in checked)
    assert 0 < invalid < len(rows)
    first_bad = next(i for i, t in enumerate(checked) if isinstance(t, DatasetError))
    with pytest.raises(DatasetError):
        tokenize_pair(Pair(**rows[first_bad]), bpe)  # the batched check agrees with the one-pair check
    pairs = load_pairs(resolve_dataset("sva_rc", "train"), bpe)
    assert pairs.build is not None and pairs.build.shipped_valid == len(rows) - invalid


@pytest.mark.parametrize("task", list(TASKS))
def test_every_shipped_task_name_builds_valid_pairs(bpe, task):
    train = load_pairs(resolve_dataset(task, "train"), bpe, limit=64)
    test = load_pairs(resolve_dataset(task, "test"), bpe, limit=64)
    for pairs in (train, test):
        assert pairs.build is not None and isinstance(pairs.build, TaskBuild)
        assert 0 < len(pairs) <= 64
        _assert_valid_for(pairs, bpe)
        assert pairs.report == pairs.build.summary() and task in pairs.report
        valid, total = pairs.build.shipped_valid, pairs.build.shipped_total
        assert valid is not None and total is not None and valid < total
    assert not {_signature(p) for p in train} & {_signature(p) for p in test}
    assert len({_signature(p) for p in train}) == len(train)  # distinct


def test_sva_word_filter_reports_dropped_words(bpe):
    build = build_task("sva_rc", "train", bpe)
    nouns, verbs, rc_verbs = build.words
    assert nouns.dropped and nouns.kept  # this tokenizer splits some plurals differently
    for word, why in nouns.dropped:
        sg, pl = word.split("/")
        assert len(_ids(bpe, " " + sg)) != len(_ids(bpe, " " + pl)), why
    for word in nouns.kept:
        sg, pl = word.split("/")
        assert len(_ids(bpe, " " + sg)) == len(_ids(bpe, " " + pl))
    for word in verbs.kept:  # answers: one token each
        assert all(len(_ids(bpe, " " + w)) == 1 for w in word.split("/"))
    for word, _ in verbs.dropped:
        assert any(len(_ids(bpe, " " + w)) != 1 for w in word.split("/"))
    summary = build.summary()
    kept = f"{len(nouns.kept)}/{len(nouns.kept) + len(nouns.dropped)}"
    assert f"nouns (singular/plural of equal length) {kept}" in summary
    assert f"{build.candidates - build.rejected} of {build.candidates} candidate pairs survived" in summary
    # only the kept words occur
    subjects = {p.clean_prefix.split()[1] for p in build.pairs}
    allowed = {w for pair in nouns.kept for w in pair.split("/")}
    assert subjects <= allowed
    assert {p.clean_answer.strip() for p in build.pairs} <= {w for v in verbs.kept for w in v.split("/")}
    assert rc_verbs.role.startswith("relative-clause verbs")


def test_ioi_keeps_single_token_names_and_natural_punctuation(bpe):
    build = build_task("ioi", "train", bpe, 40)
    names = build.words[0]
    assert set(IOI_NAMES) <= set(names.kept) and names.dropped
    assert build.punctuation == "natural"
    for p in build.pairs:
        assert p.clean_prefix.startswith("Then, ") and " . " not in p.clean_prefix and ". " in p.clean_prefix
        assert p.clean_answer.strip() in names.kept and p.patch_answer.strip() in names.kept
    _assert_valid_for(build.pairs, bpe)


def test_seeded_and_prefix_stable(bpe):
    a = build_task("sva_nounpp", "train", bpe, 30, seed=0)
    b = build_task("sva_nounpp", "train", bpe, 30, seed=0)
    c = build_task("sva_nounpp", "train", bpe, 30, seed=1)
    assert [_signature(p) for p in a.pairs] == [_signature(p) for p in b.pairs]
    assert [p.tokens for p in a.pairs] == [p.tokens for p in b.pairs]
    assert [_signature(p) for p in a.pairs] != [_signature(p) for p in c.pairs]
    shorter = build_task("sva_nounpp", "train", bpe, 10, seed=0)
    assert [_signature(p) for p in shorter.pairs] == [_signature(p) for p in a.pairs[:10]]
    # load_pairs of the shipped name gives the same pairs (seed 0)
    loaded = load_pairs(resolve_dataset("sva_nounpp", "train"), bpe, limit=30)
    assert [_signature(p) for p in loaded] == [_signature(p) for p in a.pairs]


def _sva_simple_key(p) -> tuple[str, ...]:
    subject = p.clean_prefix.split()[1]
    return grammar.sva_key("simple", subject, p.clean_answer.strip())


def _ioi_key(p) -> tuple[str, ...]:
    m = re.match(r"Then, (\w+) and (\w+) went to the (\w+)\. \w+ gave a (\w+) to$", p.clean_prefix)
    assert m, p.clean_prefix
    return grammar.ioi_key(m[1], m[2], m[3], m[4])


@pytest.mark.parametrize(("task", "key"), [("sva_simple", _sva_simple_key), ("ioi", _ioi_key)])
def test_the_shipped_hold_out_rule(bpe, task, key):
    """test pairs are exactly the held-out combinations, train pairs never are (so they are disjoint)."""
    train, test = build_task(task, "train", bpe, 60), build_task(task, "test", bpe, 30)
    assert train.pairs and test.pairs
    assert not any(grammar.is_held_out(key(p)) for p in train.pairs)
    assert all(grammar.is_held_out(key(p)) for p in test.pairs)


def test_fewer_pairs_than_asked_when_the_words_run_out(bpe):
    """sva_simple has few combinations (kept nouns x verbs x number): the build stops short, says so."""
    lexicon, _ = lexicon_for("sva_simple", bpe)
    build = build_task("sva_simple", "train", bpe, 5000)
    assert len(build.pairs) < 5000
    most = len(lexicon.nouns) * len(lexicon.agree_verbs) * 2
    assert len(build.pairs) <= most
    assert f"built {len(build.pairs)} of 5000 pairs" in build.summary()


def test_embedded_tokenizer_keeps_the_shipped_files():
    from transformers import AutoTokenizer

    from feature_circuits.toy import MODEL_DIR

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    for task in TASKS:
        for split in ("train", "test"):
            path = resolve_dataset(task, split)
            assert shipped_task(path) == (task, split)
            pairs = load_pairs(path, tok, limit=50)
            assert pairs.build is None and pairs.report is None
            lines = [json.loads(line) for line in path.read_text().splitlines()[:50]]
            assert [_signature(p) for p in pairs] == [
                (r["clean_prefix"], r["patch_prefix"], r["clean_answer"], r["patch_answer"]) for r in lines
            ]
            assert [p.line for p in pairs] == list(range(1, 51))
            assert shipped_size(task, split) == len(path.read_text().splitlines())


def test_a_copy_of_a_shipped_file_is_a_plain_file(tmp_path, bpe):
    """Only the shipped files themselves are rebuilt: the same lines elsewhere are the user's data."""
    copy = tmp_path / "sva_rc_train.jsonl"
    copy.write_bytes((DATA_DIR / "sva_rc_train.jsonl").read_bytes())
    assert shipped_task(copy) is None
    with pytest.raises(DatasetError, match=r"sva_rc_train\.jsonl:\d+: "):
        load_pairs(copy, bpe)


def test_a_tokenizer_that_cannot_express_a_task():
    tok = tiny_tokenizer(["The", "the", "that", "author", "authors", "pilot", "pilots"])  # no verbs
    with pytest.raises(TaskBuildError, match=r"sva_simple: this tokenizer keeps 0 verbs"):
        build_task("sva_simple", "train", tok)
    with pytest.raises(TaskBuildError, match="unknown task"):
        build_task("sva_everything", "train", tok)


# --------------------------------------------------------------------------------------------------
# The Marks et al. dataset files: JSON Lines (named .json), answers without a leading space


MARKS_LINES = [
    '{"clean_prefix": "The keys", "patch_prefix": "The key", "clean_answer": "are", "patch_answer": "is", '
    '"case": "plural"}',
    '{"clean_prefix": "The cat", "patch_prefix": "The cats", "clean_answer": "was", "patch_answer": "were", '
    '"case": "singular"}',
]


def test_marks_format_loads_as_it_is(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "simple_train.json"
    path.write_text("\n".join(MARKS_LINES) + "\n")
    assert resolve_dataset(str(path)) == path
    pairs = load_pairs(resolve_dataset(str(path)), tok)
    assert [(p.clean_answer, p.patch_answer) for p in pairs] == [(" are", " is"), (" was", " were")]
    assert pairs[0].tokens is not None
    assert pairs[0].tokens.clean_answer == _ids(tok, " are")[0]
    assert pairs.report is not None and "2 of 2 examples have answers without a leading space" in pairs.report
    # a bad line still names file:line
    path.write_text(MARKS_LINES[0] + '\n{"clean_prefix": "The keys", "patch_prefix": "The key"}\n')
    with pytest.raises(
        DatasetError, match=r"simple_train\.json:2: missing key\(s\) clean_answer, patch_answer"
    ):
        load_pairs(path, tok)
    with pytest.raises(Exception, match=r"dataset file not found: .*nounpp_train\.json"):
        resolve_dataset("nounpp_train.json")
