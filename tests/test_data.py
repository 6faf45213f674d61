"""Dataset loading, validation, name resolution, tokenization (once per pair) and batching
(feature_circuits.data)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import torch

from feature_circuits.data import (
    Batch,
    DatasetError,
    Pair,
    UnknownDatasetError,
    as_hf_dataset,
    available_datasets,
    load_pairs,
    make_batches,
    resolve_dataset,
    tokenize_pair,
)
from tests.helpers import tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def rec(
    clean: object = "The keys",
    patch: object = "The key",
    ca: object = " are",
    pa: object = " is",
    **extra: object,
) -> dict[str, object]:
    """A dataset record; values are ``object`` so that tests can build invalid ones."""
    return {"clean_prefix": clean, "patch_prefix": patch, "clean_answer": ca, "patch_answer": pa, **extra}


def write(tmp_path: Path, lines: list, name: str = "d.jsonl", trailing: str = "\n") -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + trailing
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = [
    rec(case="simple"),
    rec("The cat that the dogs", "The cats that the dogs", " is", " are", case="within_rc"),
    rec("The dog", "The dogs", " has", " have"),
]


def test_load_valid(tmp_path, tok):
    path = write(tmp_path, GOOD)
    pairs = load_pairs(path, tok)
    assert [p.clean_prefix for p in pairs] == ["The keys", "The cat that the dogs", "The dog"]
    assert pairs[0] == Pair(
        clean_prefix="The keys",
        patch_prefix="The key",
        clean_answer=" are",
        patch_answer=" is",
        case="simple",
        source=str(path),
        line=1,
    )
    assert pairs[2].case is None and pairs[2].line == 3


def test_limit(tmp_path, tok):
    # limit takes the first N valid lines and does not even read past them
    path = write(tmp_path, [*GOOD, "{broken"])
    pairs = load_pairs(path, tok, limit=2)
    assert [p.line for p in pairs] == [1, 2]
    with pytest.raises(ValueError):
        load_pairs(path, tok, limit=0)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"clean_prefix": "The keys", ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({k: v for k, v in rec().items() if k != "patch_answer"}, "missing key(s) patch_answer"),
        (rec(ca=3), "clean_answer must be a string"),
        (rec(case=5), "case must be a string"),
        (rec(clean=""), "clean_prefix is empty"),
        (rec(pa=""), "patch_answer is empty"),
        (rec(ca=" are is"), "clean_answer ' are is' is 2 tokens"),
        (rec(pa=" zebra"), "patch_answer ' zebra' is the unknown token"),
        (rec(clean="The cat that", patch="The cats"), "different token lengths (3 vs 2)"),
        (rec(ca="is"), "does not tokenize as a separate token"),  # " is" would equal patch
        (rec(ca=" is"), "same token"),
        (rec(clean="The giraffes"), "contains the unknown token"),
        ('{"clean_prefix": "a", "clean_prefix": "b"}', "duplicate key"),
    ],
)
def test_rejects_each_malformed_line_with_line_number(tmp_path, tok, bad, fragment):
    path = write(tmp_path, [GOOD[0], GOOD[1], bad, GOOD[2]])
    with pytest.raises(DatasetError) as info:
        load_pairs(path, tok)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert fragment in msg, msg
    assert info.value.line == 3 and info.value.path == str(path)


def test_invalid_utf8(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(rec()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=r":2: not valid UTF-8"):
        load_pairs(path, tok)


def test_blank_lines(tmp_path, tok):
    # trailing blank lines (and CRLF line ends) are fine ...
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\r\n".join(json.dumps(r).encode() for r in GOOD) + b"\r\n\r\n  \n")
    assert len(load_pairs(path, tok)) == 3
    # ... a file without a final newline too ...
    assert len(load_pairs(write(tmp_path, GOOD, "n.jsonl", trailing=""), tok)) == 3
    # ... but a blank line between examples is an error naming its line
    path = write(tmp_path, [GOOD[0], "", GOOD[1]], "b.jsonl")
    with pytest.raises(DatasetError, match=r"b\.jsonl:2: blank line between examples"):
        load_pairs(path, tok)


@pytest.mark.parametrize("content", ["", "\n", "\n\n  \n"])
def test_empty_file(tmp_path, tok, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=r"empty\.jsonl:1: dataset file is empty"):
        load_pairs(path, tok)
    with pytest.raises(DatasetError):
        load_pairs(path, tok, skip_invalid=True)


def test_missing_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "nope.jsonl", tok)


def test_skip_invalid_warns_with_each_line(tmp_path, tok):
    path = write(
        tmp_path, [GOOD[0], "not json", GOOD[1], rec(ca=" are is"), GOOD[2], rec(clean="The cat that")]
    )
    with pytest.warns(UserWarning) as record:
        pairs = load_pairs(path, tok, skip_invalid=True)
    assert [p.line for p in pairs] == [1, 3, 5]
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 3 invalid line(s), kept 3" in msg
    assert f"{path}:2: invalid JSON" in msg
    assert f"{path}:4: clean_answer ' are is' is 2 tokens" in msg
    assert f"{path}:6: clean and patch prefixes have different token lengths" in msg


def test_skip_invalid_without_invalid_lines_is_silent(tmp_path, tok):
    path = write(tmp_path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_pairs(path, tok, skip_invalid=True)) == 3


def test_skip_invalid_all_bad(tmp_path, tok):
    path = write(tmp_path, ["x", "y"])
    with (
        pytest.warns(UserWarning, match="skipped 2"),
        pytest.raises(DatasetError, match=r":2: no valid examples"),
    ):
        load_pairs(path, tok, skip_invalid=True)


def test_skip_invalid_with_limit(tmp_path, tok):
    path = write(tmp_path, ["x", GOOD[0], GOOD[1], "y"])
    with pytest.warns(UserWarning, match="skipped 1 invalid") as record:
        pairs = load_pairs(path, tok, skip_invalid=True, limit=2)
    assert [p.line for p in pairs] == [2, 3]
    assert ":1: invalid JSON" in str(record[0].message)


def test_extra_keys_are_allowed(tmp_path, tok):
    path = write(tmp_path, [rec(template="simple", n=3)])
    assert load_pairs(path, tok)[0].case is None


# ---------------------------------------------------------------------------------------------------
# resolve_dataset


def test_resolve_existing_path(tmp_path):
    path = write(tmp_path, GOOD, "mine.jsonl")
    assert resolve_dataset(path, "test") == path
    assert resolve_dataset(str(path)) == path


def test_resolve_shipped_name(tmp_path):
    for name in ("sva_rc_train", "sva_rc_test", "ioi_test"):
        write(tmp_path, GOOD, f"{name}.jsonl")
    assert resolve_dataset("sva_rc", "train", data_dir=tmp_path) == tmp_path / "sva_rc_train.jsonl"
    assert resolve_dataset("sva_rc", "test", data_dir=tmp_path) == tmp_path / "sva_rc_test.jsonl"
    assert available_datasets(tmp_path) == {"ioi": ["test"], "sva_rc": ["train", "test"]}
    with pytest.raises(UnknownDatasetError, match=r"'ioi' has no 'train' split .*available splits: test"):
        resolve_dataset("ioi", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        resolve_dataset("sva_rc", "validation", data_dir=tmp_path)


def test_resolve_unknown_name_lists_available(tmp_path):
    write(tmp_path, GOOD, "sva_simple_train.jsonl")
    write(tmp_path, GOOD, "sva_simple_test.jsonl")
    write(tmp_path, GOOD, "ioi_train.jsonl")
    with pytest.raises(UnknownDatasetError) as info:
        resolve_dataset("sva_nope", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert "unknown dataset 'sva_nope'" in msg
    assert "ioi (train)" in msg and "sva_simple (train/test)" in msg


def test_resolve_unknown_name_empty_dir(tmp_path):
    with pytest.raises(UnknownDatasetError, match="available: none"):
        resolve_dataset("sva_rc", "train", data_dir=tmp_path)


def test_resolve_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_dataset(tmp_path / "missing.jsonl", "train")


# ---------------------------------------------------------------------------------------------------
# make_batches


def test_make_batches_groups_by_length(tmp_path, tok):
    recs = [
        rec("The cat that the dogs", "The cats that the dogs", " is", " are"),  # len 5
        rec("The keys", "The key", " are", " is"),  # len 2
        rec("The dog near the man", "The dogs near the man", " has", " have"),  # len 5
        rec("The cat", "The cats", " was", " were"),  # len 2
        rec("The men", "The man", " have", " has"),  # len 2
        rec("The cat near the men", "The cats near the men", " is", " are"),  # len 5
    ]
    pairs = load_pairs(write(tmp_path, recs), tok)
    batches = make_batches(pairs, tok, batch_size=2)
    assert all(isinstance(b, Batch) for b in batches)
    assert [[p.line for p in b.pairs] for b in batches] == [[2, 4], [5], [1, 3], [6]]
    assert [b.seq_len for b in batches] == [2, 2, 5, 5]
    assert [len(b) for b in batches] == [2, 1, 2, 1]

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    b0 = batches[0]
    assert b0.clean.dtype == torch.long and b0.clean.shape == (2, 2)
    assert b0.clean.tolist() == [ids("The keys"), ids("The cat")]
    assert b0.patch.tolist() == [ids("The key"), ids("The cats")]
    assert b0.clean_answer.tolist() == [ids(" are")[0], ids(" was")[0]]
    assert b0.patch_answer.tolist() == [ids(" is")[0], ids(" were")[0]]
    assert b0.clean_answer.shape == (2,)
    b2 = batches[2]
    assert b2.clean.tolist() == [ids("The cat that the dogs"), ids("The dog near the man")]
    assert b2.patch.tolist() == [ids("The cats that the dogs"), ids("The dogs near the man")]

    # deterministic, and a large batch size gives one batch per length
    again = make_batches(pairs, tok, batch_size=2)
    assert [[p.line for p in b.pairs] for b in again] == [[2, 4], [5], [1, 3], [6]]
    big = make_batches(pairs, tok, batch_size=100)
    assert [[p.line for p in b.pairs] for b in big] == [[2, 4, 5], [1, 3, 6]]
    assert make_batches([], tok, 4) == []
    with pytest.raises(ValueError):
        make_batches(pairs, tok, 0)


def test_make_batches_validates_hand_made_pairs(tok):
    bad = Pair(
        clean_prefix="The cat that",
        patch_prefix="The cats",
        clean_answer=" is",
        patch_answer=" are",
        source="hand",
        line=7,
    )
    with pytest.raises(DatasetError, match=r"^hand:7: clean and patch prefixes have different token lengths"):
        make_batches([bad], tok, 4)


class CountingTokenizer:
    """A tokenizer that counts how often it is called (and otherwise is ``inner``)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_pairs_are_tokenized_once(tmp_path, tok):
    """load_pairs tokenizes (and validates) each pair once -- all the file's texts in one batched
    tokenizer call -- and keeps its token ids; make_batches reuses them: batching loaded pairs costs
    no tokenizer call, and gives the same batches as tokenizing afresh."""
    recs = [
        rec(),
        rec("The cat", "The cats", " was", " were"),
        rec("The cat near the men", "The cats near the men"),
    ]
    counting = CountingTokenizer(tok)
    # a duck-typed stand-in: every attribute but the call count is the real tokenizer's
    as_tokenizer = cast("PreTrainedTokenizerBase", counting)
    pairs = load_pairs(write(tmp_path, recs), as_tokenizer)
    assert counting.calls == 1  # one batched call encodes every text of the file
    assert all(p.tokens == tokenize_pair(p, tok) for p in pairs)
    counting.calls = 0
    batches = make_batches(pairs, as_tokenizer, batch_size=2)
    assert counting.calls == 0
    fresh = make_batches([Pair(**{k: getattr(p, k) for k in rec()}) for p in pairs], tok, batch_size=2)
    for a, b in zip(batches, fresh, strict=True):
        assert torch.equal(a.clean, b.clean) and torch.equal(a.patch, b.patch)
        assert torch.equal(a.clean_answer, b.clean_answer) and torch.equal(a.patch_answer, b.patch_answer)
    # tokens are not part of a pair's identity; another tokenizer's tokens are not reused
    assert pairs[0] == Pair(**{k: getattr(pairs[0], k) for k in (*rec(), "source", "line")})
    other = tiny_tokenizer(
        ["The", "keys", "key", "are", "is", "cat", "cats", "was", "were", "near", "the", "men"]
    )
    assert pairs[0].tokens_for(other) != pairs[0].tokens
    assert pairs[0].tokens_for(other) == tokenize_pair(pairs[0], other)


