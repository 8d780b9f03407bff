"""Model FLOPs on real tokens and the device's measured matmul peak, for tokens/s -> TFLOP/s -> MFU.

Counted as in the PaLM/nanoGPT convention: every weight matrix of the encoder costs 2 FLOPs per multiply-add per
real (non-padding) token in the forward pass and twice that in the backward; attention scores and the weighted sum
cost 4 * hidden * len^2 per layer and sequence in the forward pass. Padding, embedding lookups and recomputation
(GradCache's second forward) are not model FLOPs, so MFU measures useful work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model_exploration.models import compute_dtype


@dataclass(frozen=True)
class EncoderFlops:
    dense_params: int  # weights of the encoder's linear layers (embeddings and pooler excluded)
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> EncoderFlops:
        dense = sum(
            m.weight.numel()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "pooler" not in name
        )
        config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
        return cls(dense, getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0))

    def forward(self, real_tokens: float, sum_sq_lengths: float) -> float:
        return 2 * self.dense_params * real_tokens + 4 * self.layers * self.hidden * sum_sq_lengths

    def train(self, real_tokens: float, sum_sq_lengths: float) -> float:
        return 3 * self.forward(real_tokens, sum_sq_lengths)


def training_rates(
    counts: tuple[float, float, float, float], elapsed: float, flops: EncoderFlops, peak_flops: float, world: int = 1
) -> dict[str, float]:
    """pairs/s and real tokens/s (all ranks: this rank's x world size, ranks run the same steps), the padding share
    of the batch tensors, model TFLOP/s per device and MFU, from TokenCounter.read()'s counts over `elapsed` s."""
    pairs, real, sum_sq, padded = counts
    flops_per_s = flops.train(real, sum_sq) / elapsed
    return {
        "pairs_per_s": pairs * world / elapsed,
        "tokens_per_s": real * world / elapsed,
        "padding_share": 1 - real / max(1.0, padded),
        "model_tflops_per_device": flops_per_s / 1e12,
        "mfu": flops_per_s / peak_flops,
    }


def matmul_peak_flops(device: torch.device, dtype: torch.dtype | None = None, size: int | None = None) -> float:
    """Best FLOP/s of a square matmul on `device` in `dtype` (default: the training dtype): the MFU denominator,
    measured rather than taken from a spec sheet, so clocks, power caps and CPU cores are accounted for."""
    dtype = dtype or compute_dtype(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    calls = 10 if cuda else 1  # per timing: GPU launches are asynchronous, so time a run of them
    best = float("inf")
    for _ in range(4 if cuda else 10):  # best of many short CPU runs: a busy core early on must not set the peak
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * size**3 / best
