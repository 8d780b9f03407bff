"""Our SentenceTransformerTrainer: the weighted multi-source sampler, the custom LR schedule and throughput logs
(pairs/s, real tokens/s, padding share of the batch tensors, model TFLOP/s per device and MFU against the
device's measured matmul peak; counters stay on the device between logs, so logging adds no per-step sync).

Everything else (DDP, bf16 autocast over fp32 master weights, checkpointing, resume with data skipping, W&B
logging on rank 0) is the stock HF/sentence-transformers trainer.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformerTrainer
from transformers import TrainerCallback

from model_exploration import distributed, throughput
from model_exploration.lr_schedule import custom_lr_scheduler
from model_exploration.reporting import write_atomic
from model_exploration.sampler import WeightedSourceBatchSampler, make_source_batch_sampler

logger = logging.getLogger(__name__)


class MixtureTrainer(SentenceTransformerTrainer):
    def __init__(
        self,
        *args,
        source_weights: dict[str, float],
        lr_schedule: dict | None = None,
        same_source_global_batch: bool = False,
        saved_max_len: int | None = None,
        **kwargs,
    ):
        self.source_weights = source_weights
        self.same_source_global_batch = same_source_global_batch
        self.custom_lr = lr_schedule
        self.saved_max_len = saved_max_len
        self._since = time.perf_counter()
        super().__init__(*args, **kwargs)
        self.flops = throughput.EncoderFlops.of(self.model)
        self.token_counter = TokenCounter(self.flops.window)
        self.peak_flops = throughput.matmul_peak_flops(self.args.device)

    # -- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints and final/ saved with `saved_max_len` as their max_seq_length (the evaluation's: the protocol
        their scores were computed under), not the training length, so encode / encode_query of the saved model give
        the embeddings the evaluation scored (a run that trains at 128 tokens for speed keeps a 256-token model)."""
        if self.saved_max_len is None:
            return super().save_model(output_dir, _internal_call)
        trained = self.model.max_seq_length
        self.model.max_seq_length = self.saved_max_len
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            self.model.max_seq_length = trained

    # -- data: one NO_DUPLICATES sampler per source, mixed by weight x size
    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        return make_source_batch_sampler(dataset, batch_size)

    def get_multi_dataset_batch_sampler(self, dataset, batch_samplers, generator=None, seed=0):
        names = list(self.source_weights)
        sampler = WeightedSourceBatchSampler(
            dataset,
            batch_samplers,
            weights=[self.source_weights[n] for n in names],
            names=names,
            world_size=distributed.world_size(),
            seed=seed,
            same_source_global_batch=self.same_source_global_batch,
        )
        if distributed.is_main_process():
            for row in sampler.plan():
                logger.info("mixture %-40s weight %7.3f size %8d batches/epoch %6d share %6.2f%%",
                            row["source"], row["weight"], row["size"], row["batches"], 100 * row["share"])  # fmt: skip
        return sampler

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
            self.token_counter.add(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not self.token_counter.empty:
            elapsed = max(1e-9, time.perf_counter() - self._since)
            rates = throughput.training_rates(self.token_counter.read(), elapsed, self.flops, self.peak_flops,
                                              distributed.world_size())  # fmt: skip
            # significant digits, not decimals: a small model on CPU runs at 1e-4 TFLOP/s, not 0
            logs.update({name: float(f"{value:.4g}") for name, value in rates.items()})
            self._since = time.perf_counter()
        super().log(logs, start_time)


class TokenCounter:
    """Pairs, real tokens, sum of squared lengths (attention work), windowed attention pairs (`window`: ModernBERT's
    sliding layers) and padded positions of the batches seen. Pairs and padded positions are known from the tensors'
    shapes on the host; the token sums stay on the batch's device (no host-device sync per step), and only read()
    synchronizes."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.pairs = 0
        self.padded = 0
        self.sums: torch.Tensor | None = None  # [real tokens, sum of squared lengths, windowed pairs] on the device

    @property
    def empty(self) -> bool:
        return self.sums is None

    def add(self, inputs: dict) -> None:
        masks = [v for k, v in inputs.items() if k.endswith("_attention_mask")]
        if not masks:
            return
        self.pairs += masks[0].shape[0]
        self.padded += sum(m.numel() for m in masks)
        lengths = torch.cat([m.sum(1) for m in masks]).double()
        squares = lengths.square().sum()
        windowed = squares if self.window is None else throughput.windowed_pairs(lengths, self.window)
        step = torch.stack([lengths.sum(), squares, windowed])
        self.sums = step if self.sums is None else self.sums + step

    def read(self) -> throughput.Counts:
        """The counts since the last read, and start over."""
        real, sum_sq, windowed = self.sums.tolist() if self.sums is not None else (0.0, 0.0, 0.0)
        values = throughput.Counts(float(self.pairs), real, sum_sq, windowed, float(self.padded))
        self.pairs, self.padded, self.sums = 0, 0, None
        return values


CHECKPOINT_MARKER = "_COMPLETE.json"


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a checkpoint complete once every rank has written its part. Rank 0 writes the model, optimizer and
    trainer_state.json while each rank writes its own RNG state (rng_state_<rank>.pth), so trainer_state.json alone
    does not prove another rank has finished; a run killed in that window would resume with a rank's RNG state
    missing. After a barrier (every rank has returned from saving), rank 0 lists the checkpoint's files in a
    marker written last; `missing_from_checkpoint` checks them."""

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()
        if distributed.is_main_process():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seen = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
            # each rank's RNG file is listed even if a slow shared filesystem does not show it to rank 0 yet
            files = sorted(seen | set(expected_rng_files(distributed.world_size())))
            write_atomic(
                folder / CHECKPOINT_MARKER, json.dumps({"world_size": distributed.world_size(), "files": files})
            )
        return control


def expected_rng_files(world_size: int) -> list[str]:
    """The RNG state files the HF Trainer writes into a checkpoint: one per rank, or one for a single process."""
    return [f"rng_state_{r}.pth" for r in range(world_size)] if world_size > 1 else ["rng_state.pth"]


def unmarked_but_resumable(folder: Path) -> bool:
    """A checkpoint without our marker (written by plain HF Trainer or an older version of this tool) that holds
    the trainer state and this run's ranks' RNG states: resumable when named explicitly, with a warning."""
    folder = Path(folder)
    needed = ["trainer_state.json", *expected_rng_files(distributed.world_size())]
    return all((folder / name).exists() for name in needed)


def missing_from_checkpoint(folder: Path) -> list[str]:
    """What a checkpoint lacks to be resumed exactly: its completion marker, or a file the marker lists."""
    marker = Path(folder) / CHECKPOINT_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return [CHECKPOINT_MARKER]
    return [f for f in files if not (Path(folder) / f).exists()]


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N of a run folder that every rank finished writing; each newer one that is not
    complete gets one warning naming what it lacks."""
    for folder in sorted(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        missing = missing_from_checkpoint(folder)
        if not missing:
            return folder
        logger.warning("%s is incomplete (missing %s); falling back to an earlier checkpoint", folder.name,
                       ", ".join(missing[:5]))  # fmt: skip
    return None


class PreemptionCallback(TrainerCallback):
    """SIGTERM (SLURM preemption, `scancel`, torchrun shutting down) -> save a checkpoint at the end of the next
    optimizer step and stop. Ranks agree through a MAX all-reduce of the flag on the CPU process group, started
    asynchronously at the end of a step and read at the end of the next one: no GPU synchronization, no wait in
    the step, and every rank stops at the same step even if the signal reaches them at different times."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._pending: tuple | None = None  # (all-reduce handle, flag tensor) started at the previous step end
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        group = distributed.cpu_group()
        if group is None:  # one process: the signal is the decision
            flag = self.requested
        else:
            flag = False
            if self._pending is not None:
                work, tensor = self._pending
                work.wait()
                flag = bool(tensor.item())  # a CPU tensor: no device sync
            tensor = torch.tensor([int(self.requested)])
            self._pending = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group, async_op=True), tensor)
        if flag:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
