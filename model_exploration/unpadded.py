"""Unpadded (packed) forward for BERT-family encoders: no FLOPs spent on padding tokens.

Why our own: sentence-transformers unpads only through flash-attention 2 (the `flash_attn` package or the `kernels`
hub download), which CPU runs and offline GPU nodes lack, and the stock BERT forward computes every padding
position of every layer: with a realistic length mix (queries ~20 tokens, passages lognormal up to 512) that is
most of the work.

`enable_unpadded(model)` replaces the forward of each BERT model inside a SentenceTransformer by one that packs
the real tokens of the batch into one [tokens, hidden] matrix (dense layers, LayerNorms and the FFN run on real
tokens only), runs attention per sequence, and scatters the last hidden state back to [batch, length, hidden] for
the usual pooling modules. The weights are the HF model's own parameters, so training updates them in place and
the model saves and loads as a normal SentenceTransformer. Attention, chosen by measurement:
- CUDA with bf16/fp16 inputs: `torch.nn.attention.varlen.varlen_attn` (flash attention over cu_seqlens), after a
  one-time forward + backward probe per device and dtype (a missing kernel falls back, logged with its message;
  out-of-memory and other device errors are raised, never taken for a missing kernel);
- anywhere else (CPU, fp32): scaled_dot_product_attention on sequences bucketed by length, each bucket padded
  only to its own longest. benchmarks/packed_attention.py on the 2-core CPU, passage length mix, fwd+bwd:
  padding the batch to its longest is 2.2x slower, one SDPA call per sequence 1.0-1.5x, nested (jagged)
  tensors 10-19x.
Semantic difference from the stock forward, on purpose: no dropout on attention probabilities (varlen_attn has no
dropout); hidden-state dropout is unchanged. Embeddings equal the stock model's within float tolerance (tested).
Host-device syncs: one per forward (the sequence lengths, which size the packed tensors); gradient checkpointing
(`--gradient_checkpointing`) recomputes each layer in backward, as the stock model does.
"""

from __future__ import annotations

import logging
import types
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput

from model_exploration.models import compute_dtype

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert",)
_varlen_usable: dict[tuple, bool] = {}  # (device, dtype) -> whether varlen_attn runs forward and backward there


def _varlen_attention(q, k, v, cu_seqlens, max_len: int):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)


def _is_resource_error(exc: BaseException) -> bool:
    """Errors of the device rather than of the kernel: out of memory, an illegal access... They must surface, not
    switch the process to the slower path for good (where they would strike again with a misleading trace)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, (torch.OutOfMemoryError, *((accelerator_error,) if accelerator_error else ()))) or (
        "out of memory" in str(exc).lower()
    )


def varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether varlen_attn works on this device and dtype, forward and backward, probed once per process on a tiny
    input (a kernel missing for this GPU or build fails there, not in the middle of a training step). A failure is
    logged with its message; device errors (out of memory, ...) are raised, not taken for a missing kernel."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
    key = (f"{device.type}:{index}", dtype)
    if key not in _varlen_usable:
        try:
            # the probe may run inside the first forward: of a no-grad or inference pass (GradCache's first pass,
            # encoding), or of a checkpointed layer; it needs its own autograd, untouched by theirs
            # and its random inputs must not advance the RNG that GradCache and checkpointing replay
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            ):
                q, k, v = (torch.randn(6, 2, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                cu = torch.tensor([0, 2, 6], device=device, dtype=torch.int32)
                _varlen_attention(q, k, v, cu, 4).float().sum().backward()
            _varlen_usable[key] = True
        except Exception as exc:  # noqa: BLE001 - anything but a device error means: no usable kernel here
            if _is_resource_error(exc):
                raise
            _varlen_usable[key] = False
            logger.warning("varlen_attn unusable on %s/%s (%s: %s); using bucketed SDPA", device, dtype,
                           type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")  # fmt: skip
    return _varlen_usable[key]


def length_buckets(lengths: list[int], waste: float = 0.125) -> list[list[int]]:
    """Indices of sequences grouped (longest first) so that padding each group to its longest wastes at most
    `waste` of its attention work (sum of len^2): few SDPA calls, little padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    work = 0  # sum of len^2 of the open bucket
    for i in order:
        if buckets and (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] ** 2 <= (1 + waste) * (work + lengths[i] ** 2):
            buckets[-1].append(i)
            work += lengths[i] ** 2
        else:
            buckets.append([i])
            work = lengths[i] ** 2
    return buckets


class PackedBatch:
    """Sequence boundaries of a packed batch. The fallback's bucket plan (token indices, key masks) is built once
    per forward and shared by all layers."""

    def __init__(self, lengths: list[int], cu_seqlens: torch.Tensor):
        self.lengths, self.cu_seqlens = lengths, cu_seqlens  # lengths on the host, cu_seqlens on the device
        self.max_len = max(lengths)
        self._plan: list[tuple] | None = None

    def bucket_plan(self, device: torch.device) -> list[tuple]:
        """Per bucket: (token indices, rows, longest, key mask or None, slots of real tokens or None)."""
        if self._plan is None:
            starts = [0] + list(accumulate(self.lengths))[:-1]
            self._plan = []
            for bucket in length_buckets(self.lengths):
                longest = self.lengths[bucket[0]]
                ranges = [torch.arange(starts[i], starts[i] + self.lengths[i]) for i in bucket]
                index = torch.cat(ranges).to(device)
                if all(self.lengths[i] == longest for i in bucket):
                    self._plan.append((index, len(bucket), longest, None, None))
                    continue
                mask = torch.arange(longest) < torch.tensor([self.lengths[i] for i in bucket])[:, None]
                slots = mask.flatten().nonzero().squeeze(1).to(device)
                self._plan.append((index, len(bucket), longest, mask.to(device), slots))
        return self._plan


