"""Unpadded (packed) forwards for the encoders this workflow trains: no FLOPs spent on padding tokens.

Why our own: sentence-transformers unpads only through flash-attention 2 (the `flash_attn` package or the `kernels`
hub download), which CPU runs and offline GPU nodes lack, and the stock forwards compute every padding position of
every layer: with a realistic length mix (queries ~20 tokens, passages lognormal up to 512) that is most of the work.

`enable_unpadded(model)` replaces the forward of each supported transformer inside a SentenceTransformer by one that
packs the real tokens of the batch into one [tokens, hidden] matrix (dense layers, norms and the FFN run on real
tokens only), runs attention per sequence, and scatters the last hidden state back to [batch, length, hidden] for
the usual pooling modules. The weights are the HF model's own parameters, so training updates them in place and the
model saves and loads as a normal SentenceTransformer. Supported, each equal to its stock forward (tested):
- BERT and the RoBERTa family (`roberta`, `xlm-roberta`, `camembert`: INDUS, INDUS-SDE, XLM-R, multilingual-e5):
  one forward; RoBERTa's learned positions start at padding_idx + 1, so its usable length is
  max_position_embeddings - (padding_idx + 1) (models.usable_max_len);
- MPNet (all-mpnet-base-v2): the same post-LayerNorm layers plus a relative-position bias shared by all layers, added
  to the attention scores (so its attention always runs on length buckets, never varlen_attn, which takes no bias);
- ModernBERT: pre-LayerNorm layers with fused Wqkv, rotary embeddings (one base for global and one for
  sliding-window layers), a GLU MLP and a final norm; sliding-window layers attend within |i - j| <= local_attention/2.
Anything else keeps its stock forward, with a WARNING naming the model type (the run then pays for padding).
Attention, chosen by measurement:
- CUDA with bf16/fp16 inputs: `torch.nn.attention.varlen.varlen_attn` (flash attention over cu_seqlens; sliding
  windows through its `window_size`), after a one-time forward + backward probe per device, dtype and window use (a
  missing kernel image or argument falls back, logged with its message; out-of-memory and other device errors are
  raised, never taken for a missing kernel);
- anywhere else (CPU, fp32), and for a score bias: scaled_dot_product_attention on sequences bucketed by length, each
  bucket padded only to its own longest, with a band mask for sliding windows. benchmarks/packed_attention.py on the
  2-core CPU, passage length mix, fwd+bwd: padding the batch to its longest is 2.2x slower, one SDPA call per
  sequence 1.0-1.5x, nested (jagged) tensors 10-19x.
Semantic difference from the stock forwards, on purpose: no dropout on attention probabilities (varlen_attn has no
dropout); hidden-state dropout is unchanged. Host-device syncs: none when the batch carries the lengths our collators
count on the host (`HOST_LENGTHS`: the pre-tokenized training collator, encode_fast), else one per forward (the
lengths, which size the packed tensors); masks, slots and position biases are built on the device. Gradient
checkpointing (`--gradient_checkpointing`) recomputes each layer in backward, as the stock model does.
"""

from __future__ import annotations

import logging
import types
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput

from model_exploration.models import ROBERTA_FAMILY, compute_dtype, position_offset, usable_max_len

logger = logging.getLogger(__name__)

BERT_FAMILY = ("bert", *ROBERTA_FAMILY)
# Feature key of each row's real-token count, counted by our collators on the host (pretokenize.py, encoding.py):
# with it a forward needs no host-device sync to size its packed tensors.
HOST_LENGTHS = "host_lengths"
SUPPORTED_MODEL_TYPES = (*BERT_FAMILY, "mpnet", "modernbert")
# (device, dtype, windowed) -> whether varlen_attn runs forward and backward there (with window_size if windowed)
_varlen_usable: dict[tuple, bool] = {}


def _varlen_attention(q, k, v, cu_seqlens, max_len: int, window: int | None = None):
    from torch.nn.attention.varlen import varlen_attn

    if window is None:  # no window argument at all: torch builds without it still run full attention
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=(window, window))


