"""Loading models, and the one device / precision policy of training, evaluation and the benchmarks.

Policy: CUDA when present, else CPU; bf16 autocast over fp32 master weights where the GPU computes bf16 natively
(compute capability 8.0+, Ampere and newer). `torch.cuda.is_bf16_supported()` also says yes on older GPUs, where
bf16 is emulated and slower than fp32, so it is not the test here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from model_exploration.errors import UserError

logger = logging.getLogger(__name__)

# Learned positions of these start at padding_idx + 1 (fairseq's convention): position p of a sequence reads row
# p + padding_idx + 1 of the position table, so the last rows, not the first, bound the usable length.
ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert")
MPNET_PADDING_IDX = 1  # MPNetEmbeddings hard-codes it, whatever the config's pad_token_id


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_native(dev: torch.device | None = None) -> bool:
    dev = dev or device()
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8


def compute_dtype(dev: torch.device | None = None) -> torch.dtype:
    """The dtype matmuls run in: bf16 (autocast) where native, else fp32."""
    return torch.bfloat16 if bf16_native(dev) else torch.float32


def load_sentence_transformer(name: str, flag: str = "--model_name"):
    """A SentenceTransformer (fp32 weights) from a local folder or a hub id, on this process's device; any failure
    is one line naming the flag."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(name, device=str(device()))
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one actionable line
        where = "local folder" if Path(name).exists() else "hub id (not a local folder)"
        raise UserError(
            f"{flag} {name}: cannot load it as a {where} ({type(exc).__name__}); pass a SentenceTransformer folder "
            "or a reachable hub id"
        ) from None


def position_offset(config) -> int:
    """Row of the position table that a sequence's first token reads: padding_idx + 1 for the RoBERTa family and
    MPNet, 0 for BERT."""
    model_type = getattr(config, "model_type", None)
    if model_type in ROBERTA_FAMILY:
        return config.pad_token_id + 1
    return MPNET_PADDING_IDX + 1 if model_type == "mpnet" else 0


def usable_max_len(config) -> int | None:
    """The longest input the model can embed: its position table's rows minus the offset (a 514-position RoBERTa
    such as base INDUS or XLM-R: 512; INDUS-SDE's 1,026: 1,024); None when unbounded by a table (rotary models
    report max_position_embeddings as their trained length, which is used as the bound)."""
    positions = getattr(config, "max_position_embeddings", None)
    return None if positions is None else positions - position_offset(config)


def transformer_config(name: str):
    """The transformers config of a SentenceTransformer's Transformer module, read without loading weights, from a
    local folder or a hub id already in the Hugging Face cache; None if neither has it."""
    from transformers import AutoConfig

    folder = Path(name)
    if (folder / "modules.json").exists():
        modules = json.loads((folder / "modules.json").read_text())
        folder = folder / next((m["path"] for m in modules if m["type"].endswith(".Transformer")), "")
    try:
        return AutoConfig.from_pretrained(str(folder) if folder.exists() else name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not available offline (or not a transformers model): the caller says so
        return None


def capped_len(model, wanted: int, flag: str) -> int:
    """`wanted` tokens, capped at the model's usable length (beyond it learned-position models index out of range:
    an IndexError on CPU, a sticky device-side assert on CUDA), with a one-line warning naming the flag."""
    limit = usable_max_len(model[0].auto_model.config) or wanted
    if wanted > limit:
        logger.warning("%s %d exceeds the %d tokens this model can embed (its position table); using %d", flag,
                       wanted, limit, limit)  # fmt: skip
    return min(wanted, limit)


def set_max_len(model, wanted: int, flag: str = "--model_max_len") -> int:
    """max_seq_length = wanted, capped at the model's usable length; returns the length set."""
    model.max_seq_length = capped_len(model, wanted, flag)
    return model.max_seq_length


def inference_autocast(dev: torch.device):
    """The autocast every evaluation runs under: bf16 over the fp32 weights where the GPU computes it natively, as
    the trainer's forward does (accelerate's mixed precision), so scores before, during and after training and in
    compare.py come from the same arithmetic."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16_native(dev))


def freeze_unused_pooler(model) -> int:
    """Stop training the transformer's pooler (BERT's dense+tanh over [CLS]): sentence-transformers pools token
    embeddings with its own module and never reads `pooler_output`, so the pooler gets no gradient. Frozen, it is
    not a DDP parameter, and DDP need not search the graph for unused parameters every step
    (find_unused_parameters=False). It is still saved, so the model loads unchanged. Returns the tensors frozen."""
    frozen = 0
    for module in model.modules():
        pooler = getattr(getattr(module, "auto_model", None), "pooler", None)
        if pooler is not None:
            for param in pooler.parameters():
                param.requires_grad_(False)
                frozen += 1
    return frozen