def _bucketed_attention(q, k, v, batch: PackedBatch):
    """Attention of packed q/k/v [tokens, heads, dim], one SDPA call per bucket of similar lengths."""
    out = torch.empty_like(q)
    heads, dim = q.shape[1], q.shape[2]
    for index, rows, longest, mask, slots in batch.bucket_plan(q.device):
        if mask is None:  # equal lengths: a plain reshape, no padding
            qb, kb, vb = (t[index].view(rows, longest, heads, dim).transpose(1, 2) for t in (q, k, v))
            out[index] = F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(-1, heads, dim)
            continue
        padded = [
            t.new_zeros(rows * longest, heads, dim).index_copy(0, slots, t[index]).view(rows, longest, heads, dim)
            for t in (q, k, v)
        ]
        ob = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in padded), attn_mask=mask[:, None, None, :])
        out[index] = ob.transpose(1, 2).reshape(-1, heads, dim)[slots]
    return out


def packed_attention(q, k, v, batch: PackedBatch):
    """softmax(q k^T / sqrt(d)) v within each sequence of packed [tokens, heads, dim] tensors."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_usable(q.device, q.dtype):
        return _varlen_attention(q, k, v, batch.cu_seqlens, batch.max_len)
    return _bucketed_attention(q, k, v, batch)


def _layer_forward(layer, x, batch: PackedBatch, heads: int):
    attn = layer.attention.self
    tokens, hidden = x.shape
    weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
    bias = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
    q, k, v = F.linear(x, weight, bias).view(tokens, 3, heads, hidden // heads).unbind(1)  # one backward node
    context = packed_attention(q, k, v, batch).reshape(tokens, hidden)
    out = layer.attention.output
    x = out.LayerNorm(out.dropout(out.dense(context)) + x)
    h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
    out = layer.output
    return out.LayerNorm(out.dropout(out.dense(h)) + x)


def unpadded_bert_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
    """BertModel.forward on real tokens only; returns last_hidden_state as [batch, length, hidden] (zeros at pads)."""
    if input_ids is None or kwargs.get("inputs_embeds") is not None or kwargs.get("output_hidden_states"):
        return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids, **kwargs)  # fmt: skip
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    seq_lengths = mask.sum(1)
    lengths = seq_lengths.tolist()  # the forward's one host-device sync: sizes of what follows
    # positions of real tokens in the [batch * length] grid; its size is known, so no second sync
    slots = torch.nonzero_static(mask.flatten(), size=sum(lengths)).squeeze(1)
    cu_seqlens = F.pad(seq_lengths.cumsum(0, dtype=torch.int32), (1, 0))
    positions = (mask.long().cumsum(1) - 1).flatten()[slots]

    emb = self.embeddings
    x = emb.word_embeddings(input_ids.flatten()[slots]) + emb.position_embeddings(positions)
    types_ = token_type_ids.flatten()[slots] if token_type_ids is not None else torch.zeros_like(positions)
    x = emb.dropout(emb.LayerNorm(x + emb.token_type_embeddings(types_)))

    packed = PackedBatch(lengths, cu_seqlens)
    heads = self.config.num_attention_heads
    # transformers marks the encoder (or, in newer releases, each layer) when checkpointing is enabled
    recompute = self.training and any(
        getattr(m, "gradient_checkpointing", False) for m in (self.encoder, *self.encoder.layer)
    )
    for layer in self.encoder.layer:
        if recompute:  # --gradient_checkpointing: keep only layer inputs, recompute the rest in backward
            x = checkpoint(_layer_forward, layer, x, packed, heads, use_reentrant=False)
        else:
            x = _layer_forward(layer, x, packed, heads)
    hidden = x.new_zeros(batch * length, x.shape[-1]).index_copy(0, slots, x)
    return BaseModelOutput(last_hidden_state=hidden.view(batch, length, -1))


def enable_unpadded(model) -> int:
    """Switch every BERT transformer module of a SentenceTransformer to the unpadded forward. Returns how many
    were switched (0: architecture not supported, the stock forward stays, with a log line saying so)."""
    switched = 0
    for module in model.modules():
        inner = getattr(module, "auto_model", None)
        if inner is None or inner.__dict__.get("_stock_forward") is not None:
            continue
        config = getattr(inner, "config", None)
        model_type = getattr(config, "model_type", None)
        absolute = getattr(config, "position_embedding_type", "absolute") == "absolute"
        if model_type not in SUPPORTED_MODEL_TYPES or config.is_decoder or not absolute:
            logger.info("unpadded forward: %s is not supported; using the stock (padded) forward", model_type)
            continue
        inner._stock_forward = inner.forward
        inner.forward = types.MethodType(unpadded_bert_forward, inner)
        switched += 1
        device = next(inner.parameters()).device
        if device.type == "cuda":  # decided now, outside any forward, and logged once
            varlen_usable(device, compute_dtype(device))
    return switched
