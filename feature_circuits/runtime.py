"""How a run starts: the number of torch CPU threads (``--threads N`` on every command, and its
default) and the seeds (a fixed seed gives the same circuit).

    apply_threads(None)   # the default (below)
    apply_threads(1)
    seed_everything(0)

Default: ``OMP_NUM_THREADS`` when it is set (torch then already uses it); otherwise half the
logical CPUs, at least 1, at most torch's own default (its physical core count). On a shared
small machine torch's default oversubscribes the cores other jobs use, and the models this
toolkit runs are small enough that one thread per spare core is the better trade (docs/methods.md
quotes timings with the thread count used). Importing this module imports no torch.
"""

from __future__ import annotations

import os
import random

__all__ = ["apply_threads", "default_threads", "seed_everything"]


def default_threads() -> int | None:
    """The default thread count, or None to leave torch's (``OMP_NUM_THREADS`` is set)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // 2))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count to ``threads`` (None: :func:`default_threads`); returns
    the count in effect."""
    import torch

    n = default_threads() if threads is None else int(threads)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's and numpy's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
