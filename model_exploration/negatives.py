"""Hard negatives mined for the pair sources of a mixture: (anchor, positive) -> (anchor, positive, negative...),
written as source files that a mixture registry references.

The mining itself is sentence-transformers' `mine_hard_negatives`: embed the anchors and the passages, take each
anchor's nearest passages, drop the anchor's own positives, and keep as negatives the nearest that pass the
false-negative guard. What is ours: which rows (a source's training split from its cache, so its held-out
validation rows never become training data), the defaults, seeding, and the output as a source plus a mixture:

- guard: `relative_margin` 0.05: a candidate counts as a negative only if its similarity to the anchor is at least
  5% below the positive's (NV-Retriever's TopK-PercPos at 95%, their best false-negative filter): a passage almost
  as close as the positive is more likely an unlabelled positive than a negative;
- negatives: the top-scoring candidates that pass the guard (`sampling_strategy="top"`), 1 per pair by default
  (a triplet source, like msmarco and specter); with k > 1 the source has columns negative_1..k;
- seed: Python / NumPy / torch seeded before mining, and the output is in the source's row order;
- model: the model being trained by default (the miner should agree with the trainee about what is close), on the
  GPU when there is one, with faiss when it is installed (exact search otherwise);
- prompts: the miner embeds a source's anchors and passages with the prompts training gives them (its anchor's and
  positive's, model_exploration/prompts.py), through mine_hard_negatives' `query_prompt` / `corpus_prompt`; the
  mined source keeps the source's own prompt fields and the written mixture the run's prompts as its defaults;
- memory: one mine_hard_negatives call holds every embedding, candidate list and text of the pairs it mines, so
  a source is mined in chunks that fit a budget (MiningPlan, stated before it starts), and the output is written
  as it is mined.
Rows for which no candidate passes the guard are dropped and counted (sentence-transformers reports them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml

from model_exploration.errors import UserError
from model_exploration.models import inference_autocast
from model_exploration.reporting import write_atomic
from model_exploration.sources import SourceSpec, registry_entry

logger = logging.getLogger(__name__)

DEFAULT_RELATIVE_MARGIN = 0.05
DEFAULT_NUM_NEGATIVES = 1


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    model_name: str
    relative_margin: float = DEFAULT_RELATIVE_MARGIN
    num_negatives: int = DEFAULT_NUM_NEGATIVES
    range_max: int = 50
    seed: int = 42
    batch_size: int = 64

    def describe(self, source: str) -> str:
        model = "/".join(Path(self.model_name).parts[-2:])
        return (
            f"{self.num_negatives} hard negative(s) per pair of {source} by {model}, relative margin "
            f"{self.relative_margin}, top {self.range_max} candidates, seed {self.seed}"
        )


# What sentence-transformers' mine_hard_negatives (6.2) holds, read off its code and checked against measured peaks
# (docs/results.md, "Mining"): per pair, five float32 copies of an embedding (queries, corpus, the query and
# positive copies that score the positives, the encoder's stacking copy; faiss' index adds one), three copies of
# the candidate lists (range_max + 1 scores and ids per query), its texts as Python strings and the triplets it
# builds (~2.5 times a pair's text bytes) and per-query dicts, lists and small tensors; plus the encoder's batches.
EMBEDDING_COPIES = 5
TEXT_COPIES = 2.5
PER_PAIR_OBJECTS = 1500
ENCODER_BYTES = 256 << 20
MIN_CHUNK_PAIRS = 1000
MAX_QUERY_BLOCK = 16384  # sentence-transformers' default faiss_batch_size


@dataclasses.dataclass(frozen=True)
class MiningPlan:
    """How one source is mined within a memory budget. Each call of mine_hard_negatives holds all of its pairs'
    embeddings, candidate lists and texts, so a source too large for the budget is mined in chunks of
    about `chunk_pairs` rows, a seeded partition of its training split by anchor (chunk_rows), each pair's negatives
    drawn from its own chunk's passages. Exact search (no faiss) scores `query_block` queries against the chunk's corpus
    at a time. Sizes are bytes, for one chunk."""

    pairs: int
    chunk_pairs: int
    query_block: int
    embeddings: int
    candidates: int
    texts: int
    scores: int
    budget: int

    @property
    def chunks(self) -> int:
        return math.ceil(self.pairs / self.chunk_pairs)

    def chunk_rows(self, anchors: Iterable[list[str]], seed: int) -> list[np.ndarray]:
        """Each chunk's row numbers, in source order, from the anchors (in batches): a seeded hash of the anchor
        picks the chunk, so every pair of one anchor lands in the same chunk (sentence-transformers then keeps
        all of that anchor's positives out of its negatives; split across chunks, one of them could be mined as a
        negative where another anchor brings it in), and chunks are random, not consecutive, rows (the training
        split keeps its source's order, and sources are often grouped by topic or query). Chunks hold about
        `chunk_pairs` pairs each."""
        chunk_of = np.empty(self.pairs, dtype=np.int32)
        start = 0
        for batch in anchors:
            keys = (hashlib.blake2b(f"{seed}\0{a}".encode(), digest_size=8).digest() for a in batch)
            chunk_of[start : start + len(batch)] = [int.from_bytes(k, "little") % self.chunks for k in keys]
            start += len(batch)
        return [np.flatnonzero(chunk_of == c) for c in range(self.chunks)]

    @property
    def peak(self) -> int:
        return self.embeddings + self.candidates + self.texts + self.scores + ENCODER_BYTES

    def describe(self, source: str) -> str:
        parts = f"embeddings {_gb(self.embeddings)}, candidate lists {_gb(self.candidates)}, texts {_gb(self.texts)}"
        if self.scores:
            parts += f", exact-search scores {_gb(self.scores)}"
        how = (
            "one pass"
            if self.chunks == 1
            else f"{self.chunks} chunks of {self.chunk_pairs:,} pairs, each pair's negatives from its own chunk"
        )
        holds = f"mining holds ~{_gb(self.peak)} ({parts}, encoder {_gb(ENCODER_BYTES)}), budget {_gb(self.budget)}"
        return f"{source}: {self.pairs:,} pairs; {holds}: {how}"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def plan_mining(
    pairs: int, text_bytes: float, dim: int, settings: MiningSettings, budget: int, faiss: bool
) -> MiningPlan:
    """The chunk size whose estimated peak fits `budget` bytes (`text_bytes`: a pair's text, as Arrow holds it);
    with exact search, the block of query x corpus scores gets a quarter of the budget."""
    embeddings = (EMBEDDING_COPIES + faiss) * dim * 4
    candidates = 3 * (settings.range_max + 1) * 12
    texts = TEXT_COPIES * text_bytes + PER_PAIR_OBJECTS
    per_pair = embeddings + candidates + texts
    room = (budget if faiss else budget * 3 // 4) - ENCODER_BYTES
    smallest = min(pairs, MIN_CHUNK_PAIRS)  # fewer candidates than this make weak negatives
    if room < smallest * per_pair:
        needed = (smallest * per_pair + ENCODER_BYTES) * (1 if faiss else 4 / 3)
        raise UserError(
            f"--mining_memory_gb {budget / 1e9:g}: too small to mine {smallest} pairs at a time (they need "
            f"{_gb(needed)}); raise it"
        )
    chunks = math.ceil(pairs * per_pair / room)
    chunk = math.ceil(pairs / chunks)  # equal chunks
    block = MAX_QUERY_BLOCK if faiss else max(1, min(MAX_QUERY_BLOCK, budget // 4 // (chunk * 4)))
    return MiningPlan(pairs, chunk, block, chunk * embeddings, chunk * candidates, int(chunk * texts),
                      0 if faiss else block * chunk * 4, budget)  # fmt: skip


def mine_source(
    train, model, settings: MiningSettings, plan: MiningPlan, dest: Path, prompts: tuple[str, str] = ("", "")
) -> dict:
    """Mine the (anchor, positive) rows of `train` chunk by chunk as `plan` says, appending each chunk's rows
    (anchor, positive, negative[_1..k]) to `dest` as JSON lines; `dest` appears, whole, only if some row passed
    the guard. `prompts`: (anchor prompt, passage prompt), "" = none (never None, which would let a model's
    default_prompt_name apply). Returns the mining statistics."""
    from sentence_transformers.util import mine_hard_negatives
    from transformers import set_seed

    set_seed(settings.seed)  # Python, NumPy and torch
    pairs = train.select_columns(["anchor", "positive"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    rows, anchor_hashes, false_negatives = 0, [], 0
    # The embeddings are normalized, so the dot product is the cosine. With "cosine", sentence-transformers
    # normalizes the whole corpus again for every block of queries, and glibc's heap kept those copies (measured:
    # 2 GB more for 20,000 pairs in blocks of 64 queries).
    similarity = model.similarity_fn_name
    model.similarity_fn_name = "dot" if similarity == "cosine" else similarity
    try:
        with tmp.open("w", encoding="utf-8") as out:
            anchors = (b["anchor"] for b in pairs.select_columns(["anchor"]).iter(batch_size=100_000))
            chunks = (
                [pairs]
                if plan.chunks == 1
                else (pairs.select(rows) for rows in plan.chunk_rows(anchors, settings.seed))
            )
            for chunk in chunks:
                with inference_autocast(model.device):  # the arithmetic of every evaluation (models.py)
                    mined = mine_hard_negatives(
                        chunk,
                        model,
                        anchor_column_name="anchor",
                        positive_column_name="positive",
                        relative_margin=settings.relative_margin,
                        num_negatives=settings.num_negatives,
                        range_max=settings.range_max,
                        sampling_strategy="top",
                        output_format="triplet" if settings.num_negatives == 1 else "n-tuple",
                        batch_size=settings.batch_size,
                        faiss_batch_size=plan.query_block,
                        use_faiss=importlib.util.find_spec("faiss") is not None,
                        query_prompt=prompts[0],
                        corpus_prompt=prompts[1],
                        verbose=True,
                    )
                pairs_of_chunk = known_pairs(chunk)
                for batch in mined.iter(batch_size=1000):
                    written = []
                    for values in zip(*batch.values()):
                        row = dict(zip(batch, values))
                        if mines_a_positive(row, pairs_of_chunk):
                            false_negatives += 1
                            continue
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        written.append(hash(row["anchor"]))
                    rows += len(written)
                    anchor_hashes.append(np.array(written, dtype=np.int64))
        if rows:
            os.replace(tmp, dest)
    finally:
        model.similarity_fn_name = similarity
        tmp.unlink(missing_ok=True)
    anchors = len(np.unique(np.concatenate(anchor_hashes))) if anchor_hashes else 0
    if false_negatives:
        logger.warning("%d mined rows dropped: a negative was a positive of the same anchor", false_negatives)
    return {"pairs": len(pairs), "rows": rows, "anchors_with_negatives": anchors, "chunks": plan.chunks,
            "pairs_per_chunk": plan.chunk_pairs, "memory_estimate_gb": round(plan.peak / 1e9, 2),
            "dropped_positive_as_negative": false_negatives, "query_prompt": prompts[0],
            "corpus_prompt": prompts[1]}  # fmt: skip


def _pair_key(anchor: str, text: str) -> int:
    return hash((anchor, text))  # per process (str hashes are salted), which is all these keys live for


def known_pairs(pairs) -> np.ndarray:
    """Sorted 64-bit keys of the (anchor, positive) pairs of a dataset, read in batches: 8 bytes a pair, not the
    pair's text again (a mining chunk can hold millions of pairs)."""
    keys = [
        np.fromiter(map(_pair_key, b["anchor"], b["positive"]), np.int64, count=len(b["anchor"]))
        for b in pairs.select_columns(["anchor", "positive"]).iter(batch_size=100_000)
    ]
    return np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def mines_a_positive(row: dict, known: np.ndarray) -> bool:
    """Whether a mined row's negatives include a positive of its anchor: any pair of the source with that anchor
    (`known`: known_pairs of the row's chunk; chunks keep an anchor's pairs together, so its chunk has them all).
    sentence-transformers excludes these already; this checks the output, so a change there, or in chunking,
    cannot slip false negatives in. A hash collision (1 in 2^64) would drop a good row, never keep a bad one."""
    keys = [_pair_key(row["anchor"], v) for k, v in row.items() if k == "negative" or k.startswith("negative_")]
    at = np.searchsorted(known, keys)
    return bool(np.any(known[np.minimum(at, len(known) - 1)] == keys)) if len(known) else False


def mined_file(out: Path, spec: SourceSpec) -> Path:
    return out / f"{spec.name.replace('/', '__')}_mined.jsonl"


def mined_spec(spec: SourceSpec, file: Path, settings: MiningSettings) -> dict:
    """The registry entry of a mined source (a local JSON-lines file next to the mixture that references it; the
    source is named after its file, `<source>_mined`)."""
    negatives = (
        "negative" if settings.num_negatives == 1 else [f"negative_{i}" for i in range(1, settings.num_negatives + 1)]
    )
    own_prompts = {k: v for k, v in registry_entry(spec).items() if k in ("query_prompt", "document_prompt", "prompts")}
    return {
        "name": file.stem,
        "fetch": "jsonl",
        "data_files": file.name,
        "anchor": "anchor",
        "positive": "positive",
        "negative": negatives,
        "weight": spec.weight,
        "mined": settings.describe(spec.name),
    } | own_prompts


def write_mined(out: Path, spec: SourceSpec, stats: dict, settings: MiningSettings) -> dict:
    """The statistics beside a source's mined file (mine_source wrote it); returns its registry entry."""
    file = mined_file(out, spec)
    write_atomic(
        file.with_suffix(".json"), json.dumps({"source": spec.name, **stats, **dataclasses.asdict(settings)}, indent=1)
    )
    logger.info("%s: %d pairs -> %d rows with negatives -> %s", spec.name, stats["pairs"], stats["rows"], file)
    entry = mined_spec(spec, file, settings)
    if stats["chunks"] > 1:
        entry["mined"] += f", negatives from within chunks of {stats['pairs_per_chunk']} pairs"
    if stats["query_prompt"] or stats["corpus_prompt"]:
        entry["mined"] += f", prompts {stats['query_prompt']!r} / {stats['corpus_prompt']!r}"
    return entry


def write_mixture(path: Path, entries: list[dict], replay: dict | None = None, prompts: dict | None = None) -> None:
    """A mixture file listing `entries` (registry dicts), with the Stage-1 replay section when the stage had one and
    `prompts` (query_prompt / document_prompt: the defaults of its sources) when the run had them."""
    payload = (prompts or {}) | {"sources": entries} | ({"stage1_replay": replay} if replay else {})
    header = "# Written by data_prep/mine_hard_negatives.py: the mixture with its mined pair sources.\n"
    write_atomic(path, header + yaml.safe_dump(payload, sort_keys=False, width=200))
