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

Where the sign threshold sits (`--bat_center`, `--bat_rotation`): a calibration layer y = (x - mu) R inserted after
pooling (before Normalize, which does not change a sign), so each bit splits its dimension where the data does and
the bits are rotated to lose less in quantization:
- center `mean`:    mu = the mean pooled embedding, kept as an exponential moving average of the training batches
                    (all ranks average the same batch means, so every rank holds the same mu);
- center `learned`: mu starts at the mean of a sample of training texts and is trained with the model;
- rotation `random`: R a seeded random orthogonal matrix (spreads variance evenly over dimensions);
- rotation `itq`:   R from iterative quantization (Gong & Lazebnik, 2011) on a sample of centered training
                    embeddings: alternately B = sign(V R) and R = the orthogonal Procrustes solution of V R ~ B;
                    fixed during training.
The layer is sentence-transformers' own Dense module (weight R^T, bias -mu R, no activation), so the saved model is
still a plain SentenceTransformer folder and `encode(precision="ubinary")` gives the trained bits in one call.
R is orthogonal: float cosine scores change only by the centering.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from transformers import TrainerCallback

from model_exploration import distributed
from model_exploration.losses import GatheredMNRLoss

logger = logging.getLogger(__name__)

MODES = ("ste", "clipped_ste", "tanh", "annealed_tanh")
CENTERS = ("none", "mean", "learned")
ROTATIONS = ("none", "random", "itq")


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
        asymmetric: binarize the documents only (positives, negatives) and score float queries against them: the
            loss of asymmetric search (float query, 1-bit index) rather than of Hamming search.
        **kwargs: MultipleNegativesRankingLoss's (scale, similarity_fct, gather_across_devices).

    Inputs:
        (anchor, positive) pairs or (anchor, positive, negative) triplets, as MultipleNegativesRankingLoss.
    """

    def __init__(
        self, model, surrogate: BinarySurrogate, float_weight: float = 0.0, asymmetric: bool = False, **kwargs
    ):
        super().__init__(model, **kwargs)
        self.surrogate = surrogate
        self.float_weight = float_weight
        self.asymmetric = asymmetric

    def get_config_dict(self) -> dict[str, Any]:
        """Recorded in the saved model card: which surrogate, which beta schedule, how much float loss."""
        surrogate = {"surrogate": self.surrogate.mode, "float_weight": self.float_weight, "asymmetric": self.asymmetric}
        if self.surrogate.mode == "annealed_tanh":
            surrogate |= {"beta_start": self.surrogate.beta_start, "beta_end": self.surrogate.beta_end}
        return super().get_config_dict() | surrogate

    def forward(self, sentence_features, labels):
        embeddings = embed_columns(self.model, sentence_features)
        self.surrogate.train(self.model.training)
        # asymmetric: the queries (first column) stay float, as asymmetric search scores them against 1-bit documents
        binarized = [e if self.asymmetric and i == 0 else self.surrogate(e) for i, e in enumerate(embeddings)]
        loss = self.compute_loss_from_embeddings(binarized, labels)
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


# ---------------------------------------------------------------- calibration: where the sign threshold sits


def itq_rotation(v: torch.Tensor, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Orthogonal R minimising ||sign(V R) - V R||_F over centered embeddings V [n, d] (ITQ): alternately the bits
    B = sign(V R) for a fixed R, and the Procrustes solution R = U W^T of V^T B = U S W^T for fixed bits."""
    r = random_rotation(v.shape[1], seed)
    v = v.double()
    for _ in range(iterations):
        b = _sign(v @ r.double())
        u, _, wt = torch.linalg.svd(v.T @ b)
        r = (u @ wt).float()
    return r


def random_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthogonal matrix (QR of a Gaussian matrix, signs fixed so the draw is uniform)."""
    gaussian = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()


def calibration_point(model) -> int:
    """Index of the module after which pooled embeddings exist (Pooling), where the calibration layer goes."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    for i, module in enumerate(model):
        if isinstance(module, Pooling):
            return i + 1
    raise ValueError("binary calibration: the model has no Pooling module to put the calibration after")


