"""Tiny random models of every supported architecture family (docs/hooks.md), for the hook-table,
Gemma and partial-coverage tests. Norm weights are randomised (the default init makes every norm the
identity scale, which would hide a wrong offset or a missed norm)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tests.helpers import VOCAB, save_model, tiny_gpt_neox, tiny_llama

#: the sliding window of the tiny Gemma models (shorter than the test sequences, so it matters)
WINDOW = 3


def _randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _common(**overrides) -> dict:
    cfg = {
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def tiny_gemma2(seed: int = 0, **overrides) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = _common(
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _randomise_norms(Gemma2ForCausalLM(Gemma2Config(**cfg)).eval(), seed)


def tiny_gemma3(seed: int = 0, **overrides) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = _common(
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=None,  # Gemma 3 has no attention soft-cap (q/k norms instead)
        final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _randomise_norms(Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).eval(), seed)


def tiny_qwen2(seed: int = 0, **overrides) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = _common()
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _randomise_norms(Qwen2ForCausalLM(Qwen2Config(**cfg)).eval(), seed)


def tiny_qwen3(seed: int = 0, **overrides) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = _common(head_dim=8)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _randomise_norms(Qwen3ForCausalLM(Qwen3Config(**cfg)).eval(), seed)


def tiny_mistral(seed: int = 0, **overrides) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = _common(head_dim=8, sliding_window=None)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _randomise_norms(MistralForCausalLM(MistralConfig(**cfg)).eval(), seed)


def _neox(seed: int = 0) -> nn.Module:
    return _randomise_norms(tiny_gpt_neox(seed, num_hidden_layers=3), seed)


def _neox_sequential(seed: int = 0) -> nn.Module:
    return _randomise_norms(tiny_gpt_neox(seed, num_hidden_layers=3, use_parallel_residual=False), seed)


def _llama(seed: int = 0) -> nn.Module:
    return _randomise_norms(tiny_llama(seed, num_hidden_layers=3), seed)


#: family name -> builder (every family the toolkit knows, one tiny random model each)
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt_neox": _neox,
    "gpt_neox_sequential": _neox_sequential,
    "llama": _llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "mistral": tiny_mistral,
    "gemma2": tiny_gemma2,
    "gemma3": tiny_gemma3,
}


def saved(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model of ``family`` saved (with the test tokenizer) under ``path``."""
    return save_model(BUILDERS[family](seed), path)
