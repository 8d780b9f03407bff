"""Weighted multi-source batch sampler.

Why our own: sentence-transformers' ProportionalBatchSampler draws sources in proportion to size only (no weights),
and RoundRobin stops at the smallest source. Here:
- each batch comes from one source, drawn with probability proportional to weight x size; the epoch holds
  round(sum_i weight_i * size_i / batch_size) batches, apportioned to sources exactly (largest remainder) and
  then shuffled with a generator seeded by (seed, epoch);
- within a source, batches come from ST's NoDuplicatesBatchSampler (no text twice in a batch, so no false
  in-batch negatives); an over-sampled source is reshuffled with a fresh seed each time it wraps;
- the epoch length is a multiple of the world size and identical on every rank, so accelerate's per-rank
  sharding (rank r takes batches r, r+W, ...) gives every rank the same number of batches: no DDP hang;
- with same_source_global_batch, the W batches of one micro-step (one per rank) come from the same source, so
  negatives gathered across ranks (--gather_across_devices) are same-source too (as FlagEmbedding and contrastors
  do): the source is drawn once per global batch, and its next W batches are dealt to the ranks.
The sequence is a pure function of (seed, epoch), which is what makes resume (skip the first N batches) exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import accumulate

import torch
from sentence_transformers.base.sampler import (
    MultiDatasetDefaultBatchSampler,
    NoDuplicatesBatchSampler,
)
from torch.utils.data import BatchSampler, ConcatDataset

from model_exploration.errors import UserError


def apportion(total: int, shares: list[float]) -> list[int]:
    """Split `total` into integers proportional to `shares` (largest remainder, ties to the lower index)."""
    norm = sum(shares)
    exact = [total * s / norm for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class WeightedSourceBatchSampler(MultiDatasetDefaultBatchSampler):
    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        weights: list[float],
        names: list[str],
        world_size: int = 1,
        generator: torch.Generator | None = None,
        seed: int = 0,
        same_source_global_batch: bool = False,
    ) -> None:
        super().__init__(dataset, batch_samplers, generator=generator, seed=seed)
        if len(weights) != len(batch_samplers):
            raise ValueError("one weight per source is required")
        self.weights = weights
        self.names = names
        self.world_size = world_size
        sizes = [len(d) for d in dataset.datasets]
        self.shares = [w * n for w, n in zip(weights, sizes)]
        raw_batches = round(sum(self.shares) / max(s.batch_size for s in batch_samplers))
        # Batches vary in size (small or duplicate-heavy sources form smaller ones). batch_size=None tells
        # accelerate's per-rank sharding so; with a batch size it would drop every batch shorter than it, and
        # ranks would run out of batches early. The count is exact, so nothing is "last" to drop or pad.
        self.batch_size = None
        self.drop_last = True
        self.num_batches = max(world_size, raw_batches - raw_batches % world_size)
        self.group = world_size if same_source_global_batch else 1  # consecutive batches drawn from one source
        self.groups_per_source = apportion(self.num_batches // self.group, self.shares)
        self.batches_per_source = [count * self.group for count in self.groups_per_source]

    def __len__(self) -> int:
        return self.num_batches

    def plan(self) -> list[dict]:
        """Per source: weight, size, batches per epoch and share of batches (for logs and --dry_run)."""
        return [
            {
                "source": name,
                "weight": weight,
                "size": len(ds),
                "batches": count,
                "share": count / self.num_batches,
            }
            for name, weight, ds, count in zip(self.names, self.weights, self.dataset.datasets, self.batches_per_source)
        ]

    def _source_batches(self, index: int, epoch_seed: int) -> Iterator[list[int]]:
        """Endless batches of one source; every wrap reshuffles with a fresh seed."""
        sampler = self.batch_samplers[index]
        wrap = 0
        while True:
            sampler.seed = epoch_seed * 1_000_003 + index * 10_007 + wrap
            sampler.epoch = 0
            produced = 0
            for batch in sampler:
                produced += 1
                yield batch
            if produced == 0:
                raise UserError(f"source {self.names[index]!r} has no training rows; drop it from the mixture")
            wrap += 1

    def __iter__(self) -> Iterator[list[int]]:
        epoch_seed = self.seed + self.epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        order = torch.tensor([i for i, c in enumerate(self.groups_per_source) for _ in range(c)], dtype=torch.long)
        order = order[torch.randperm(len(order), generator=generator)].tolist()
        offsets = [0] + list(accumulate(len(d) for d in self.dataset.datasets))
        streams = [self._source_batches(i, epoch_seed) for i in range(len(self.batch_samplers))]
        for index in order:
            for _ in range(self.group):
                yield [i + offsets[index] for i in next(streams[index])]


def make_source_batch_sampler(dataset, batch_size: int) -> NoDuplicatesBatchSampler:
    """NO_DUPLICATES batches for one source. A pass ends with the rows that could not fill a batch without
    repeating a text (drop_last=False): a small or duplicate-heavy source forms smaller batches instead of none."""
    return NoDuplicatesBatchSampler(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        drop_last=False,
        generator=torch.Generator(),
        seed=0,
    )
