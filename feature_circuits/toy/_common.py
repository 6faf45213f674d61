"""What the embedded default's training scripts (:mod:`.train_model`, :mod:`.train_saes`) share."""

from __future__ import annotations

import random

import torch

__all__ = ["start_run"]


def start_run(seed: int, threads: int) -> None:
    """Start a deterministic single-process CPU run: ``threads`` torch threads, then torch's and
    Python's global RNGs seeded with ``seed``."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