# CUDA errors that mean "this kernel does not exist for this GPU / build": the bucketed path can run instead.
# Anything else the device raises (out of memory, an illegal access, a device-side assert, a launch failure) is a
# fault of the device or of the inputs: it must surface, not switch the process to the slower path for good (where
# it would strike again with a misleading trace).
MISSING_KERNEL_MESSAGES = (
    "no kernel image is available",
    "invalid device function",
    "named symbol not found",
    "not compiled for",
    "unsupported gpu architecture",
)


def device_error_kind(exc: BaseException) -> str:
    """'resource' (out of memory: retry smaller), 'device' (any other device fault: raise), 'missing_kernel' (fall
    back to another kernel, with a warning) or 'other' (an error of the call itself: a missing argument, an
    unsupported dtype... also a fallback)."""
    message = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in message:
        return "resource"
    if any(m in message for m in MISSING_KERNEL_MESSAGES):
        return "missing_kernel"
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):
        return "device"
    return "other"


def varlen_usable(device: torch.device, dtype: torch.dtype, windowed: bool = False) -> bool:
    """Whether varlen_attn works on this device and dtype (with a sliding window if `windowed`), forward and
    backward, probed once per process on a tiny input (a kernel missing for this GPU or build fails there, not in the
    middle of a training step). A failure is logged with its message; device errors (out of memory, ...) are raised,
    not taken for a missing kernel."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
    key = (f"{device.type}:{index}", dtype, windowed)
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
                _varlen_attention(q, k, v, cu, 4, 1 if windowed else None).float().sum().backward()
            _varlen_usable[key] = True
        except Exception as exc:  # noqa: BLE001 - anything but a device error means: no usable kernel here
            if device_error_kind(exc) in ("resource", "device"):
                raise
            _varlen_usable[key] = False
            logger.warning("varlen_attn%s unusable on %s/%s (%s: %s); using bucketed SDPA",
                           " with a sliding window" if windowed else "", device, dtype, type(exc).__name__,
                           str(exc).splitlines()[0][:200] if str(exc) else "")  # fmt: skip
    return _varlen_usable[key]


def probed_kernels() -> dict[str, bool]:
    """What the varlen probes found so far in this process ("cuda:0/bfloat16[/windowed]" -> usable)."""
    return {
        f"{d}/{str(t).removeprefix('torch.')}{'/windowed' if w else ''}": v for (d, t, w), v in _varlen_usable.items()
    }


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
    """Sequence boundaries of a packed batch whose sequences are in descending length order (as _pack lays them
    out), so that each length bucket is a contiguous run of tokens: the bucketed attention slices its inputs
    instead of gathering them. The bucket plan (token ranges, masks) is built once per forward and shared by all
    layers, on the device from the lengths already there (`device_lengths`): a mask built on the host and copied
    from pageable memory would be a host-device sync per bucket. `score_bias`: MPNet's relative-position bias,
    [heads, n, n] per bucket length n, computed before the layers (outside any checkpointed region, as it carries
    gradients)."""

    def __init__(
        self,
        lengths: list[int],
        cu_seqlens: torch.Tensor,
        score_bias: dict | None = None,
        device_lengths: torch.Tensor | None = None,
    ):
        if any(a < b for a, b in zip(lengths, lengths[1:])):
            raise ValueError("PackedBatch: sequences must be packed longest first")
        self.lengths, self.cu_seqlens = lengths, cu_seqlens  # lengths on the host, cu_seqlens on the device
        # the same lengths on the device (packed order); derived from cu_seqlens when not given
        self.device_lengths = cu_seqlens.diff() if device_lengths is None else device_lengths
        self.max_len = lengths[0]
        self.score_bias = score_bias
        self._plan: list[tuple] | None = None
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def bucket_lengths(self) -> set[int]:
        return {self.lengths[b[0]] for b in length_buckets(self.lengths)}

    def bucket_plan(self) -> list[tuple]:
        """Per bucket: (first token, end token, rows, longest, real-token mask [rows, longest] or None if all rows
        are full, slots of the real tokens in the [rows * longest] grid or None), tensors on the batch's device."""
        if self._plan is None:
            starts = [0, *accumulate(self.lengths)]
            self._plan = []
            for bucket in length_buckets(self.lengths):  # consecutive indices: the lengths are sorted
                longest, first, last = self.lengths[bucket[0]], bucket[0], bucket[-1]
                span = (starts[first], starts[last + 1], len(bucket), longest)
                if self.lengths[last] == longest:
                    self._plan.append((*span, None, None))
                    continue
                position = torch.arange(longest, device=self.device_lengths.device)
                mask = position < self.device_lengths[first : last + 1, None]
                # the real tokens' count is known on the host: nonzero_static needs no sync to size its output
                slots = mask.flatten().nonzero_static(size=span[1] - span[0]).squeeze(1)
                self._plan.append((*span, mask, slots))
        return self._plan

    def attention_mask(self, bucket: int, real: torch.Tensor | None, longest: int, window: int | None, dtype):
        """SDPA's attn_mask for one bucket: keys that are real tokens and within the window (boolean, built once per
        forward), plus the score bias (added per call: a cached tensor with a graph would break recomputation). A
        padding query row may see every real key: its output is dropped, and a row without keys would be NaN,
        whose backward poisons the real keys' gradients."""
        key = (bucket, window)
        if key not in self._masks:
            mask = None if real is None else real[:, None, None, :]  # [rows, 1, 1, keys]
            if window is not None and longest > window + 1:
                position = torch.arange(longest, device=self.cu_seqlens.device)
                band = ((position[:, None] - position[None, :]).abs() <= window)[None, None]
                mask = band if real is None else mask & (band | ~real[:, None, :, None])
            self._masks[key] = mask
        mask = self._masks[key]
        if self.score_bias is None:
            return mask
        bias = self.score_bias[longest].to(dtype)[None]  # [1, heads, queries, keys]
        return bias if mask is None else torch.where(mask, bias, torch.finfo(dtype).min)


