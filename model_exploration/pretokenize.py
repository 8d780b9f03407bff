"""Pre-tokenization cache: token ids stored once per (source cache, tokenizer, max length), padded per batch.

Without it the collator tokenizes every batch on the fly. With --pretokenize, rank 0 tokenizes each source once
(truncated to the model's max_seq_length, no padding) into `<source cache>/tokens-<key>`, the other ranks wait and
read it, and `PretokenizedCollator` pads each batch to its own longest sequence (never to a fixed length).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from sentence_transformers.sentence_transformer.data_collator import (
    SentenceTransformerDataCollator,
)

from model_exploration import data
from model_exploration.keys import short_hash
from model_exploration.unpadded import HOST_LENGTHS


def tokenizer_fingerprint(tokenizer, max_length: int) -> str:
    """What decides the ids: vocabulary, normalizer, pre-tokenizer, post-processor and max length. The backend's
    truncation/padding state is left out: it changes as a side effect of tokenizing, and ranks must agree."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        identity = json.dumps(spec, sort_keys=True)
    else:
        identity = repr(sorted(tokenizer.get_vocab().items()))
    return short_hash(f"{identity}|{max_length}")


def _tokenize_batch(batch: dict[str, list[str]], tokenizer, max_length: int) -> dict[str, list[list[int]]]:
    return {
        column: tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        for column, texts in batch.items()
    }


def tokenize_columns(
    dataset: Dataset, tokenizer, max_length: int, desc: str | None = None, num_proc: int = 1, work: Path | None = None
) -> Dataset:
    """Every text column replaced by its token ids (truncated to max_length, unpadded); intermediate Arrow files
    go to `work` (default: beside the dataset's own files)."""
    return dataset.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        desc=desc,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 10_000 * num_proc else None,
        cache_file_name=str(work / "tokens.arrow") if work else None,
    )


def pretokenize_source(
    source: data.SourceData, tokenizer, max_length: int, num_proc: int = 1
) -> tuple[Dataset, Dataset]:
    """(train, validation) of token ids with the same column names as the texts. Validation stays text (the
    evaluator encodes it), so only train is tokenized."""
    path = Path(source.cache_path) / f"tokens-{tokenizer_fingerprint(tokenizer, max_length)}"

    def build(tmp: Path) -> dict:
        tokens = tokenize_columns(source.train, tokenizer, max_length, f"tokenize {source.spec.name}", num_proc, tmp)
        DatasetDict({"train": tokens}).save_to_disk(str(tmp / "data"))
        return {"train": len(tokens)}

    data.cached_build(path, build)
    return load_from_disk(str(path / "data"))["train"], source.validation


def pad_ids(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows` padded to their longest. One flat numpy fill instead of
    tokenizer.pad, whose torch.tensor(list of lists) made collation the bottleneck (~5k pairs/s per core)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max(initial=0))
    positions = np.arange(width)
    mask = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


@dataclass
class PretokenizedCollator(SentenceTransformerDataCollator):
    """Pads pre-tokenized columns (lists of ids) per batch; text columns fall back to the stock collator.
    `host_lengths`: also give each column's real-token counts as a list (`<column>_host_lengths`), which the
    unpadded forward uses instead of reading them back from the device (unpadded.HOST_LENGTHS)."""

    tokenizer: Any = None
    host_lengths: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        first = features[0]
        token_columns = [c for c, v in first.items() if isinstance(v, list) and (not v or isinstance(v[0], int))]
        if not token_columns:
            return super().__call__(features)
        text_features = [{k: v for k, v in row.items() if k not in token_columns} for row in features]
        batch = super().__call__(text_features) if any(text_features[0]) else {}
        left = self.tokenizer.padding_side == "left"
        for column in token_columns:
            ids, mask = pad_ids([row[column] for row in features], self.tokenizer.pad_token_id, left)
            batch[f"{column}_input_ids"], batch[f"{column}_attention_mask"] = ids, mask
            if self.host_lengths:
                batch[f"{column}_{HOST_LENGTHS}"] = mask.sum(1).tolist()
        return batch
