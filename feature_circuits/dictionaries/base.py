"""The :class:`Dictionary` Protocol: what the toolkit needs of a sparse autoencoder (or any
dictionary) spliced into a site (docs/algorithms.md, "Dictionaries and the error node").

A dictionary of a site with activation width ``d`` and ``F`` features maps an activation ``x``
(..., d) to features ``f = encode(x)`` (..., F) and back to ``x_hat = decode(f)`` (..., d). The
toolkit only relies on ``decode`` being affine in ``f``, so that its derivative is one fixed
(F, d) matrix: row ``k`` of :meth:`Dictionary.decoder_directions` is ``d decode(f) / d f_k``.
Adapters read it from their weights; :func:`decoder_directions_by_vjp` derives it from ``decode``
alone for a dictionary that has no such weights.

Torch is imported for annotations only, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Dictionary", "FeatureGradients", "decoder_directions_by_vjp"]


@runtime_checkable
class Dictionary(Protocol):
    """A dictionary of one site: ``encode``, ``decode`` (affine in ``f``), its decoder directions
    and its sizes (``dict_size`` features ``F``, ``activation_dim`` width ``d``)."""

    dict_size: int
    activation_dim: int

    def encode(self, x: Tensor) -> Tensor:
        """Features ``f`` (..., F) of activations ``x`` (..., d)."""
        ...

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``x_hat`` (..., d) of features ``f`` (..., F)."""
        ...

    def decoder_directions(self, like: Tensor) -> Tensor:
        """The (F, d) matrix whose row ``k`` is ``d decode(f) / d f_k``, in ``like``'s dtype and
        device."""
        ...


@runtime_checkable
class FeatureGradients(Protocol):
    """Optional: a dictionary whose single features' input gradients are cheap. Edges need
    ``d f_j(x) / d x`` at each selected downstream feature node; without this method it comes from
    a full (F-wide) encode and its backward, with it from ``d`` numbers per node."""

    def feature_gradients(self, x: Tensor, j: Tensor) -> Tensor:
        """(n, d): row ``i`` is ``d f_{j[i]}(x) / d x`` at ``x[i]`` (``x`` (n, d), ``j`` (n,)), equal
        to what autograd gives through :meth:`Dictionary.encode`."""
        ...


def decoder_directions_by_vjp(decode: Callable[[Tensor], Tensor], n_features: int, like: Tensor) -> Tensor:
    """The (F, d) derivative of an affine ``decode`` from one batched vector-Jacobian product (for
    dictionaries whose decoder is not a readable weight matrix)."""
    import torch

    f0 = torch.zeros(1, n_features, dtype=like.dtype, device=like.device, requires_grad=True)
    with torch.enable_grad():
        out = decode(f0)
        eye = torch.eye(out.shape[-1], dtype=out.dtype, device=out.device).unsqueeze(1)
        (jac,) = torch.autograd.grad(out, f0, eye, is_grads_batched=True)
    return jac[:, 0].T.contiguous()
