"""Run under `torchrun --nproc_per_node 2`: one epoch of our trainer on a mixture whose micro-batches differ in
size across ranks (a 20-row source, a duplicate-heavy source, an oversampled 13-row source; batch 8), gathering
negatives across ranks with MNRL and with GradCache, with and without same-source global batches.

The learning rate is 0 and the model has no dropout, so every step's loss is a function of its batches alone:
rank 0 recomputes each step's loss as one process's MNRL on the concatenation of both ranks' batches and
compares it with the mean over ranks of what the trainer computed. Rank 0 writes the comparison as JSON."""

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
from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss
from model_exploration.pretokenize import pad_ids
from model_exploration.training import MixtureTrainer

SOURCES = {  # with batch 8 and 2 ranks, 5 of 6 steps (3 of 6 with same-source global batches) are uneven
    "twenty": ([f"small source query {i}" for i in range(20)], 1.0),
    "duplicates": ([f"repeated question {i % 6}" for i in range(36)], 1.0),  # 6 distinct anchors
    "oversampled": ([f"oversampled query {i}" + " more" * (i % 5) for i in range(13)], 3.0),
}


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


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
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
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


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


if __name__ == "__main__":
    main(*sys.argv[1:3])
