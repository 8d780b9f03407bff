"""Model FLOPs on real tokens and the device's measured matmul peak, for tokens/s -> TFLOP/s -> MFU.

Counted as in the PaLM/nanoGPT convention: every weight matrix of the encoder costs 2 FLOPs per multiply-add per
real (non-padding) token in the forward pass and twice that in the backward; attention scores and the weighted sum
cost 4 * hidden per attended (query, key) pair and layer in the forward pass: len^2 per sequence for global
attention, fewer for ModernBERT's sliding-window layers (|i - j| <= window). Padding, embedding lookups and
recomputation (GradCache's second forward) are not model FLOPs, so MFU measures useful work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from model_exploration.models import compute_dtype


def windowed_pairs(lengths: torch.Tensor, window: int) -> torch.Tensor:
    """(query, key) pairs with |i - j| <= window inside sequences of these lengths, summed: L^2 up to L = window + 1,
    then L (2 window + 1) - window (window + 1)."""
    lengths = lengths.double()
    return torch.where(
        lengths <= window + 1, lengths.square(), lengths * (2 * window + 1) - window * (window + 1)
    ).sum()


@dataclass(frozen=True)
class EncoderFlops:
    dense_params: int  # weights of the encoder's linear layers (embeddings and pooler excluded)
    layers: int
    hidden: int
    windowed_layers: int = 0  # of `layers`, those attending within a sliding window (ModernBERT's local layers)
    window: int | None = None  # their half-window: keys with |i - j| <= window

    @classmethod
    def of(cls, model: torch.nn.Module) -> EncoderFlops:
        dense = sum(
            m.weight.numel()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "pooler" not in name
        )
        config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
        windowed = sum(t == "sliding_attention" for t in getattr(config, "layer_types", None) or ())
        return cls(dense, getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0), windowed,
                   config.sliding_window if windowed else None)  # fmt: skip

    def forward(self, real_tokens: float, sum_sq_lengths: float, sum_windowed_pairs: float | None = None) -> float:
        windowed = sum_sq_lengths if sum_windowed_pairs is None else sum_windowed_pairs
        pairs = (self.layers - self.windowed_layers) * sum_sq_lengths + self.windowed_layers * windowed
        return 2 * self.dense_params * real_tokens + 4 * self.hidden * pairs

    def forward_of(self, lengths: torch.Tensor) -> float:
        """Forward FLOPs of sequences with these real lengths."""
        lengths = torch.as_tensor(lengths).double()
        windowed = windowed_pairs(lengths, self.window).item() if self.window is not None else None
        return self.forward(lengths.sum().item(), lengths.square().sum().item(), windowed)

    def train(self, real_tokens: float, sum_sq_lengths: float, sum_windowed_pairs: float | None = None) -> float:
        return 3 * self.forward(real_tokens, sum_sq_lengths, sum_windowed_pairs)


class Counts(NamedTuple):
    """What TokenCounter.read() returns: pairs, real tokens, sum of squared lengths, sum of windowed attention
    pairs (equal to the squares without a window), padded positions."""

    pairs: float
    real: float
    sum_sq: float
    sum_windowed: float
    padded: float


def training_rates(
    counts: Counts, elapsed: float, flops: EncoderFlops, peak_flops: float, world: int = 1
) -> dict[str, float]:
    """pairs/s and real tokens/s (all ranks: this rank's x world size, ranks run the same steps), the padding share
    of the batch tensors, model TFLOP/s per device and MFU, from TokenCounter.read()'s counts over `elapsed` s."""
    pairs, real, sum_sq, sum_windowed, padded = counts
    flops_per_s = flops.train(real, sum_sq, sum_windowed) / elapsed
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
