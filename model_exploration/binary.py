"""Binary-aware training (EQAT): learn embeddings whose sign bits retrieve well.

Training pushes the embedding through a surrogate of sign() inside the loss; inference needs nothing new: a
1-bit index is `encode(..., precision="ubinary")`, i.e. the sign of each dimension packed to bits, which is the
surrogate's inference-time output. So the trained model saves and loads as a plain SentenceTransformer folder.

Surrogates (`--bat MODE`), applied to the embedding scaled to unit RMS (so that beta means the same for any
embedding norm, e.g. after a Normalize module):
- ste:            sign(x) forward, gradient passed through unchanged (the original INDUS-SDE-ST-EQAT behaviour);
- clipped_ste:    sign(x) forward, gradient passed only where |x| <= 1 (the usual straight-through estimator);
- tanh:           tanh(x) while training (the original "Tanh" variant, binarized only at evaluation);
- annealed_tanh:  tanh(beta(step) * x) with beta annealed geometrically from beta_start to beta_end, so training
                  moves from the float problem to the binary one; a pure function of the global step (exact resume).
The loss is MNRL on the surrogate embeddings plus `float_weight` x MNRL on the float ones (keeps floats useful).
"""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from transformers import TrainerCallback

from model_exploration.losses import GatheredMNRLoss

MODES = ("ste", "clipped_ste", "tanh", "annealed_tanh")


def beta_at(step: int, beta_start: float, beta_end: float, anneal_steps: int) -> float:
    """Geometric interpolation beta_start -> beta_end over anneal_steps, constant afterwards."""
    progress = min(1.0, max(0, step) / max(1, anneal_steps))
    return beta_start * (beta_end / beta_start) ** progress


def _sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x > 0, else -1: the same threshold as ubinary packing (bit = x > 0)."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)


class _SignIdentityGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SignClippedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class BinarySurrogate(torch.nn.Module):
    """Differentiable stand-in for sign() in training; the exact sign (+1/-1) in eval mode."""

    def __init__(self, mode: str = "ste", beta_start: float = 1.0, beta_end: float = 20.0, anneal_steps: int = 1000):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"--bat: unknown mode {mode!r}; use one of {MODES}")
        self.mode = mode
        self.beta_start, self.beta_end, self.anneal_steps = beta_start, beta_end, anneal_steps
        self.step = 0

    @property
    def beta(self) -> float:
        if self.mode == "annealed_tanh":
            return beta_at(self.step, self.beta_start, self.beta_end, self.anneal_steps)
        return 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)  # unit RMS: sign unchanged
        if not self.training:
            return _sign(x)
        if self.mode == "ste":
            return _SignIdentityGrad.apply(x)
        if self.mode == "clipped_ste":
            return _SignClippedGrad.apply(x)
        return torch.tanh(self.beta * x)


class BinaryAwareMNRLoss(GatheredMNRLoss):
    """MultipleNegativesRankingLoss on sign-surrogate embeddings, so that the sign bits of the embeddings
    (`precision="ubinary"`) retrieve well, plus `float_weight` x the same loss on the float embeddings.

    Args:
        model: the SentenceTransformer being trained.
        surrogate: the differentiable stand-in for sign() (mode, beta schedule), see BinarySurrogate.
        float_weight: weight of the float-embedding MNRL added to the binary one (0: binary only).
        **kwargs: MultipleNegativesRankingLoss's (scale, similarity_fct, gather_across_devices).

    Inputs:
        (anchor, positive) pairs or (anchor, positive, negative) triplets, as MultipleNegativesRankingLoss.
    """

    def __init__(self, model, surrogate: BinarySurrogate, float_weight: float = 0.0, **kwargs):
        super().__init__(model, **kwargs)
        self.surrogate = surrogate
        self.float_weight = float_weight

    def get_config_dict(self) -> dict[str, Any]:
        """Recorded in the saved model card: which surrogate, which beta schedule, how much float loss."""
        surrogate = {"surrogate": self.surrogate.mode, "float_weight": self.float_weight}
        if self.surrogate.mode == "annealed_tanh":
            surrogate |= {"beta_start": self.surrogate.beta_start, "beta_end": self.surrogate.beta_end}
        return super().get_config_dict() | surrogate

    def forward(self, sentence_features, labels):
        embeddings = embed_columns(self.model, sentence_features)
        self.surrogate.train(self.model.training)
        loss = self.compute_loss_from_embeddings([self.surrogate(e) for e in embeddings], labels)
        if self.float_weight:
            loss = loss + self.float_weight * self.compute_loss_from_embeddings(embeddings, labels)
        return loss


class SurrogateStepCallback(TrainerCallback):
    """Keeps the surrogate's step equal to the trainer's global step (restored on resume) and sizes the beta
    anneal to `anneal_ratio` of the run's optimizer steps, which the trainer knows once training begins."""

    def __init__(self, surrogate: BinarySurrogate, anneal_ratio: float = 0.8):
        self.surrogate = surrogate
        self.anneal_ratio = anneal_ratio

    def on_train_begin(self, args, state, control, **kwargs):
        self.surrogate.anneal_steps = max(1, round(self.anneal_ratio * state.max_steps))

    def on_step_begin(self, args, state, control, **kwargs):
        self.surrogate.step = state.global_step
