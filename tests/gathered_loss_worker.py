"""Run under `torchrun --nproc_per_node 2`: losses with negatives gathered across ranks vs one process's plain
MNRL on the concatenated batch (see test_unpadded.py). Rank 0 writes the comparison as JSON."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from model_exploration import unpadded

PAIRS = 12


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = SentenceTransformer(model_dir, device="cpu")
    unpadded.enable_unpadded(model)
    model.eval()  # no dropout: ranks and the reference compute the same function
    queries = [f"question {i} about topic {i % 5}" + " detail" * (i % 4) for i in range(PAIRS)]
    passages = [f"passage {i} answers topic {i % 5}." + " More evidence here." * (i % 7) for i in range(PAIRS)]
    half = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)

    def grads_after(loss, q, p) -> tuple[float, dict]:
        """Loss mean over ranks and gradients averaged over ranks (what DDP's all-reduce does)."""
        model.zero_grad()
        value = loss([model.preprocess(q), model.preprocess(p)], None)
        value.backward()
        value = value.detach().clone()
        dist.all_reduce(value)
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                grads[name] = param.grad / world
        return value.item() / world, grads

    local_loss, _ = grads_after(MultipleNegativesRankingLoss(model), queries[half], passages[half])
    report = {"local_loss": local_loss}
    for kind, loss in (
        ("mnrl", MultipleNegativesRankingLoss(model, gather_across_devices=True)),
        ("cached", CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, gather_across_devices=True)),
    ):
        value, grads = grads_after(loss, queries[half], passages[half])
        report[kind] = {"loss": value, "grads": grads}
    if rank == 0:
        model.zero_grad()
        reference = MultipleNegativesRankingLoss(model)([model.preprocess(queries), model.preprocess(passages)], None)
        reference.backward()
        ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        report["reference_loss"] = reference.item()
        report["max_grad"] = max(g.abs().max().item() for g in ref.values())
        for kind in ("mnrl", "cached"):
            grads = report[kind].pop("grads")
            shared = set(ref) & set(grads)
            report[kind]["grads_compared"] = len(shared)
            report[kind]["max_grad_diff"] = max((grads[n] - ref[n]).abs().max().item() for n in shared)
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
