"""Value checks of the unpadded path's attention: what the GPU check runs before any timing, and what the tests plant
errors into.

Why not compare model outputs of a random init: there the residual stream dominates and the attention is nearly
uniform, so a sliding window made global, a window off by 2x, a wrong softmax scale or swapped rotary bases all move
the embeddings by less than bf16 noise (a ModernBERT with its sliding layers made global gave min cosine 0.99996).

- `check_kernels`: the attention kernels themselves on one packed batch (lengths 300, 129, 65, 64, 1; q and k scaled
  so the softmax is peaked), with and without a 64-token window: outputs and q/k/v gradients of varlen_attn (CUDA,
  bf16/fp16), of the bucketed SDPA path, each against a dense fp32 reference computed per sequence with an
  explicit softmax on the same input values.
- `check_model`: a model whose attention matters (query/key weights scaled so each head attends sharply, the
  attention's output projection scaled so it weighs as much as the residual) through its stock and its unpadded
  forward, in the training dtype: token states of every real token, the MNRL loss and the gradients against the
  stock forward in fp32; the unpadded error may be at most a few times the stock forward's own error in that dtype
  (its noise), never more. Planting any of the errors above fails it (tests/test_attention_check.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from model_exploration import unpadded

KERNEL_LENGTHS = (300, 129, 65, 64, 1)
LOGIT_SCALE = 6.0  # std of q.k/sqrt(d) for unit-normal q, k is 1: x6 makes each query attend to a few keys
# relative errors allowed against the fp32 reference: accumulation order in fp32; rounding in bf16/fp16
KERNEL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# check_model: the unpadded error may be this many times the stock forward's own error in the same dtype, and at
# least the floor (in fp32 the stock forward's error against itself is zero)
NOISE_FACTOR, FP32_FLOOR = 4.0, 1e-4


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)).item()


def dense_reference(q, k, v, lengths: list[int], window: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per sequence of packed [tokens, heads, dim] tensors, in fp32, keys within
    |i - j| <= window when given: the definition, with nothing fused or bucketed."""
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))  # [heads, n, dim]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if window is not None:
            position = torch.arange(n, device=q.device)
            scores = scores.masked_fill((position[:, None] - position[None, :]).abs() > window, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def kernel_batch(device, dtype, heads: int = 4, dim: int = 64, lengths=KERNEL_LENGTHS, seed: int = 0):
    """(q, k, v, upstream gradient, PackedBatch): a packed batch with peaked attention, in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    scale = math.sqrt(LOGIT_SCALE)
    q, k = (torch.randn(tokens, heads, dim, generator=generator) * scale for _ in range(2))
    v, grad = (torch.randn(tokens, heads, dim, generator=generator) for _ in range(2))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    batch = unpadded.PackedBatch(list(lengths), cu_seqlens)
    return (*(t.to(device=device, dtype=dtype) for t in (q, k, v, grad)), batch)


def _outputs_and_grads(attention: Callable, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def kernels_to_check(device: torch.device, dtype: torch.dtype, windowed: bool) -> dict[str, Callable]:
    """name -> attention(q, k, v, batch, window) of the kernels the unpadded path may use here."""
    kernels = {"bucketed": unpadded._bucketed_attention}
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and unpadded.varlen_usable(device, dtype, windowed)
    ):
        kernels["varlen"] = lambda q, k, v, batch, window: unpadded._varlen_attention(
            q, k, v, batch.cu_seqlens, batch.max_len, window
        )
    return kernels


def check_kernels(device, dtype, windows=(None, 64), kernels: dict[str, Callable] | None = None) -> dict:
    """Every attention kernel of the unpadded path against the dense fp32 reference, on the same peaked packed
    batch: {"<kernel> window=<w>": {"out": rel, "dq": rel, "dk": rel, "dv": rel}, ..., "failures": [...]}.
    `kernels`: name -> attention(q, k, v, batch, window) to check instead of the path's own (tests plant errors)."""
    device, report, failures = torch.device(device), {}, []
    tolerance = KERNEL_TOLERANCE[dtype]
    q, k, v, grad, batch = kernel_batch(device, dtype)
    for window in windows:
        reference = _outputs_and_grads(
            lambda a, b, c, w=window: dense_reference(a, b, c, batch.lengths, w), *(t.float() for t in (q, k, v, grad))
        )
        for name, attention in (kernels or kernels_to_check(device, dtype, window is not None)).items():
            got = _outputs_and_grads(lambda a, b, c, f=attention, w=window: f(a, b, c, batch, w), q, k, v, grad)
            errors = {key: relative_error(x, r) for key, x, r in zip(("out", "dq", "dk", "dv"), got, reference)}
            report[f"{name} window={window}"] = errors
            failures += [f"{name} window={window}: {key} relative error {e:.2e} > {tolerance:.0e}"
                         for key, e in errors.items() if not e <= tolerance]  # fmt: skip
    return report | {"failures": failures}


# ---------------------------------------------------------------- whole models


def _attention_projections(layer, model_type: str):
    """(query/key weights and biases to sharpen: (tensor, rows or None), output projection) of one layer."""
    if model_type == "modernbert":
        hidden = layer.attn.Wqkv.weight.shape[1]
        return [(layer.attn.Wqkv.weight, slice(0, 2 * hidden))], layer.attn.Wo
    attention = layer.attention.attn if model_type == "mpnet" else layer.attention.self
    q, k = (attention.q, attention.k) if model_type == "mpnet" else (attention.query, attention.key)
    sharpen = [(p, None) for p in (q.weight, q.bias, k.weight, k.bias) if p is not None]
    out = attention.o if model_type == "mpnet" else layer.attention.output.dense
    return sharpen, out


@torch.no_grad()
def make_attention_matter(model, logit_scale: float = LOGIT_SCALE, output_scale: float = 10.0) -> None:
    """In place: each query/key projection scaled so that q.k/sqrt(d) has about `logit_scale` std (a head
    attends to a few keys), each attention output projection by `output_scale` (the attention weighs about as much
    as the residual stream), and MPNet's relative-position bias to a std of sqrt(logit_scale) (at its init, 0.02,
    dropping it changes nothing visible in bf16)."""
    inner = model[0].auto_model
    model_type = inner.config.model_type
    if model_type == "mpnet":
        bias = inner.encoder.relative_attention_bias.weight
        bias.mul_(math.sqrt(logit_scale) / bias.float().std().clamp_min(1e-8))
    layers = inner.layers if model_type == "modernbert" else inner.encoder.layer
    for layer in layers:
        sharpen, out = _attention_projections(layer, model_type)
        weight, rows = sharpen[0]
        current = weight[rows] if rows is not None else weight
        # unit-variance inputs: each q (and k) component has std ~ ||row|| ~ sqrt(hidden) * weight std
        std = current.float().std().item() * math.sqrt(current.shape[1])
        factor = math.sqrt(logit_scale) / max(std, 1e-8)
        for tensor, rows in sharpen:
            if rows is None:
                tensor.mul_(factor)
            else:
                tensor[rows] *= factor
        out.weight.mul_(output_scale)


def model_batch(model, lengths=KERNEL_LENGTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token ids of `lengths` (capped at the model's max_seq_length), never a special id (the
    RoBERTa family derives positions from the padding id)."""
    tokenizer, device = model.tokenizer, model.device
    lengths = [min(n, model.max_seq_length) for n in lengths]
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(tokenizer.all_special_ids)
    ordinary = torch.arange(len(tokenizer))[~torch.isin(torch.arange(len(tokenizer)), special)]
    ids = torch.full((len(lengths), max(lengths)), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = ordinary[torch.randint(len(ordinary), (n,), generator=generator)]
        mask[row, :n] = 1
    features = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in model.tokenizer.model_input_names:
        features["token_type_ids"] = torch.zeros_like(ids)
    return {k: v.to(device) for k, v in features.items()}


def _forward(model, features, dtype: torch.dtype):
    """(token states of real tokens, MNRL loss, flat gradient) of one forward/backward under autocast(dtype)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model.zero_grad()
    device = model.device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(dict(features))
        # queries = every sequence, passages = the same sequences rolled by one: a loss that depends on them all
        rolled = {k: v.roll(1, 0) for k, v in features.items()}
        loss = MultipleNegativesRankingLoss(model)([dict(features), rolled], None)
    loss.backward()
    real = features["attention_mask"].bool()
    states = out["token_embeddings"][real].float().detach()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                       for p in model.parameters() if p.requires_grad])  # fmt: skip
    return states, loss.detach().float(), grads


