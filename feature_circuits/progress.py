"""Progress bars for every pass longer than a few seconds (tqdm on stderr).

One place decides how a bar looks and when it shows: ``enabled=False`` (``--no-progress``, tests)
hides it; bars redraw at most every half second so they cost nothing next to a forward pass.

    for batch in progress(batches, desc="relp nodes", unit="batch", enabled=cfg.progress):
        ...
    with progress_bar(total=n_forwards, desc="exact", unit="fwd", enabled=True) as bar:
        bar.update(k)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "progress_bar"]

_T = TypeVar("_T")


def progress_bar(*, total: int | None, desc: str, unit: str = "it", enabled: bool | None = True) -> tqdm:
    """A bar to advance by hand (``bar.update(n)``); use as a context manager so it closes.
    ``enabled=None``: shown only when stderr is a terminal (the default of inner passes)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
        leave=False,
    )


def progress(
    items: Iterable[_T], *, desc: str, unit: str = "it", total: int | None = None, enabled: bool | None = True
) -> Iterator[_T]:
    """``items`` with a bar that advances by one per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(total=total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
