"""Process-group facts and the one collective pattern the data path needs.

Semantics, named explicitly:
- Rank and world size come from torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK); plain `python` is one
  process and every helper degrades to a no-op.
- Caches are built by global rank 0 only (`rank0_first`); the others wait at a barrier and then read them. That
  barrier runs on a separate CPU (gloo) group whose timeout is `--build_wait_minutes`: fetching and building can
  take hours, which must not trip the training collectives' `--ddp_timeout_minutes` (NCCL's watchdog would kill
  the job), and those keep their short timeout so a dead rank still ends a job quickly.
- Preemption: each rank's SIGTERM flag is all-reduced (max) on that CPU group once per optimizer step, so every
  rank stops and saves at the same step (training.PreemptionCallback).
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


_build_group = None  # a CPU (gloo) group: the rank-0-first barrier (long timeout) and host-side flags


def init_process_group(timeout_minutes: float, build_wait_minutes: float | None = None) -> None:
    """Join torchrun's group (no-op for one process). `timeout_minutes` bounds how long a dead peer can hang the
    training collectives; `build_wait_minutes` how long ranks wait for rank 0's fetches and cache builds."""
    global _build_group
    if world_size() == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    wait = datetime.timedelta(minutes=build_wait_minutes or timeout_minutes)
    _build_group = dist.new_group(backend="gloo", timeout=wait)


def cpu_group():
    """The CPU (gloo) process group, for collectives that must not touch the GPU; None for one process. Created
    here (with the default timeout) when the process group came from elsewhere; creating a group is collective, so
    every rank must reach the first call."""
    global _build_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _build_group is None:
        _build_group = dist.new_group(backend="gloo")
    return _build_group


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[bool]:
    """Rank 0 runs the body first (downloads, builds caches); the others run it after the barrier, reading the
    cache rank 0 left. Yields whether this process is rank 0."""
    group = cpu_group()  # every rank, before rank 0's body: creating the group is collective
    if group is not None and not is_main_process():
        dist.barrier(group=group)
    yield is_main_process()
    if group is not None and is_main_process():
        dist.barrier(group=group)


def broadcast_object(obj):
    """Rank 0's value on every rank (identity for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
