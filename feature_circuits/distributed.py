"""Data-parallel discovery under ``torchrun`` (``torch.distributed``: gloo on the CPU, NCCL on CUDA).

    torchrun --nproc-per-node 2 -m feature_circuits discover --method relp --out out/

:func:`feature_circuits.pipeline.discover` calls :func:`init_from_env`: with ``WORLD_SIZE`` > 1 in
the environment (torchrun sets it, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``) it joins the process group and returns a :class:`DataParallel`; otherwise None and
discovery runs in one process as before.

* **Sharding** is by example index, deterministic: rank ``r`` of ``N`` gets examples ``r, r+N,
  r+2N, ...`` of the dataset (:meth:`DataParallel.shard`) and batches them itself.
* **Reduction**: each rank streams its batches into a
  :class:`~feature_circuits.circuit.NodeAccumulator` / :class:`~feature_circuits.circuit.EdgeAccumulator`
  (float64 sums over its examples). :meth:`DataParallel.merge` all-gathers the accumulators
  (``all_gather_object``: the node sums are dense (F+1,) per site; the edge sums are sparse COO
  tensors, gathered as they are rather than densified, since a dense (F_down+1, F_up+1) per site pair
  is 10^9 entries at 32768 features) and adds them up in rank order, so every rank holds the same
  totals; the circuit is built from them on every rank and **rank 0 writes** the outputs.
* The circuit equals the single-process one up to float64 summation order (the sums are divided
  by the example count and rounded to float32 only after the merge).
* **Devices**: with CUDA each rank uses ``cuda:LOCAL_RANK`` and the NCCL backend; the gathered
  objects are CPU tensors either way (the accumulators keep their sums on the CPU).

torchrun sets ``OMP_NUM_THREADS=1`` per process unless it is set already, so ``N`` ranks on ``N``
cores do not oversubscribe them. Models that do not fit one device are a different axis:
``--device-map`` (accelerate; one process), or ``--tensor-parallel`` under torchrun, where the ranks
shard one copy of the weights instead of the examples (:attr:`DataParallel.tensor_parallel`: every
rank runs every example and computes the same sums, rank 0 writes); docs/methods.md, "Scale".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

__all__ = ["DataParallel", "init_from_env", "is_main_process", "world_size_from_env"]

_T = TypeVar("_T")


class _Mergeable(Protocol):
    def merge(self, other: Any) -> None: ...


_A = TypeVar("_A", bound=_Mergeable)


def is_main_process() -> bool:
    """Whether this process is rank 0 of the environment's group (True for a single process): the
    one that prints summaries and writes outputs."""
    return os.environ.get("RANK", "0") in ("", "0")


def world_size_from_env() -> int:
    """``WORLD_SIZE`` of the environment (1 when unset or not a number)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    #: the ranks shard one model copy (tensor parallelism) instead of the examples: every rank runs
    #: every example, the same numbers (:meth:`shard` keeps all, :meth:`merge` is the identity)
    tensor_parallel: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.tensor_parallel:
            return f"rank {self.rank} of {self.world_size} ({self.backend}), tensor parallel: weights sharded"
        return f"rank {self.rank} of {self.world_size} ({self.backend}), examples sharded by index"

    def device_for(self, device: str | None) -> str | None:
        """The device this rank runs on: ``cuda:LOCAL_RANK`` when ``device`` asks for CUDA (``cuda``,
        ``auto`` with CUDA available); else ``device`` unchanged."""
        import torch

        if device is None or device == "auto":
            return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def shard(self, items: Sequence[_T]) -> list[_T]:
        """Items ``rank, rank + N, ...`` (deterministic; every item on exactly one rank); every item
        under tensor parallelism."""
        if self.tensor_parallel:
            return list(items)
        return list(items[self.rank :: self.world_size])

    def merge(self, acc: _A) -> _A:
        """Every rank's accumulator, added up in rank order (the same result on every rank); under
        tensor parallelism each rank's own (every rank computed the same sums)."""
        if self.tensor_parallel:
            return acc
        import torch.distributed as td

        gathered: list[Any] = [None] * self.world_size
        td.all_gather_object(gathered, acc)
        total = gathered[0]
        for other in gathered[1:]:
            total.merge(other)
        return total

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()

    def close(self) -> None:
        """Leave the process group (after the last collective of the run)."""
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def init_from_env(
    device: str | None = None, *, timeout_s: float = 1800.0, tensor_parallel: bool = False
) -> DataParallel | None:
    """Join the process group torchrun describes in the environment (None for a single process).
    Backend: NCCL when this run uses CUDA, gloo otherwise. Idempotent: a second call in the same
    process reuses the group."""
    if world_size_from_env() <= 1:
        return None
    import torch
    import torch.distributed as td

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    wants_cuda = device is not None and device.startswith("cuda")
    wants_cuda = wants_cuda or (device in (None, "auto") and torch.cuda.is_available())
    backend = "nccl" if wants_cuda else "gloo"
    if not td.is_initialized():
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    else:
        backend = str(td.get_backend())
    return DataParallel(
        rank=td.get_rank(),
        world_size=td.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        tensor_parallel=tensor_parallel,
    )
