"""The identity dictionary: the neuron baseline (docs/algorithms.md, "Dictionaries and the error
node").

Its features are the raw dimensions of the activation (``F = d``, ``encode = decode = id``), so
its error node is identically zero and its decoder directions are the identity matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from feature_circuits.dictionary_info import DictionaryInfo

__all__ = ["IdentityDictionary"]


class IdentityDictionary(nn.Module):
    """The neuron baseline: features are the raw dimensions, the error is identically zero."""

    #: what circuit.json records for it (set by the loader, feature_circuits.dictionaries.marks)
    info: DictionaryInfo | None = None

    def __init__(self, activation_dim: int):
        super().__init__()
        if activation_dim < 1:
            raise ValueError(f"IdentityDictionary: activation_dim must be >= 1, got {activation_dim}")
        self.activation_dim = activation_dim
        self.dict_size = activation_dim

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, f: Tensor) -> Tensor:
        return f

    def decoder_directions(self, like: Tensor) -> Tensor:
        return torch.eye(self.dict_size, dtype=like.dtype, device=like.device)

    def forward(self, x: Tensor, output_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return (x, x) if output_features else x
