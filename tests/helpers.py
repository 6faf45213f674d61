"""Tiny builders shared by the tests: word-level tokenizers, random GPT-NeoX / Llama models saved with
``save_pretrained`` (loaded through the same loader as Pythia-70M), random SAEs in the Marks layout."""

from __future__ import annotations

from pathlib import Path

import torch
from dictionary_learning import AutoEncoder
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from feature_circuits.attribution.results import EdgeEffects, NodeEffects, SiteState
from feature_circuits.circuit import Circuit, aggregate_edges, aggregate_nodes, build_circuit
from feature_circuits.data import Batch
from feature_circuits.model.sites import build_sites
from feature_circuits.types import Method

VOCAB = ["<unk>", "<eos>", ".", ",", "the", "a", "and", "to", "is", "are", "then"] + [
    f"w{i}" for i in range(53)
]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def tiny_gpt_neox(seed: int = 0, **overrides):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = {
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def save_random_saes(
    model, root: Path, model_dir: str = "tiny", dict_size: int = 64, seed: int = 0, dict_id: str = "10_64"
) -> Path:
    """Random AutoEncoders for every site, in the Marks layout (ae.pt, like the release)."""
    torch.manual_seed(seed)
    for site in build_sites(model):
        ae = AutoEncoder(site.d_model, dict_size)
        path = root / model_dir / site.marks_dir / dict_id / "ae.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict(), path)
    return root


#: The clean token ids every attribution test runs on (``make_tokenizer``'s vocabulary: 2 x 5 tokens).
CLEAN = torch.tensor([[4, 12, 13, 6, 14], [5, 15, 16, 7, 17]])


def patch_batch(
    clean: torch.Tensor = CLEAN,
    pos: int = 1,
    new: tuple[int, ...] = (20, 21),
    device: str | torch.device = "cpu",
) -> Batch:
    """The CLEAN batch: the patch input is ``clean`` with position ``pos`` replaced by ``new`` (one
    token per example); answers ``is``/``are`` (8, 9) and the other way round."""
    patch = clean.clone()
    patch[:, pos] = torch.tensor(new)
    return Batch(
        clean=clean.to(device),
        patch=patch.to(device),
        clean_answer=torch.tensor([8, 9], device=device),
        patch_answer=torch.tensor([9, 8], device=device),
        pairs=(),
    )


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


# ---------------------------------------------------------------- one small hand-built circuit

F = 3  # features per site; error node is index F


def node_batch(effects: dict[str, torch.Tensor], total: torch.Tensor | None = None) -> NodeEffects:
    b = next(iter(effects.values())).shape[0]
    dummy = SiteState(torch.zeros(1), torch.zeros(1))
    total = torch.zeros(b) if total is None else total
    return NodeEffects(
        method=Method.ATP,
        effects=effects,
        deltas={s: dummy for s in effects},
        grads=None,
        clean={s: dummy for s in effects},
        metric_clean=torch.zeros(b),
        metric_patch=total,
        timing_s={"nodes": 1.0},
    )


def _edge(b, s_down, s_up, entries):
    """Sparse (b, s_down, F+1, s_up, F+1) with the given {(bi, sd, j, su, k): value}."""
    idx = torch.tensor(list(entries.keys()), dtype=torch.long).T
    vals = torch.tensor(list(entries.values()), dtype=torch.float32)
    return torch.sparse_coo_tensor(idx, vals, (b, s_down, F + 1, s_up, F + 1), check_invariants=True)


def small_circuit(aggregation="sum", node_threshold=0.5, edge_threshold=0.1) -> Circuit:
    # sites: embed, resid_0, resid_1 (last resid -> logit)
    if aggregation == "sum":
        eff = {
            "embed": torch.tensor([[[0.6, 0.0, 0.0, 0.1]]]),
            "resid_0": torch.tensor([[[0.0, -0.9, 0.2, 0.7]]]),
            "resid_1": torch.tensor([[[1.5, 0.0, -0.8, 0.0]]]),
        }
        edges = {
            ("embed", "resid_0"): _edge(
                1, 1, 1, {(0, 0, 1, 0, 0): 0.3, (0, 0, F, 0, 0): 0.05, (0, 0, 2, 0, 0): 5.0}
            ),
            ("resid_0", "resid_1"): _edge(1, 1, 1, {(0, 0, 0, 0, 1): -0.4, (0, 0, 2, 0, F): 0.2}),
        }
    else:
        eff = {
            "embed": torch.tensor([[[0.6, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]]]),
            "resid_0": torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -0.9, 0.2, 0.7]]]),
            "resid_1": torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.5, 0.0, -0.8, 0.0]]]),
        }
        edges = {
            ("embed", "resid_0"): _edge(1, 2, 2, {(0, 1, 1, 0, 0): 0.3, (0, 1, F, 0, 0): 0.05}),
            ("resid_0", "resid_1"): _edge(
                1, 2, 2, {(0, 1, 0, 1, 1): -0.4, (0, 1, 2, 1, F): 0.2, (0, 1, 0, 0, 1): 9.0}
            ),
        }
    nodes = aggregate_nodes([node_batch(eff, torch.tensor([2.5]))], aggregation)
    return build_circuit(
        nodes,
        aggregate_edges([EdgeEffects(method=Method.RELP, edges=edges)], aggregation),
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        model="tiny <b>model</b>",
        saes="embedded",
        method="relp",
        dataset="sva_rc",
        split="train",
        tokens=["The", " keys"] if aggregation == "none" else None,
    )


def write_pairs(
    path: Path, n: int, clean: str = "the w{i} and w{j}", patch: str = "the w{k} and w{j}"
) -> Path:
    """A JSON Lines dataset of ``n`` pairs (answers " is" / " are"); ``clean`` / ``patch`` are
    formatted with ``i``, ``j = i + 1`` and ``k = i + 2`` for pair ``i``."""
    import json

    rows = [
        {
            "clean_prefix": clean.format(i=i, j=i + 1, k=i + 2),
            "patch_prefix": patch.format(i=i, j=i + 1, k=i + 2),
            "clean_answer": " is",
            "patch_answer": " are",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
