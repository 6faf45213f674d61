"""Dataset files and the word-level tokenizer of the embedded model (built from ``grammar``)."""

from __future__ import annotations

import json
from pathlib import Path

from . import grammar

#: Pairs per split written by ``write_datasets``.
N_TRAIN = 400
N_TEST = 150

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]


def build_datasets(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, list[dict]]:
    """``{"sva_simple_train": [...], "sva_simple_test": [...], ..., "ioi_test": [...]}``.

    ``*_test`` come from held-out combinations (never in the training corpus), ``*_train`` (the
    circuit-discovery split) from combinations the model was trained on; see ``grammar`` docstring.
    """
    out: dict[str, list[dict]] = {}
    for structure, name in grammar.DATASET_NAMES.items():
        out[f"{name}_train"] = grammar.generate_sva_pairs(structure, n_train, "train", seed)
        out[f"{name}_test"] = grammar.generate_sva_pairs(structure, n_test, "test", seed)
    out["ioi_train"] = grammar.generate_ioi_pairs(n_train, "train", seed)
    out["ioi_test"] = grammar.generate_ioi_pairs(n_test, "test", seed)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_datasets(out_dir: Path, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> list[Path]:
    paths = []
    for name, rows in build_datasets(seed, n_train, n_test).items():
        p = Path(out_dir) / f"{name}.jsonl"
        write_jsonl(p, rows)
        paths.append(p)
    return paths


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over ``grammar.vocabulary()``.

    WhitespaceSplit pre-tokenizer (so " likes" -> ["likes"], and tokens(prefix) + tokens(" ans") ==
    tokens(prefix + " ans")), ``<unk>``, ``<pad>`` (id 1), ``<eos>`` (id 2). No BOS token is added
    and no special tokens are added when encoding (``add_special_tokens`` has no effect).
    Decoding joins tokens with single spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + grammar.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        model_max_length=64,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
