"""A tiny word-level tokenizer for tests (no network, no files)."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

WORDS = [
    "The",
    "the",
    "key",
    "keys",
    "cat",
    "cats",
    "dog",
    "dogs",
    "that",
    "near",
    "man",
    "men",
    "is",
    "are",
    "has",
    "have",
    "was",
    "were",
    "Then",
    ",",
    "and",
    "went",
    "to",
    "store",
    ".",
    "gave",
    "a",
    "ring",
    "Mary",
    "John",
]


def tiny_tokenizer(words: tuple[str, ...] | list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer splitting on whitespace; ids: [PAD]=0, [UNK]=1, then ``words`` in order."""
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