@torch.no_grad()
def pooled_embeddings(model, texts: list[str], batch_size: int = 64, prompts: list[str] | None = None) -> torch.Tensor:
    """Embeddings as the calibration layer receives them: the modules up to and including Pooling. `prompts`: each
    text's prompt ("" = none), applied as in training (sentence-transformers' preprocess: the prompt and its
    prompt_length)."""
    upto = calibration_point(model)
    model.eval()
    prompts = prompts or [""] * len(texts)
    parts, order = [], []
    for prompt in dict.fromkeys(prompts):  # one run of batches per prompt, then back to the texts' order
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            features = model.preprocess([texts[i] for i in batch], prompt=prompt or None)
            features = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in features.items()}
            for module in list(model)[:upto]:
                features = module(features)
            parts.append(features["sentence_embedding"].float().cpu())
            order += batch
    return torch.cat(parts)[torch.argsort(torch.tensor(order))]


class CenterTracker:
    """`--bat_center mean`: an exponential moving average of the pooled embeddings of training batches, written into
    the calibration layer's bias (bias = -mu R) before each forward of the layer. Batch means are averaged over ranks
    (all-reduce), so every rank's model stays identical without DDP having to sync a parameter it does not train."""

    def __init__(self, layer, momentum: float = 0.01):
        self.layer, self.momentum = layer, momentum
        self.handle = layer.register_forward_pre_hook(self.update)

    @torch.no_grad()
    def update(self, module, args):
        if not module.training:
            return
        x = args[0]["sentence_embedding"].detach().float()
        batch_mean = x.mean(0)
        if distributed.world_size() > 1:
            torch.distributed.all_reduce(batch_mean)
            batch_mean /= distributed.world_size()
        rotation = module.linear.weight.T  # R, [d, d]
        mu = -module.linear.bias.float() @ rotation.T  # bias = -mu R  =>  mu = -bias R^T
        mu = (1 - self.momentum) * mu + self.momentum * batch_mean
        module.linear.bias.copy_((-mu @ rotation).to(module.linear.bias.dtype))


def calibration_texts(
    train_sets, rows: int, seed: int, prompts: list[dict[str, str]] | None = None
) -> tuple[list[str], list[str]]:
    """A seeded sample of about `rows` training pairs spread evenly over the sources: their anchors and positives
    (queries and passages both cross the calibration layer), and the prompt each is trained with (`prompts`: each
    source's column -> prompt; model_exploration/prompts.py)."""
    rng = random.Random(seed)
    per_source = -(-rows // max(1, len(train_sets)))
    texts: list[str] = []
    text_prompts: list[str] = []
    for train, columns in zip(train_sets, prompts or [{}] * len(train_sets)):
        picks = sorted(rng.sample(range(len(train)), min(per_source, len(train))))
        chosen = train.select(picks)
        for column in ("anchor", "positive"):
            texts += list(chosen[column])
            text_prompts += [columns.get(column, "")] * len(chosen)
    return texts, text_prompts


def add_calibration(
    model, texts: list[str], center: str, rotation: str, seed: int = 0, prompts: list[str] | None = None
):
    """Insert the calibration layer y = (x - mu) R after Pooling, fitted on `texts` (a sample of training texts
    embedded with their `prompts`, the same on every rank: rank 0 computes it and broadcasts). Returns (layer,
    CenterTracker or None)."""
    from sentence_transformers.sentence_transformer.modules import Dense

    if center not in CENTERS or rotation not in ROTATIONS:
        raise ValueError(f"calibration: center {center!r} / rotation {rotation!r}; use one of {CENTERS} / {ROTATIONS}")
    fitted = None
    if distributed.is_main_process():
        pooled = pooled_embeddings(model, texts, prompts=prompts)
        mu = pooled.mean(0) if center != "none" else torch.zeros(pooled.shape[1])
        if rotation == "itq":
            r = itq_rotation(pooled - mu, seed=seed)
        elif rotation == "random":
            r = random_rotation(pooled.shape[1], seed)
        else:
            r = torch.eye(pooled.shape[1])
        fitted = (mu, r)
    mu, r = distributed.broadcast_object(fitted)
    dim = r.shape[0]
    layer = Dense(dim, dim, bias=True, activation_function=None, init_weight=r.T.contiguous(),
                  init_bias=(-mu @ r).contiguous())  # fmt: skip
    layer.linear.weight.requires_grad_(False)  # R stays orthogonal: fixed after fitting
    layer.linear.bias.requires_grad_(center == "learned")
    layer.to(model.device)
    model.insert(calibration_point(model), layer)
    logger.info("binary calibration after pooling: center=%s rotation=%s (fitted on %d texts)", center, rotation,
                len(texts))  # fmt: skip
    return layer, CenterTracker(layer) if center == "mean" else None
