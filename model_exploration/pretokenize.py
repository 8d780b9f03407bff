"""Pre-tokenization cache: token ids stored once per (source cache, tokenizer, max length), padded per batch.

Without it the collator tokenizes every batch on the fly. With --pretokenize, rank 0 tokenizes each source once
(truncated to the model's max_seq_length, no padding) into `<source cache>/tokens-<key>`, the other ranks wait and
read it, and `PretokenizedCollator` pads each batch to its own longest sequence (never to a fixed length).

Prompts (model_exploration/prompts.py): a column's prompt is prepended to its texts before tokenizing, as
sentence-transformers' preprocessing does (`prompt + text`, then truncation), and the token cache's key includes the
prompts, so a changed prompt never reuses stale ids. The collator adds `<column>_prompt_length` as the stock one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
from model_exploration.prompts import prompt_length
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


def token_cache_key(tokenizer, max_length: int, prompts: dict[str, str] | None = None) -> str:
    """The token cache's key: the tokenizer's fingerprint, and the columns' prompts when there are any (without
    prompts the key is the fingerprint alone, as before prompts existed, so those caches stay valid)."""
    fingerprint = tokenizer_fingerprint(tokenizer, max_length)
    prompts = {c: p for c, p in (prompts or {}).items() if p}
    return short_hash(f"{fingerprint}|{json.dumps(prompts, sort_keys=True)}") if prompts else fingerprint


def _tokenize_batch(
    batch: dict[str, list[str]], tokenizer, max_length: int, prompts: dict[str, str]
) -> dict[str, list[list[int]]]:
    out = {}
    for column, texts in batch.items():
        prompt = prompts.get(column)
        texts = [prompt + text for text in texts] if prompt else texts
        out[column] = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    return out


def tokenize_columns(
    dataset: Dataset,
    tokenizer,
    max_length: int,
    desc: str | None = None,
    num_proc: int = 1,
    work: Path | None = None,
    prompts: dict[str, str] | None = None,
) -> Dataset:
    """Every text column replaced by its token ids (its prompt, if `prompts` gives one, prepended; truncated to
    max_length, unpadded); intermediate Arrow files go to `work` (default: beside the dataset's own files)."""
    return dataset.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "prompts": prompts or {}},
        desc=desc,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 10_000 * num_proc else None,
        cache_file_name=str(work / "tokens.arrow") if work else None,
    )


def pretokenize_source(
    source: data.SourceData, tokenizer, max_length: int, num_proc: int = 1, prompts: dict[str, str] | None = None
) -> tuple[Dataset, Dataset]:
    """(train, validation) of token ids with the same column names as the texts, each column's prompt (`prompts`:
    column -> prompt) tokenized with it. Validation stays text (the evaluator encodes it), so only train is
    tokenized."""
    path = Path(source.cache_path) / f"tokens-{token_cache_key(tokenizer, max_length, prompts)}"

    def build(tmp: Path) -> dict:
        name = f"tokenize {source.spec.name}"
        tokens = tokenize_columns(source.train, tokenizer, max_length, name, num_proc, tmp, prompts)
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
    unpadded forward uses instead of reading them back from the device (unpadded.HOST_LENGTHS).

    Prompts: the ids already hold them (pretokenize_source); `prompts` is the trainer's (dataset -> column ->
    prompt, resolved by the stock collator's own rules from the batch's `dataset_name`) and gives each prompted
    column `<column>_prompt_length`, the value the stock collator would add, so that Pooling(include_prompt=False)
    and the losses see the same batch either way."""

    tokenizer: Any = None
    host_lengths: bool = False
    _prompt_lengths: dict[str, int | None] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        first = features[0]
        token_columns = [c for c, v in first.items() if isinstance(v, list) and (not v or isinstance(v[0], int))]
        if not token_columns:
            return super().__call__(features)
        text_features = [{k: v for k, v in row.items() if k not in token_columns} for row in features]
        batch = super().__call__(text_features) if any(text_features[0]) else {}
        prompts = self._resolve_prompts(batch)
        left = self.tokenizer.padding_side == "left"
        for column in token_columns:
            ids, mask = pad_ids([row[column] for row in features], self.tokenizer.pad_token_id, left)
            batch[f"{column}_input_ids"], batch[f"{column}_attention_mask"] = ids, mask
            if self.host_lengths:
                batch[f"{column}_{HOST_LENGTHS}"] = mask.sum(1).tolist()
            prompt = self._get_prompt_for_column(prompts, column) if prompts else None
            if prompt:
                if prompt not in self._prompt_lengths:
                    self._prompt_lengths[prompt] = prompt_length(self.preprocess_fn, prompt)
                if self._prompt_lengths[prompt] is not None:
                    batch[f"{column}_prompt_length"] = self._prompt_lengths[prompt]
        return batch