def test_batch_select_rows_with_repeats(tmp_path, tok):
    """Batch.select: rows in the given order, repeats allowed, pairs following the rows."""
    recs = [rec(), rec("The cat", "The cats", " was", " were"), rec("The men", "The man", " have", " has")]
    (batch,) = make_batches(load_pairs(write(tmp_path, recs), tok), tok, batch_size=3)
    idx = torch.tensor([2, 0, 2])
    sub = batch.select(idx)
    assert isinstance(sub, Batch) and len(sub) == 3 and sub.seq_len == batch.seq_len
    for field in ("clean", "patch", "clean_answer", "patch_answer"):
        assert torch.equal(getattr(sub, field), getattr(batch, field)[idx])
    assert [p.line for p in sub.pairs] == [3, 1, 3]
    with pytest.raises(ValueError, match="answers must be"):
        Batch(
            clean=batch.clean,
            patch=batch.patch,
            clean_answer=batch.clean_answer[:1],
            patch_answer=batch.patch_answer,
            pairs=(),
        )


# ---------------------------------------------------------------------------------------------------
# as_hf_dataset


def test_as_hf_dataset(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = write(tmp_path, GOOD)
    ds = as_hf_dataset(path, tok)
    assert len(ds) == 3
    assert ds[0]["clean_prefix"] == "The keys" and ds[0]["case"] == "simple"
    bad = write(tmp_path, [GOOD[0], "nope"], "bad.jsonl")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: invalid JSON"):
        as_hf_dataset(bad)
