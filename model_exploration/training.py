"""Our SentenceTransformerTrainer: the weighted multi-source sampler, the custom LR schedule and throughput logs.

Everything else (DDP, bf16 autocast over fp32 master weights, checkpointing, resume with data skipping, W&B
logging on rank 0) is the stock HF/sentence-transformers trainer.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformerTrainer
from transformers import TrainerCallback

import distributed
from lr_schedule import custom_lr_scheduler
from sampler import WeightedSourceBatchSampler, make_source_batch_sampler


class MixtureTrainer(SentenceTransformerTrainer):
    def __init__(self, *args, source_weights: dict[str, float], lr_schedule: dict | None = None, **kwargs):
        self.source_weights = source_weights
        self.custom_lr = lr_schedule
        self._pairs = 0
        self._real_tokens = 0
        self._padded_tokens = 0
        self._since = time.perf_counter()
        super().__init__(*args, **kwargs)

    # -- data: one NO_DUPLICATES sampler per source, mixed by weight x size
    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        return make_source_batch_sampler(dataset, batch_size)

    def get_multi_dataset_batch_sampler(self, dataset, batch_samplers, generator=None, seed=0):
        names = list(self.source_weights)
        return WeightedSourceBatchSampler(
            dataset,
            batch_samplers,
            weights=[self.source_weights[n] for n in names],
            names=names,
            world_size=distributed.world_size(),
            seed=seed,
        )

    # -- schedule
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.custom_lr is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = custom_lr_scheduler(
                optimizer or self.optimizer,
                lr_max=self.args.learning_rate,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                total_steps=num_training_steps,
                **self.custom_lr,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- throughput: pairs and tokens this rank processed since the last log
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            masks = [v for k, v in inputs.items() if k.endswith("_attention_mask")]
            if masks:
                self._pairs += masks[0].shape[0]
                self._real_tokens += int(sum(m.sum() for m in masks))
                self._padded_tokens += sum(m.numel() for m in masks)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._pairs:
            elapsed = max(1e-9, time.perf_counter() - self._since)
            world = distributed.world_size()
            logs["pairs_per_s"] = round(self._pairs * world / elapsed, 2)
            logs["tokens_per_s"] = round(self._real_tokens * world / elapsed, 1)
            logs["padding_share"] = round(1 - self._real_tokens / max(1, self._padded_tokens), 4)
            self._pairs = self._real_tokens = self._padded_tokens = 0
            self._since = time.perf_counter()
        super().log(logs, start_time)


class PreemptionCallback(TrainerCallback):
    """SIGTERM (SLURM preemption, `scancel`, torchrun shutting down) -> finish the current optimizer step, save a
    checkpoint, stop. Ranks agree through a MAX all-reduce of the flag each step, so they all save the same step
    even if the signal reaches them at different times."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.requested
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            tensor = torch.tensor([int(flag)], device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        if flag:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
