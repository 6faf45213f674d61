"""The shipped dataset files and the embedded model's word-level tokenizer, both built from
:mod:`feature_circuits.toy.grammar`.

Owns: the split sizes (:data:`N_TRAIN`, :data:`N_TEST`), writing ``<name>_<split>.jsonl``
(:func:`write_datasets`; the package's ``toy/data/`` is what ``feature-circuits train-toy datasets``
rewrites), the tokenizer (:func:`build_tokenizer`), and the logit-difference accuracy check of a model
on clean/patch pairs used when training (:func:`evaluate_pairs`). The dataset format itself is
defined in docs/algorithms.md, "Datasets".
"""

from __future__ import annotations

import json
from pathlib import Path

from feature_circuits.toy import grammar

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


def encode_words(tokenizer, texts: list[str]) -> list[list[int]]:
    """Fast word-level encoding (a dict lookup per space-separated word); equal to
    ``tokenizer(text).input_ids`` for texts made of vocabulary words (checked by the tests)."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    return [[vocab.get(w, unk) for w in t.split()] for t in texts]


def evaluate_pairs(model, tokenizer, pairs: list[dict], batch_size: int = 256) -> dict:
    """Logit-diff evaluation of clean/patch pairs on ``model`` (a causal LM returning ``.logits``).

    For each pair: d_clean = logit(clean_answer) - logit(patch_answer) after ``clean_prefix``, and
    d_patch = logit(patch_answer) - logit(clean_answer) after ``patch_prefix``. Returns accuracy
    (fraction d_clean > 0), mean logit diff (of d_clean), and the same for the patch side.
    Prefixes are right-padded; the logit is read at each prefix's last token. No BOS is prepended.
    """
    import torch

    dc, dp = [], []
    model.eval()
    for side in ("clean", "patch"):
        other = "patch" if side == "clean" else "clean"
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            ids = [tokenizer(p[f"{side}_prefix"]).input_ids for p in chunk]
            good = [tokenizer(p[f"{side}_answer"], add_special_tokens=False).input_ids for p in chunk]
            bad = [tokenizer(p[f"{other}_answer"], add_special_tokens=False).input_ids for p in chunk]
            if any(len(g) != 1 or len(b) != 1 for g, b in zip(good, bad, strict=True)):
                raise ValueError("answers must be single tokens")
            n = max(map(len, ids))
            x = torch.full((len(ids), n), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, s in enumerate(ids):
                x[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            with torch.no_grad():
                logits = model(input_ids=x, attention_mask=mask).logits
            last = logits[torch.arange(len(ids)), torch.tensor([len(s) - 1 for s in ids])]
            g = torch.tensor([t[0] for t in good])
            b = torch.tensor([t[0] for t in bad])
            d = (last.gather(1, g[:, None]) - last.gather(1, b[:, None]))[:, 0]
            (dc if side == "clean" else dp).extend(d.tolist())
    n = len(dc)
    return {
        "n": n,
        "accuracy": sum(d > 0 for d in dc) / n,
        "mean_logit_diff": sum(dc) / n,
        "patch_accuracy": sum(d > 0 for d in dp) / n,
        "patch_mean_logit_diff": sum(dp) / n,
    }


def heldout_eval_texts(seed: int = 0, n: int = N_TEST) -> list[str]:
    """Held-out sentences used to evaluate the embedded SAEs: the clean and patch prefixes of every
    ``*_test`` split, each followed by its answer (so the predicted token is included)."""
    texts = []
    for name, rows in build_datasets(seed, n_train=0, n_test=n).items():
        if name.endswith("_test"):
            for r in rows:
                texts.append(r["clean_prefix"] + r["clean_answer"])
                texts.append(r["patch_prefix"] + r["patch_answer"])
    return texts
