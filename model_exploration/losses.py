"""The MNRL family, with in-batch negatives gathered across ranks whatever each rank's batch size.

Why our own gather: sentence-transformers' `gather_across_devices` all-gathers embeddings with torch.distributed,
which needs the same number of rows on every rank. Ranks' micro-batches differ whenever a source pass ends in a
short batch or a source is smaller than the batch (the sampler keeps those rows rather than dropping them): gloo
aborts ("Received data size doesn't match expected size"), NCCL does not check and hangs or mixes stale rows into
the negatives. Here the row counts are exchanged first, rows are padded to the largest count for the collective
and cut back after it, so every rank scores its queries against exactly the passages of all ranks.

Weighting: each rank's loss is its queries' mean loss times (its queries x world size / all queries). DDP
averages gradients over ranks, so a step's gradient is that of the mean over every query of the step: one
process's loss on the concatenated batch, with no pair over- or under-weighted by the size of its rank's batch
(tested on 2 gloo ranks with unequal batches, for MNRL, GradCache and the binary-aware loss).

Collectives per step are the same on every rank (one exchange of counts, one gather per embedding column, and for
GradCache one all-reduce of the negatives' gradients), never a number that depends on the local batch size: a
rank with fewer rows cannot fall out of step with the others.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import RandContext
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from torch import Tensor

from model_exploration.unpadded import HOST_LENGTHS


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count (one small all-gather; the counts are needed on the host to cut the rows)."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(c) for c in torch.cat(counts).tolist()]


class _AllGather(torch.autograd.Function):
    """All-gather of equal-shape tensors whose backward returns to each rank the sum over ranks of the gradient of
    its own slot (the gradient of the sum of all ranks' losses). Our own because torch's differentiable
    all_gather is deprecated and its replacement is private."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_rows(tensor: Tensor, counts: list[int], with_grad: bool) -> list[Tensor]:
    """Every rank's rows of `tensor`, in rank order, for per-rank row counts `counts`. With `with_grad`, the
    gradient of another rank's rows reaches that rank (this rank's own entry is `tensor` itself)."""
    padded = F.pad(tensor, (0, 0, 0, max(counts) - tensor.shape[0])).contiguous()
    gathered = _AllGather.apply(padded) if with_grad else _AllGather.forward(None, padded.detach())
    parts = [part[:count] for part, count in zip(gathered, counts)]
    parts[dist.get_rank()] = tensor
    return parts


def own_rows_first(parts: list[Tensor]) -> Tensor:
    """This rank's rows, then every other rank's: with this order, position i of the local batch is its own
    positive's column i, which is what MNRL's un-gathered computation expects."""
    rank = dist.get_rank()
    return torch.cat([parts[rank]] + [p for r, p in enumerate(parts) if r != rank])


def _share(rows: int, counts: list[int]) -> float:
    """Factor turning this rank's mean loss into its share of the mean over all ranks' rows (see module doc)."""
    return rows * len(counts) / sum(counts)


def _check_default_directions(loss) -> None:
    if tuple(loss.directions) != ("query_to_doc",) or loss.hardness_mode is not None:
        raise ValueError("gathering across ranks supports MNRL's default query_to_doc direction without hardness")


class GatheredMNRLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss; with `gather_across_devices`, each query is scored against the passages (and
    hard negatives) of every rank's batch, for any per-rank batch sizes."""

    def __init__(self, model, gather_across_devices: bool = False, **kwargs):
        super().__init__(model, gather_across_devices=False, **kwargs)  # gathering is ours (module docstring)
        self.gather_all_ranks = gather_across_devices
        if gather_across_devices:
            _check_default_directions(self)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if not (self.gather_all_ranks and _distributed()):
            return super().compute_loss_from_embeddings(embeddings, labels)
        queries, docs = embeddings[0], embeddings[1:]
        counts = row_counts(queries.shape[0], queries.device)
        docs = [own_rows_first(gather_rows(d, counts, with_grad=True)) for d in docs]
        return super().compute_loss_from_embeddings([queries, *docs], labels) * _share(queries.shape[0], counts)

    def get_config_dict(self) -> dict[str, Any]:
        return super().get_config_dict() | {"gather_across_devices": self.gather_all_ranks}


class GatheredCachedMNRLoss(CachedMultipleNegativesRankingLoss):
    """CachedMultipleNegativesRankingLoss (GradCache); with `gather_across_devices`, negatives from every rank's
    batch for any per-rank batch sizes. The gathered passages of other ranks enter the loss as constants whose
    gradient is sent back to their rank by one all-reduce after the chunked loss, because a backward through a
    gather inside the chunk loop would run one collective per chunk, and ranks with fewer rows have fewer chunks."""

    def __init__(self, model, gather_across_devices: bool = False, **kwargs):
        super().__init__(model, gather_across_devices=False, **kwargs)
        self.gather_all_ranks = gather_across_devices
        if gather_across_devices:
            _check_default_directions(self)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False):
        if not (self.gather_all_ranks and _distributed()):
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        queries = torch.cat(reps[0])
        local_docs = [torch.cat(column) for column in reps[1:]]
        counts = row_counts(queries.shape[0], queries.device)
        rank, share = dist.get_rank(), _share(queries.shape[0], counts)
        others = []
        for docs in local_docs:
            parts = gather_rows(docs.detach(), counts, with_grad=False)
            others.append(torch.cat([p for r, p in enumerate(parts) if r != rank]).requires_grad_(with_backward))
        full = [[torch.cat([mine, theirs])] for mine, theirs in zip(local_docs, others)]
        loss = super().calculate_loss([[queries], *full], labels, with_backward=with_backward) * share
        if with_backward:
            for column in reps:
                for rep in column:
                    rep.grad.mul_(share)
            for column, theirs in zip(reps[1:], others):
                self._return_gradients(column, theirs.grad * share, counts)
        return loss

    @staticmethod
    def _return_gradients(own_reps: list[Tensor], grad_of_others: Tensor, counts: list[int]) -> None:
        """Add to this rank's passage embeddings the gradient the other ranks' losses have for them."""
        rank = dist.get_rank()
        starts = [sum(counts[:r]) for r in range(len(counts))]
        full = grad_of_others.new_zeros(sum(counts), grad_of_others.shape[1])
        position = 0
        for r, count in enumerate(counts):
            if r != rank:
                full[starts[r] : starts[r] + count] = grad_of_others[position : position + count]
                position += count
        dist.all_reduce(full)
        mine = full[starts[rank] : starts[rank] + counts[rank]]
        offset = 0
        for rep in own_reps:
            rep.grad.add_(mine[offset : offset + rep.shape[0]])
            offset += rep.shape[0]

    def embed_minibatch(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state=None):
        """sentence-transformers' chunk embedding, with the chunk cut by the collator's host lengths when the batch
        has them: its own cut reads the chunk's mask on the host to trim trailing padding columns (a host-device
        sync per chunk), and would hand every chunk the whole batch's lengths."""
        lengths = sentence_feature.get(HOST_LENGTHS)
        if lengths is None:
            return super().embed_minibatch(sentence_feature, begin, end, with_grad, copy_random_state, random_state)
        width = sentence_feature["attention_mask"].shape[1]
        # right padding: the chunk's longest row bounds its real columns; left padding keeps its width (positions)
        tokenizer = getattr(self.model, "module", self.model).tokenizer  # under DDP the trainer hands us the wrapper
        keep = width if tokenizer.padding_side == "left" else max(lengths[begin:end])
        chunk = {
            key: (value[begin:end, :keep] if value.ndim >= 2 and value.shape[1] == width else value[begin:end])
            if torch.is_tensor(value)
            else value
            for key, value in sentence_feature.items()
        }
        chunk[HOST_LENGTHS] = lengths[begin:end]
        with nullcontext() if random_state is None else random_state, nullcontext() if with_grad else torch.no_grad():
            random_state = RandContext(*chunk.values()) if copy_random_state else None
            reps = self.model(chunk)["sentence_embedding"]
        return reps, random_state

    def get_config_dict(self) -> dict[str, Any]:
        return super().get_config_dict() | {"gather_across_devices": self.gather_all_ranks}