def check_model(model, dtype: torch.dtype, lengths=KERNEL_LENGTHS) -> dict:
    """Stock vs unpadded forward of a copy of `model` whose attention matters (make_attention_matter), in eval mode
    (no dropout): relative errors of token states, loss and gradients against the stock forward in fp32, for the
    stock and the unpadded forward in `dtype`; {"stock": {...}, "unpadded": {...}, "failures": [...]}."""
    stock = copy.deepcopy(model).eval()
    make_attention_matter(stock)
    fast = copy.deepcopy(stock)
    if not unpadded.enable_unpadded(fast):
        raise ValueError(f"{stock[0].auto_model.config.model_type}: no unpadded forward to check")
    features = model_batch(stock, lengths)
    reference = _forward(stock, features, torch.float32)
    report, failures = {}, []
    for name, candidate in (("stock", stock), ("unpadded", fast)):
        got = _forward(candidate, features, dtype)
        report[name] = {key: relative_error(x, r) for key, x, r in zip(("states", "loss", "grads"), got, reference)}
    for key, error in report["unpadded"].items():
        bound = max(NOISE_FACTOR * report["stock"][key], FP32_FLOOR)
        if not error <= bound:
            failures.append(f"{key}: unpadded relative error {error:.2e} > {bound:.2e} ({NOISE_FACTOR:g}x the stock "
                            f"forward's own {report['stock'][key]:.2e} in {str(dtype).removeprefix('torch.')})")  # fmt: skip
    return report | {"failures": failures}
