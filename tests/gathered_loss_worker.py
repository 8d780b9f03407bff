"""Run under `torchrun --nproc_per_node 2`: losses with negatives gathered across ranks (ours, losses.py) vs one
process's loss on the concatenated batch, for equal and unequal per-rank batches (see test_distributed.py).
Rank 0 writes the comparison as JSON."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from model_exploration import unpadded
from model_exploration.binary import BinaryAwareMNRLoss, BinarySurrogate
from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss

PAIRS = 12
SPLITS = {"equal": 6, "unequal": 9}  # rows of rank 0; rank 1 takes the rest
LOSSES = {
    "mnrl": lambda model, gather: GatheredMNRLoss(model, gather_across_devices=gather),
    "cached": lambda model, gather: GatheredCachedMNRLoss(model, mini_batch_size=4, gather_across_devices=gather),
    "cached_tokens": lambda model, gather: GatheredCachedMNRLoss(
        model, mini_batch_size=8, mini_batch_num_tokens=60, gather_across_devices=gather
    ),
    "binary": lambda model, gather: BinaryAwareMNRLoss(
        model, BinarySurrogate("tanh"), float_weight=0.5, gather_across_devices=gather
    ),
}


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = SentenceTransformer(model_dir, device="cpu")  # built without dropout: train mode is deterministic
    unpadded.enable_unpadded(model)
    model.train()
    queries = [f"question {i} about topic {i % 5}" + " detail" * (i % 4) for i in range(PAIRS)]
    passages = [f"passage {i} answers topic {i % 5}." + " More evidence here." * (i % 7) for i in range(PAIRS)]
    negatives = [f"an unrelated note {i}" + " filler" * (i % 3) for i in range(PAIRS)]

    def run(loss, rows) -> tuple[float, dict]:
        """Loss and gradients as DDP combines them: mean over ranks of each rank's loss and gradients."""
        model.zero_grad()
        value = loss([model.preprocess(column[rows]) for column in (queries, passages, negatives)], None)
        value.backward()
        value = value.detach().clone()
        dist.all_reduce(value)
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                grads[name] = param.grad / world
        return value.item() / world, grads

    report = {}
    for split, first in SPLITS.items():
        rows = slice(0, first) if rank == 0 else slice(first, PAIRS)
        report[f"{split}/local_mnrl"] = run(LOSSES["mnrl"](model, False), rows)[0]
        for kind, make in LOSSES.items():
            value, grads = run(make(model, True), rows)
            if rank == 0:
                model.zero_grad()
                reference = make(model, False)([model.preprocess(c) for c in (queries, passages, negatives)], None)
                reference.backward()
                ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                shared = set(ref) & set(grads)
                report[f"{split}/{kind}"] = {
                    "loss": value,
                    "reference_loss": reference.item(),
                    "grads_compared": len(shared),
                    "max_grad": max(g.abs().max().item() for g in ref.values()),
                    "max_grad_diff": max((grads[n] - ref[n]).abs().max().item() for n in shared),
                }
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
