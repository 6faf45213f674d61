"""The splice primitive: a dictionary spliced into a site, with its error node (docs/algorithms.md,
"Dictionaries and the error node").

At a site with activation ``x`` the dictionary gives features ``f = encode(x)`` and the error node
``err = x - decode(f)``, so ``decode(f) + err = x`` exactly: splicing a dictionary with its error
node never changes the model's output. Attribution differentiates the metric with respect to
``f`` and ``err`` (:func:`splice_with_grad_leaves`); patching sets them (:func:`splice_patched`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from feature_circuits.dictionaries.base import Dictionary

__all__ = ["encode_with_error", "splice_patched", "splice_with_grad_leaves"]


def encode_with_error(ae: Dictionary, x: Tensor) -> tuple[Tensor, Tensor]:
    """Features and error node of activation ``x``, differentiable in ``x``: f = encode(x),
    err = x - decode(f)."""
    f = ae.encode(x)
    return f, x - ae.decode(f)


def splice_with_grad_leaves(ae: Dictionary, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Splice a dictionary into a site for attribution.

    Returns ``(out, f, err)`` where ``f`` (b,s,F) and ``err`` (b,s,d) are fresh leaves that
    require grad, and ``out`` is numerically ``x`` exactly (bit for bit) with gradient routing:
    d out/d f = decoder (a feature's gradient comes only through the decoder), d out/d err = I,
    and d out/d x = I (upstream layers receive the true gradient of the site output; no gradient
    flows through the encoder or into the error's dependence on x).
    """
    with torch.no_grad():
        f0, err0 = encode_with_error(ae, x.detach())
    f = f0.requires_grad_(True)
    err = err0.requires_grad_(True)
    x_hat = ae.decode(f)
    out = x + (x_hat - x_hat.detach()) + (err - err.detach())
    return out, f, err


def splice_patched(ae: Dictionary, f: Tensor, err: Tensor) -> Tensor:
    """Site output for given features and error: decode(f) + err."""
    return ae.decode(f) + err
