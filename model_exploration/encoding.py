"""Fast corpus encoding for evaluation: exact token lengths, token-budget batches, tokenization ahead of the model.

Why not only SentenceTransformer.encode: it sorts by character length and uses a fixed number of texts per batch,
so batches of long texts and batches of short texts cost very different amounts and short ones underfill the
device; it tokenizes in the same thread that runs the model. Here texts are tokenized once (exact lengths),
sorted by token count, cut into batches of at most `token_budget` padded tokens, and a background thread pads
the next batches (one numpy fill each) while the model runs (bf16 autocast on CUDA); embeddings are copied to the
host without blocking, and the only synchronization is at the end. Embeddings equal `encode`'s (tested).

A prompt is applied as sentence-transformers' preprocessing applies it (prompt + text, then tokenized and
truncated) and its `prompt_length` goes with every batch, so Pooling(include_prompt=False) leaves it out here too:
`encode_fast(model, texts, prompt=p)` equals `model.encode(texts, prompt=p)`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from model_exploration import unpadded
from model_exploration.models import inference_autocast
from model_exploration.pretokenize import pad_ids
from model_exploration.prompts import prompt_length
from model_exploration.unpadded import HOST_LENGTHS

TOKENIZE_CHUNK = 4096


def token_budget_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first) cut into batches whose padded size (n x longest) fits the budget."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        size = max(1, token_budget // longest)
        batches.append(order[start : start + size])
        start += size
    return batches


def _tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = tokenizer(texts[start : start + TOKENIZE_CHUNK], truncation=True, max_length=max_length, padding=False)
        for key in ("input_ids", "token_type_ids"):
            if key in chunk:
                out.setdefault(key, []).extend(chunk[key])
    return out


def _padded_batches(tokenizer, encoded, batches, pin: bool, host_lengths: np.ndarray | None) -> Iterator[dict]:
    """Batches padded with one numpy fill (pretokenize.pad_ids; tokenizer.pad is GIL-bound Python, ~15x slower),
    in pinned memory on CUDA so that the copy to the device does not block; with `host_lengths` (for an unpadded
    model), each row's length as counted here (HOST_LENGTHS), so that its forward needs no sync."""
    left = tokenizer.padding_side == "left"
    for batch in batches:
        ids, mask = pad_ids([encoded["input_ids"][i] for i in batch], tokenizer.pad_token_id, left)
        features = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in encoded:
            features["token_type_ids"] = pad_ids([encoded["token_type_ids"][i] for i in batch], 0, left)[0]
        if pin:
            features = {k: v.pin_memory() for k, v in features.items()}
        yield features if host_lengths is None else features | {HOST_LENGTHS: host_lengths[batch].tolist()}


def _prefetch(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a background thread, `depth` items ahead (tokenizers release the GIL)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in iterator:
                items.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            items.put(exc)
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


@torch.inference_mode()
def encode_fast(
    model,
    texts: list[str],
    token_budget: int = 16384,
    max_seq_length: int | None = None,
    show_progress_bar: bool = False,
    prefetch: int = 4,
    prompt: str | None = None,
) -> torch.Tensor:
    """Float32 sentence embeddings (CPU tensor, input order) of `texts`, each after `prompt` if one is given."""
    if not texts:
        return torch.empty(0, model.get_embedding_dimension())
    tokenizer = model.tokenizer
    prompted = [prompt + text for text in texts] if prompt else texts
    length_of_prompt = prompt_length(model.preprocess, prompt)
    encoded = _tokenize(tokenizer, prompted, max_seq_length or model.max_seq_length)
    lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(texts))
    batches = token_budget_batches(lengths, token_budget)
    device = model.device
    pin = device.type == "cuda"
    # Embeddings land in batch order in a (pinned) host buffer by non-blocking copies: no per-batch sync; put
    # back in input order once at the end.
    in_batch_order = torch.empty(len(texts), model.get_embedding_dimension(), pin_memory=pin)
    model.eval()
    progress = tqdm(total=len(texts), desc="Encoding", disable=not show_progress_bar, unit="text")
    start = 0
    padded = _padded_batches(tokenizer, encoded, batches, pin, lengths if unpadded.is_enabled(model) else None)
    for batch, features in zip(batches, _prefetch(padded, prefetch)):
        features = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in features.items()}
        if length_of_prompt is not None:
            features["prompt_length"] = length_of_prompt
        with inference_autocast(device):
            embeddings = model(features)["sentence_embedding"]
        in_batch_order[start : start + len(batch)].copy_(embeddings.float(), non_blocking=True)
        start += len(batch)
        progress.update(len(batch))
    if pin:
        torch.cuda.synchronize(device)
    progress.close()
    out = torch.empty_like(in_batch_order, pin_memory=False)
    out[torch.from_numpy(np.concatenate(batches))] = in_batch_order
    return out