def _bucketed_attention(q, k, v, batch: PackedBatch, window: int | None = None):
    """Attention of packed q/k/v [tokens, heads, dim], one SDPA call per bucket of similar lengths. Inputs are cut
    with one split and the output joined with one cat: slicing per bucket (or writing into slices of one output)
    costs a full-size zero-filled gradient per bucket in backward, measured at 16% of a ModernBERT step on CPU."""
    heads, dim = q.shape[1], q.shape[2]
    plan = batch.bucket_plan()
    spans = [stop - start for start, stop, *_ in plan]
    outs = []
    for b, (qb, kb, vb) in enumerate(zip(q.split(spans), k.split(spans), v.split(spans))):
        _, _, rows, longest, real, slots = plan[b]
        mask = batch.attention_mask(b, real, longest, window, q.dtype)
        if real is None:  # equal lengths: a plain view, no padding
            ob = F.scaled_dot_product_attention(
                *(t.view(rows, longest, heads, dim).transpose(1, 2) for t in (qb, kb, vb)), attn_mask=mask
            )
            outs.append(ob.transpose(1, 2).reshape(-1, heads, dim))
            continue
        # in place into fresh zeros: the out-of-place index_copy would copy the zeros once more
        padded = [
            t.new_zeros(rows * longest, heads, dim).index_copy_(0, slots, t).view(rows, longest, heads, dim)
            for t in (qb, kb, vb)
        ]
        ob = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in padded), attn_mask=mask)
        outs.append(ob.transpose(1, 2).reshape(-1, heads, dim)[slots])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def packed_attention(q, k, v, batch: PackedBatch, window: int | None = None):
    """softmax(q k^T / sqrt(d) [+ bias]) v within each sequence of packed [tokens, heads, dim] tensors, keys limited
    to |i - j| <= window when given."""
    if (
        batch.score_bias is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and varlen_usable(q.device, q.dtype, window is not None)
    ):
        return _varlen_attention(q, k, v, batch.cu_seqlens, batch.max_len, window)
    return _bucketed_attention(q, k, v, batch, window)


