"""Shared fixtures: tiny random models (GPT-NeoX and Llama) saved with save_pretrained and loaded
through the same loader as Pythia-70M, and random SAEs saved in the Marks et al. layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dictionary_learning import AutoEncoder

from feature_circuits.dictionaries import save_autoencoder
from feature_circuits.model import load_model
from feature_circuits.sites import build_sites

VOCAB = ["<unk>", "<eos>", ".", ",", "the", "a", "and", "to", "is", "are", "then"] + [f"w{i}" for i in range(53)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_gpt_neox(seed: int = 0, **overrides):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = {
        "vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "rotary_pct": 0.25, "use_parallel_residual": True,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {
        "vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def save_random_saes(model, root: Path, model_dir: str = "tiny", dict_size: int = 64, seed: int = 0,
                     dict_id: str = "10_64") -> Path:
    """Random AutoEncoders for every site, in the Marks layout (ae.pt, like the release)."""
    torch.manual_seed(seed)
    for site in build_sites(model):
        ae = AutoEncoder(site.d_model, dict_size)
        path = root / model_dir / site.marks_dir / dict_id / "ae.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict(), path)
    return root


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory) -> Path:
    return save_model(tiny_gpt_neox(), tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(tiny_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def neox(neox_dir):
    return load_model(neox_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def neox_saes(tmp_path_factory) -> Path:
    return save_random_saes(tiny_gpt_neox(), tmp_path_factory.mktemp("saes"))


__all__ = ["make_tokenizer", "save_autoencoder", "save_model", "save_random_saes", "tiny_gpt_neox", "tiny_llama"]
