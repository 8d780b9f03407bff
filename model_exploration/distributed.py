"""Process-group facts and the one collective pattern the data path needs.

Semantics, named explicitly:
- Rank and world size come from torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK); plain `python` is one
  process and every helper degrades to a no-op.
- Caches are built by global rank 0 only (`rank0_first`); the others wait at a barrier and then read them.
- The process group is created by the HF Trainer's accelerator (NCCL on GPU, gloo on CPU); we create it earlier
  ourselves only so that the cache barrier exists before the Trainer does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_process_group(timeout_minutes: float) -> None:
    """Join torchrun's group (no-op for one process). The timeout bounds how long a dead peer can hang the rest."""
    if world_size() == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[bool]:
    """Rank 0 runs the body first (downloads, builds caches); the others run it after the barrier, reading the
    cache rank 0 left. Yields whether this process is rank 0."""
    if not is_main_process():
        barrier()
    yield is_main_process()
    if is_main_process():
        barrier()


def broadcast_object(obj):
    """Rank 0's value on every rank (identity for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