# ---------------------------------------------------------------- packing and the layer loop


def _pack(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, host_lengths: list[int] | None = None):
    """(token ids of real tokens, their 0-based positions within their sequence, their slots in the [batch * length]
    grid, the PackedBatch). Sequences are packed longest first (each length bucket a contiguous run); left or right
    padding alike. `host_lengths`: each row's real-token count as the collator counted it on the host; without it
    they are read back from the device (the forward's one host-device sync)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    seq_lengths = mask.sum(1)
    lengths = list(host_lengths) if host_lengths is not None else seq_lengths.tolist()
    # longest first, ties in batch order: the order length_buckets groups them in, computed on the device (no sync)
    order = torch.argsort(seq_lengths, descending=True, stable=True)
    width = mask.shape[1]
    # slots of real tokens in the [batch * length] grid, in packed order; their count is known, so no second sync
    in_order = torch.nonzero_static(mask[order].flatten(), size=sum(lengths)).squeeze(1)
    slots = order[in_order // width] * width + in_order % width
    sorted_lengths = seq_lengths[order]
    cu_seqlens = F.pad(sorted_lengths.cumsum(0, dtype=torch.int32), (1, 0))
    positions = (mask.long().cumsum(1) - 1).flatten()[slots]
    packed = PackedBatch(sorted(lengths, reverse=True), cu_seqlens, device_lengths=sorted_lengths)
    return input_ids.flatten()[slots], positions, slots, packed


def _host_lengths(model, input_ids: torch.Tensor | None) -> list[int] | None:
    """The host-side lengths the pre-hook left for this forward (consumed: never seen by a later forward), if they
    describe this batch."""
    lengths = model.__dict__.pop("_host_lengths", None)
    if (
        lengths is None
        or input_ids is None
        or len(lengths) != input_ids.shape[0]
        or max(lengths, default=0) > input_ids.shape[1]
    ):
        return None
    return lengths


def _unpack(x: torch.Tensor, slots: torch.Tensor, shape: torch.Size) -> BaseModelOutput:
    hidden = x.new_zeros(shape[0] * shape[1], x.shape[-1]).index_copy_(0, slots, x)
    return BaseModelOutput(last_hidden_state=hidden.view(shape[0], shape[1], -1))


def _run_layers(model, layers, layer_forward, x, *extra):
    """x through each layer; with --gradient_checkpointing only layer inputs are kept and the rest is recomputed in
    backward. transformers marks the encoder (or, in newer releases, each layer) when checkpointing is enabled."""
    owner = getattr(model, "encoder", model)
    recompute = model.training and any(getattr(m, "gradient_checkpointing", False) for m in (owner, *layers))
    for i, layer in enumerate(layers):
        args = (layer, x, *(e[i] if isinstance(e, list) else e for e in extra))
        x = checkpoint(layer_forward, *args, use_reentrant=False) if recompute else layer_forward(*args)
    return x


def _stock_call(input_ids, kwargs) -> bool:
    """Inputs the packed forwards do not handle go to the stock forward: embeddings given directly, hidden states
    or attentions asked for, explicit position ids. Drops the host lengths from `kwargs` (sentence-transformers
    passes unknown features to a forward that takes **kwargs; the pre-hook already handed them over)."""
    kwargs.pop(HOST_LENGTHS, None)
    return (
        input_ids is None
        or any(kwargs.get(k) is not None for k in ("inputs_embeds", "position_ids"))
        or any(kwargs.get(k) for k in ("output_hidden_states", "output_attentions"))
    )


# ---------------------------------------------------------------- BERT / RoBERTa family and MPNet (post-LayerNorm)


def _bert_layer(layer, x, batch: PackedBatch, heads: int):
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
    """BertModel / RobertaModel.forward on real tokens only; last_hidden_state as [batch, length, hidden] (zeros at
    pads). RoBERTa-family positions start at padding_idx + 1 (models.position_offset)."""
    host_lengths = _host_lengths(self, input_ids)
    if _stock_call(input_ids, kwargs):
        return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids, **kwargs)  # fmt: skip
    ids, positions, slots, packed = _pack(input_ids, attention_mask, host_lengths)
    emb = self.embeddings
    x = emb.word_embeddings(ids) + emb.position_embeddings(positions + position_offset(self.config))
    types_ = token_type_ids.flatten()[slots] if token_type_ids is not None else torch.zeros_like(positions)
    x = emb.dropout(emb.LayerNorm(x + emb.token_type_embeddings(types_)))
    x = _run_layers(self, self.encoder.layer, _bert_layer, x, packed, self.config.num_attention_heads)
    return _unpack(x, slots, input_ids.shape)


def _mpnet_layer(layer, x, batch: PackedBatch, heads: int):
    attn = layer.attention.attn
    tokens, hidden = x.shape
    weight = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight])
    bias = torch.cat([attn.q.bias, attn.k.bias, attn.v.bias])
    q, k, v = F.linear(x, weight, bias).view(tokens, 3, heads, hidden // heads).unbind(1)
    context = packed_attention(q, k, v, batch).reshape(tokens, hidden)
    x = layer.attention.LayerNorm(layer.attention.dropout(attn.o(context)) + x)
    h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
    out = layer.output
    return out.LayerNorm(out.dropout(out.dense(h)) + x)


def _mpnet_position_bias(encoder, n: int, device: torch.device) -> torch.Tensor:
    """[heads, n, n]: MPNetEncoder.compute_position_bias of an n-token sequence (its default 32 buckets), with the
    positions built on the device (some transformers releases build them on the host: a copy and a sync per
    bucket length)."""
    position = torch.arange(n, device=device)
    buckets = encoder.relative_position_bucket(position[None, :] - position[:, None], num_buckets=32)
    return encoder.relative_attention_bias(buckets).permute(2, 0, 1)


def unpadded_mpnet_forward(self, input_ids=None, attention_mask=None, **kwargs):
    """MPNetModel.forward on real tokens only. The relative-position bias depends on i - j alone, so one
    [heads, n, n] bias per bucket length serves every sequence and layer (the stock model also computes it once)."""
    host_lengths = _host_lengths(self, input_ids)
    if _stock_call(input_ids, kwargs):
        return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    ids, positions, slots, packed = _pack(input_ids, attention_mask, host_lengths)
    emb = self.embeddings
    x = emb.word_embeddings(ids) + emb.position_embeddings(positions + position_offset(self.config))
    x = emb.dropout(emb.LayerNorm(x))
    packed.score_bias = {n: _mpnet_position_bias(self.encoder, n, x.device) for n in packed.bucket_lengths()}
    x = _run_layers(self, self.encoder.layer, _mpnet_layer, x, packed, self.config.num_attention_heads)
    return _unpack(x, slots, input_ids.shape)


# ---------------------------------------------------------------- ModernBERT (pre-LayerNorm, rotary, GLU, windows)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of packed [tokens, ..., dim] (queries and keys together) with per-token cos/sin
    [tokens, dim], in fp32 as the stock apply_rotary_pos_emb computes it."""
    x = t.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    return (x * cos.view(shape) + rotated * sin.view(shape)).to(t.dtype)


