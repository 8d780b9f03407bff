"""Retrieval: exact top-k search (float cosine, 1-bit Hamming, asymmetric float query vs 1-bit documents, float
rescoring of binary candidates) and IR metrics.

Search is chunked over queries and corpus, so memory is bounded by the chunk sizes, not the corpus, and ties are
broken by corpus position (benchmarks keep their corpus sorted by id), so a ranking is deterministic.

Metrics, per query then averaged over queries (`ir_metrics`):
- MRR@k: 1 / rank of the first relevant document within the top k (0 if none).
- NDCG@k: graded, as trec_eval's `ndcg_cut_k` (MTEB, BEIR): gain = the qrels grade, discount log2(rank + 1),
  ideal = the qrels' grades sorted, over the top k. With 0/1 qrels this is sentence-transformers' NDCG.
- Recall@k: relevant documents in the top k / relevant documents in the qrels (trec_eval's `recall_k`).
- MAP@100: sentence-transformers' definition, sum of precision at each relevant hit in the top 100 divided by
  min(100, relevant documents); it equals trec_eval's `map_cut_100` whenever a query has at most 100 relevant
  documents (every BEIR / NASA / NanoBEIR query).
A document is relevant when its grade is > 0. Agreement with pytrec_eval and with sentence-transformers'
InformationRetrievalEvaluator is tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

CUTOFFS = (1, 5, 10)
MAP_CUTOFF = 100


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row with ties broken by lower column index (deterministic, unlike torch.topk)."""
    values, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], idx[:, :k]


def chunked_search(
    query_emb: torch.Tensor,
    corpus_size: int,
    score_chunk: Callable[[torch.Tensor, int, int], torch.Tensor],
    k: int,
    corpus_chunk_size: int = 16384,
    query_chunk_size: int = 256,
) -> np.ndarray:
    """Positions of the top-k corpus entries per query; memory is bounded by the chunk sizes, not the corpus."""
    k = min(k, corpus_size)
    results = []
    for q0 in range(0, len(query_emb), query_chunk_size):
        q = query_emb[q0 : q0 + query_chunk_size]
        best_scores = best_idx = None
        for c0 in range(0, corpus_size, corpus_chunk_size):
            c1 = min(corpus_size, c0 + corpus_chunk_size)
            scores, idx = _topk_stable(score_chunk(q, c0, c1), k)
            idx = idx + c0
            if best_scores is None:
                best_scores, best_idx = scores, idx
            else:  # earlier chunks hold lower positions, so a stable merge keeps the position tie-break
                merged_scores = torch.cat([best_scores, scores], dim=1)
                merged_idx = torch.cat([best_idx, idx], dim=1)
                best_scores, order = _topk_stable(merged_scores, k)
                best_idx = merged_idx.gather(1, order)
        results.append(best_idx.numpy())
    return np.concatenate(results)


def float_search(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int) -> np.ndarray:
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(corpus_emb.float(), dim=-1)
    return chunked_search(q, len(c), lambda qq, c0, c1: qq @ c[c0:c1].T, k)


def unpack_signs(packed: np.ndarray) -> torch.Tensor:
    """uint8 bit-packed embeddings -> float +1/-1 vectors."""
    return torch.from_numpy(np.unpackbits(packed, axis=-1).astype(np.float32) * 2 - 1)


def binary_search(query_packed: np.ndarray, corpus_packed: np.ndarray, k: int) -> np.ndarray:
    """Hamming search over ubinary codes. For +/-1 vectors, dot = D - 2 * hamming, so ranking by the (exact,
    integer-valued) float dot product equals ranking by Hamming distance, and runs on BLAS in chunks."""
    q = unpack_signs(query_packed)
    return chunked_search(q, len(corpus_packed), lambda qq, c0, c1: qq @ unpack_signs(corpus_packed[c0:c1]).T, k)


def asymmetric_search(query_emb: torch.Tensor, corpus_packed: np.ndarray, k: int) -> np.ndarray:
    """Float query . sign(document) over the whole 1-bit index: the index stays 1 bit per dimension, only the query
    is float (no Hamming first stage, no re-ranking). The query's norm does not change its ranking."""
    q = query_emb.float()
    return chunked_search(q, len(corpus_packed), lambda qq, c0, c1: qq @ unpack_signs(corpus_packed[c0:c1]).T, k)


def rescore(query_emb: torch.Tensor, corpus_packed: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Re-rank Hamming candidates by float query . sign(document), as sentence-transformers' quantized search does."""
    out = []
    for query, cand in zip(query_emb.float(), candidates, strict=True):
        scores = unpack_signs(corpus_packed[cand]) @ query
        # a stable sort keeps equal scores in their Hamming order, so ties stay deterministic
        out.append(cand[torch.sort(scores, descending=True, stable=True).indices[:k].numpy()])
    return np.stack(out)


def ir_metrics(ranked_ids: Sequence[Sequence[str]], relevant: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """MRR@k, NDCG@k, Recall@k for k in CUTOFFS and MAP@100, averaged over queries (see the module docstring).
    `relevant[i]` maps query i's judged documents to their grades (> 0)."""
    sums = {f"{m}@{k}": 0.0 for m in ("mrr", "ndcg", "recall") for k in CUTOFFS}
    sums[f"map@{MAP_CUTOFF}"] = 0.0
    for hits, grades in zip(ranked_ids, relevant):
        gains = [grades.get(doc, 0) for doc in hits]
        ideal = sorted(grades.values(), reverse=True)
        for k in CUTOFFS:
            top = gains[:k]
            first = next((i for i, g in enumerate(top) if g > 0), None)
            sums[f"mrr@{k}"] += 0.0 if first is None else 1.0 / (first + 1)
            dcg = sum(g / math.log2(i + 2) for i, g in enumerate(top) if g > 0)
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"recall@{k}"] += sum(g > 0 for g in top) / len(grades)
        correct, precision_sum = 0, 0.0
        for i, g in enumerate(gains[:MAP_CUTOFF]):
            if g > 0:
                correct += 1
                precision_sum += correct / (i + 1)
        sums[f"map@{MAP_CUTOFF}"] += precision_sum / min(MAP_CUTOFF, len(grades))
    n = max(1, len(relevant))
    return {key: value / n for key, value in sums.items()}


def drop_identical_ids(ranked_ids: Sequence[Sequence[str]], query_ids: Sequence[str], k: int) -> list[list[str]]:
    """BEIR's and MTEB's `ignore_identical_ids`: a retrieved document whose id is the query's own id is not a hit
    (collections such as ArguAna and Quora put the queries in the corpus). Rankings are cut back to k."""
    return [[d for d in hits if d != q][:k] for hits, q in zip(ranked_ids, query_ids)]
