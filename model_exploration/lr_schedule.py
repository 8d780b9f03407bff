"""The custom learning-rate schedule, a pure function of the optimizer step (so resume is exact).

    warmup:  lr(s) = lr_max * s / W                                   for s < W
    after:   base(s) = lr_max + (lr_min - lr_max) * min(1, (s - W) / (T - W))
             lr(s)   = max(0, base(s) * (1 + f * cos(2*pi * ((s - W) mod C) / C)))

W = warmup steps, T = total steps, C = ripple cycle, f = ripple magnitude (fraction of the base LR).
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def custom_lr(
    step: int,
    *,
    lr_max: float,
    lr_min: float,
    warmup_steps: int,
    total_steps: int,
    cycle_steps: int,
    magnitude_fraction: float,
) -> float:
    if step < warmup_steps:
        return lr_max * step / warmup_steps
    since_warmup = step - warmup_steps
    decay_progress = min(1.0, since_warmup / max(1, total_steps - warmup_steps))
    base = lr_max + (lr_min - lr_max) * decay_progress
    ripple = 1.0 + magnitude_fraction * math.cos(2 * math.pi * (since_warmup % cycle_steps) / cycle_steps)
    return max(0.0, base * ripple)


def _multiplier(step: int, lr_max: float, **kwargs) -> float:
    return custom_lr(step, lr_max=lr_max, **kwargs) / lr_max


def custom_lr_scheduler(optimizer: Optimizer, *, lr_max: float, **kwargs) -> LambdaLR:
    """A LambdaLR over `custom_lr`; a partial (not a lambda) so the scheduler state can be pickled."""
    return LambdaLR(optimizer, functools.partial(_multiplier, lr_max=lr_max, **kwargs))
