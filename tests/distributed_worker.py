"""Run under `torchrun --nproc_per_node 2` (see test_distributed.py); rank 0 writes both reports as JSON.

losses: losses with negatives gathered across ranks (ours, losses.py) vs one process's loss on the concatenated
  batch, for equal and unequal per-rank batches: MNRL, GradCache (by texts and by tokens), the binary-aware loss.
epochs: one epoch of our trainer on a mixture whose micro-batches differ in size across ranks (a 20-row source, a
  duplicate-heavy source, an oversampled 13-row source; batch 8), gathering negatives with MNRL and with GradCache,
  with and without same-source global batches. The learning rate is 0 and the model has no dropout, so every
  step's loss is a function of its batches alone: rank 0 recomputes each step's loss as one process's MNRL on the
  concatenation of both ranks' batches and compares it with the mean over ranks of what the trainer computed.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from model_exploration import unpadded
from model_exploration.binary import BinaryAwareMNRLoss, BinarySurrogate
from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss
from model_exploration.pretokenize import pad_ids
from model_exploration.training import MixtureTrainer

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


SOURCES = {  # with batch 8 and 2 ranks, 5 of 6 steps (3 of 6 with same-source global batches) are uneven
    "twenty": ([f"small source query {i}" for i in range(20)], 1.0),
    "duplicates": ([f"repeated question {i % 6}" for i in range(36)], 1.0),  # 6 distinct anchors
    "oversampled": ([f"oversampled query {i}" + " more" * (i % 5) for i in range(13)], 3.0),
}


def losses_report(model_dir: str) -> dict:
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
    return report


class RecordingTrainer(MixtureTrainer):
    """Keeps, per step, the token ids this rank trained on and the loss it computed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids = {
            column: [row[mask.bool()].tolist() for row, mask in zip(inputs[f"{column}_input_ids"], inputs[f"{column}_attention_mask"])]
            for column in ("anchor", "positive")
        }  # fmt: skip
        self.steps.append({"ids": ids, "loss": float(loss.detach())})
        return loss


def features(rows: list[list[int]], pad: int) -> dict:
    ids, mask = pad_ids(rows, pad)
    return {"input_ids": ids, "attention_mask": mask}


def epochs_report(model_dir: str) -> dict:
    rank = dist.get_rank()
    data = DatasetDict(
        {
            name: Dataset.from_dict({"anchor": anchors, "positive": [f"passage for {a} number {i}" for i, a in enumerate(anchors)]})
            for name, (anchors, _) in SOURCES.items()
        }
    )  # fmt: skip
    report = {}
    for loss_kind in ("mnrl", "cached"):
        for same_source in (False, True):
            # a fresh model per run: DDP hooks its parameters, and a second DDP over them would reduce twice
            model = SentenceTransformer(model_dir, device="cpu")
            unpadded.enable_unpadded(model)
            loss = (
                GatheredMNRLoss(model, gather_across_devices=True)
                if loss_kind == "mnrl"
                else GatheredCachedMNRLoss(model, mini_batch_size=3, gather_across_devices=True)
            )
            with tempfile.TemporaryDirectory() as tmp:
                args = SentenceTransformerTrainingArguments(
                    output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=0.0,
                    warmup_steps=0, use_cpu=True, save_strategy="no", report_to="none", logging_steps=1, seed=42,
                )  # fmt: skip
                trainer = RecordingTrainer(
                    model=model, args=args, train_dataset=data, loss=loss,
                    source_weights={name: weight for name, (_, weight) in SOURCES.items()},
                    same_source_global_batch=same_source,
                )  # fmt: skip
                trainer.train()
            everyone = [None, None]
            dist.all_gather_object(everyone, {"steps": trainer.steps, "global_step": trainer.state.global_step})
            if rank == 0:
                report[f"{loss_kind}/same_source={same_source}"] = compare(model, everyone)
    return report


def compare(model, ranks: list[dict]) -> dict:
    pad = model.tokenizer.pad_token_id
    reference_loss = MultipleNegativesRankingLoss(model)
    diffs, uneven = [], 0
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        sizes = [len(step0["ids"]["anchor"]), len(step1["ids"]["anchor"])]
        uneven += sizes[0] != sizes[1]
        with torch.no_grad():
            reference = reference_loss(
                [features(step0["ids"][c] + step1["ids"][c], pad) for c in ("anchor", "positive")], None
            ).item()
        diffs.append(abs((step0["loss"] + step1["loss"]) / 2 - reference))
    return {
        "steps": [len(r["steps"]) for r in ranks],
        "global_steps": [r["global_step"] for r in ranks],
        "uneven_steps": uneven,
        "max_loss_diff": max(diffs),
    }


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    report = {"losses": losses_report(model_dir), "epochs": epochs_report(model_dir)}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