def _modernbert_layer(layer, x, batch: PackedBatch, heads: int, rope, window: int | None):
    attn = layer.attn
    tokens, hidden = x.shape
    qk, v = attn.Wqkv(layer.attn_norm(x)).view(tokens, 3, heads, hidden // heads).split([2, 1], dim=1)  # no slicing
    q, k = _rotate(qk, *rope).unbind(1)  # (whose backward zero-fills the whole qkv gradient once per slice)
    context = packed_attention(q, k, v.squeeze(1), batch, window).reshape(tokens, hidden)
    x = x + attn.out_drop(attn.Wo(context))
    return x + layer.mlp(layer.mlp_norm(x))


def unpadded_modernbert_forward(self, input_ids=None, attention_mask=None, **kwargs):
    """ModernBertModel.forward on real tokens only. Rotary positions count from each sequence's first real token
    (the stock forward counts from the first column; attention sees only differences, so the two agree); sliding
    layers attend to |i - j| <= config.sliding_window, as the stock mask."""
    host_lengths = _host_lengths(self, input_ids)
    if _stock_call(input_ids, kwargs):
        return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    ids, positions, slots, packed = _pack(input_ids, attention_mask, host_lengths)
    emb = self.embeddings
    x = emb.drop(emb.norm(emb.tok_embeddings(ids)))
    types_ = self.config.layer_types
    rope = {t: tuple(c[0] for c in self.rotary_emb(x, positions[None], t)) for t in set(types_)}
    windows = [self.config.sliding_window if t == "sliding_attention" else None for t in types_]
    x = _run_layers(self, self.layers, _modernbert_layer, x, packed, self.config.num_attention_heads,
                    [rope[t] for t in types_], windows)  # fmt: skip
    return _unpack(self.final_norm(x), slots, input_ids.shape)


# ---------------------------------------------------------------- switching a model


FORWARDS = {**dict.fromkeys(BERT_FAMILY, unpadded_bert_forward), "mpnet": unpadded_mpnet_forward,
            "modernbert": unpadded_modernbert_forward}  # fmt: skip


def unsupported_reason(config) -> str | None:
    """Why a transformer config cannot take the unpadded forward, or None if it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FORWARDS:
        return f"model type {model_type!r} has no unpadded forward here (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return f"this {model_type} is configured as a decoder"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"this {model_type} uses {config.position_embedding_type} position embeddings"
    return None


def describe(config) -> str:
    """One line for the dry run: whether this model trains on the unpadded forward, and its usable length."""
    reason = unsupported_reason(config)
    if reason:
        return f"stock (padded) forward: {reason}; the run pays for padding"
    limit = usable_max_len(config)
    offset = position_offset(config)
    where = f", positions from row {offset}" if offset else ""
    return f"unpadded forward ({config.model_type}{where}; at most {limit} tokens)"


def _hand_over_host_lengths(module, args) -> None:
    """Forward pre-hook of the sentence-transformers module: the collator's host lengths reach the unpadded forward
    whatever keys sentence-transformers lets through to the HF model."""
    features = args[0] if args else None
    if isinstance(features, dict) and features.get(HOST_LENGTHS) is not None:
        module.auto_model._host_lengths = features[HOST_LENGTHS]


def is_enabled(model) -> bool:
    """Whether any transformer of the SentenceTransformer runs an unpadded forward."""
    return any(getattr(m, "auto_model", None) is not None and "_stock_forward" in m.auto_model.__dict__
               for m in model.modules())  # fmt: skip


def enable_unpadded(model) -> int:
    """Switch every supported transformer module of a SentenceTransformer to its unpadded forward. Returns how many
    were switched; an unsupported one keeps the stock forward with a WARNING (the run pays for padding)."""
    switched = 0
    for module in model.modules():
        inner = getattr(module, "auto_model", None)
        if inner is None or inner.__dict__.get("_stock_forward") is not None:
            continue
        config = getattr(inner, "config", None)
        reason = unsupported_reason(config)
        if reason:
            logger.warning("unpadded forward off: %s; the stock forward computes every padding token", reason)
            continue
        inner._stock_forward = inner.forward
        inner.forward = types.MethodType(FORWARDS[config.model_type], inner)
        module.register_forward_pre_hook(_hand_over_host_lengths)
        switched += 1
        device = next(inner.parameters()).device
        if device.type == "cuda":  # decided now, outside any forward, and logged once
            varlen_usable(device, compute_dtype(device))
            if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
                varlen_usable(device, compute_dtype(device), windowed=True)
    return switched
