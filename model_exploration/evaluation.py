"""Evaluating a model on benchmarks: the rows of a results table, in training (a sentence-transformers evaluator)
and at the end of a run.

Why not only sentence-transformers' InformationRetrievalEvaluator: it scores one (queries, corpus, qrels) triple
per call and re-encodes the corpus each time; the NASA SDE benchmark has two qrels files over one corpus, the
comparison CLI caches corpus embeddings per model, graded qrels and BEIR's `ignore_identical_ids` are not in it,
and binary retrieval (Hamming search + rescoring) is not either. Its metric definitions are kept (retrieval.py).

Under torchrun, evaluation runs on every rank together (sentence-transformers' distributed inference: rank 0 runs
the evaluator, each rank encodes a shard). The evaluation max length is passed with every encode call
(`processing_kwargs`), so it reaches the serving ranks too, and the rows equal one process's (tested).

Prompts: queries are encoded with `encode_query` and documents with `encode_document`, as sentence-transformers'
InformationRetrievalEvaluator does (`query_prompt` / `corpus_prompt`: None = the model's own; a benchmark may carry
its own, e.g. a source's validation set its source's prompts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from operator import itemgetter

import numpy as np
import torch
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
from sentence_transformers.base.evaluation.sequential import SequentialEvaluator
from sentence_transformers.util import quantize_embeddings
from sentence_transformers.util.distributed import distributed_evaluation

from model_exploration import distributed
from model_exploration.benchmarks import Benchmark, validation_benchmark
from model_exploration.models import inference_autocast
from model_exploration.reporting import TABLE_COLUMNS
from model_exploration.retrieval import (
    CUTOFFS,
    MAP_CUTOFF,
    asymmetric_search,
    binary_search,
    drop_identical_ids,
    float_search,
    ir_metrics,
    rescore,
)

logger = logging.getLogger(__name__)

PRIMARY_METRIC = "ndcg@10"


def encode(
    model,
    texts: list[str],
    batch_size: int,
    show_progress_bar: bool,
    max_seq_length: int | None = None,
    side: str | None = None,
    prompt: str | None = None,
) -> torch.Tensor:
    """Float embeddings through SentenceTransformer.encode, or encode_query / encode_document for `side` "query" /
    "document" (length-sorted batches; under the trainer it shares the work across DDP ranks). `max_seq_length`
    applies to this call only, on every rank, so a model trained on shorter texts is still evaluated under the
    benchmark's protocol. `prompt`: None = what the method applies by itself."""
    kwargs = {"processing_kwargs": {"text": {"max_length": max_seq_length}}} if max_seq_length else {}
    method = {None: model.encode, "query": model.encode_query, "document": model.encode_document}[side]
    with inference_autocast(model.device):
        emb = method(
            texts, prompt=prompt, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress_bar,
            **kwargs,
        )  # fmt: skip
    return emb.float().cpu()


def evaluate_benchmark(
    benchmark: Benchmark,
    corpus_emb: torch.Tensor,
    encode_queries: Callable[[list[str]], torch.Tensor],
    precisions: Sequence[str] = ("float32",),
    rescore_multiplier: int = 0,
    ignore_identical_ids: bool = True,
    dims: Sequence[int] = (),
) -> dict[str, dict]:
    """Metrics per query set (and their mean), for float and, if asked, ubinary search, at the full dimension and at
    each of `dims` (Matryoshka: the embeddings truncated to their first d dimensions, renormalized by the cosine
    search, binarized as they are: one encoding of the corpus serves every dimension).

    ubinary adds two searches of the 1-bit index: Hamming (1-bit queries) and asymmetric (float queries against the
    documents' bits), and with `rescore_multiplier` Hamming hits re-ranked by the float query.
    Returns {row name: {metric: value, "bytes_per_vector": n, "ubinary": {...}, "ubinary_asym": {...},
    "ubinary_rescore": {...},
    "dims": {"256": {metric: value, ..., "ubinary": {...}}, ...}}}; binary sections carry bytes_per_vector and
    retention_<metric> (binary / float at the same dimension). With `ignore_identical_ids` (BEIR's and MTEB's
    default) a document whose id is the query's id is never a hit, unless the benchmark's own protocol keeps it."""
    ignore_identical_ids = ignore_identical_ids and not benchmark.keeps_identical_ids
    k = max(MAP_CUTOFF, max(CUTOFFS))
    depth = k + 1 if ignore_identical_ids else k  # one more, so k remain after dropping the query itself
    full = corpus_emb.shape[1]
    truncations = [full] + sorted({d for d in dims if d < full}, reverse=True)
    packed = {
        d: quantize_embeddings(corpus_emb[:, :d].numpy(), "ubinary") for d in truncations if "ubinary" in precisions
    }
    rows: dict[str, dict] = {}
    for qs in benchmark.query_sets:
        query_emb = encode_queries(qs.query_texts)

        def score(positions: np.ndarray, qs=qs) -> dict[str, float]:
            ranked = [[benchmark.corpus_ids[p] for p in row] for row in positions]
            if ignore_identical_ids:
                ranked = drop_identical_ids(ranked, qs.query_ids, k)
            return ir_metrics(ranked, [qs.relevant[q] for q in qs.query_ids])

        per_dim = {}
        for d in truncations:
            queries, corpus = query_emb[:, :d], corpus_emb[:, :d]
            row = score(float_search(queries, corpus, depth)) | {"bytes_per_vector": 4 * d}
            if d in packed:
                query_packed = quantize_embeddings(queries.numpy(), "ubinary")
                variants = {
                    "ubinary": binary_search(query_packed, packed[d], depth),
                    "ubinary_asym": asymmetric_search(queries, packed[d], depth),
                }
                if rescore_multiplier > 0:
                    candidates = binary_search(query_packed, packed[d], depth * rescore_multiplier)
                    variants["ubinary_rescore"] = rescore(queries, packed[d], candidates, depth)
                for variant, positions in variants.items():
                    metrics = score(positions) | {"bytes_per_vector": int(packed[d].shape[1])}
                    metrics.update({f"retention_{m}": metrics[m] / row[m] if row[m] else 0.0 for m in TABLE_COLUMNS})
                    row[variant] = metrics
            per_dim[d] = row
        row = per_dim.pop(full)
        if per_dim:
            row["dims"] = {str(d): per_dim[d] for d in per_dim}
        rows[qs.name] = row
    if benchmark.mean_name and len(rows) > 1:
        rows[benchmark.mean_name] = mean_rows(list(rows.values()))
    return rows


def add_group_means(rows: dict[str, dict], benchmarks: list[Benchmark]) -> dict[str, dict]:
    """Append a mean row per benchmark group (over each member's rows) to `rows`."""
    groups: dict[str, list[str]] = {}
    for b in benchmarks:
        if b.group:
            groups.setdefault(b.group, []).extend(b.mean_name and [b.mean_name] or [q.name for q in b.query_sets])
    for group, names in groups.items():
        if len(names) > 1:
            rows[group] = mean_rows([rows[n] for n in names])
    return rows


def mean_rows(rows: list[dict]) -> dict:
    """Unweighted mean of metric rows (nested binary sections included); bytes per vector is the members' own."""
    out: dict = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = mean_rows([r[key] for r in rows if key in r])
        elif key == "bytes_per_vector":
            out[key] = value
        else:
            out[key] = float(np.mean([r[key] for r in rows]))
    return out


class RetrievalEvaluator(BaseEvaluator):
    """A sentence-transformers evaluator over our benchmarks, for the trainer's eval steps and end of run.

    Primary metric (what the trainer logs as `eval_<name>_ndcg@10` and what best-model selection would use):
    NDCG@10 of the first benchmark's headline row: its group mean (NanoBEIR, the per-source validation sets), its
    own mean (NASA SDE's two qrels files), or its single row (a BEIR folder)."""

    def __init__(
        self,
        benchmarks: list[Benchmark],
        name: str = "ir",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        show_progress_bar: bool = False,
        precisions: tuple[str, ...] = ("float32",),
        ignore_identical_ids: bool = True,
        dims: Sequence[int] = (),
        query_prompt: str | None = None,
        corpus_prompt: str | None = None,
    ):
        super().__init__()
        self.query_prompt, self.corpus_prompt = query_prompt, corpus_prompt
        self.dims = tuple(dims)
        self.show_progress_bar = show_progress_bar
        self.precisions = precisions
        self.benchmarks = benchmarks
        self.name = name
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.ignore_identical_ids = ignore_identical_ids
        self.primary_metric = PRIMARY_METRIC
        self.primary_row = benchmarks[0].headline
        self.last_rows: dict[str, dict] = {}
        self.last_step: int | None = None

    def compute_rows(self, model) -> dict[str, dict]:
        rows: dict[str, dict] = {}

        def encode_texts(texts: list[str], side: str, prompt: str | None) -> torch.Tensor:
            return encode(model, texts, self.batch_size, self.show_progress_bar, self.max_seq_length, side, prompt)

        for benchmark in self.benchmarks:
            query_prompt = self.query_prompt if benchmark.query_prompt is None else benchmark.query_prompt
            corpus_prompt = self.corpus_prompt if benchmark.corpus_prompt is None else benchmark.corpus_prompt
            corpus_emb = encode_texts(benchmark.corpus_texts, "document", corpus_prompt)
            rows.update(
                evaluate_benchmark(
                    benchmark,
                    corpus_emb,
                    lambda texts, prompt=query_prompt: encode_texts(texts, "query", prompt),
                    self.precisions,
                    ignore_identical_ids=self.ignore_identical_ids,
                    dims=self.dims,
                )
            )
        return add_group_means(rows, self.benchmarks)

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        self.last_rows = self.compute_rows(model)
        self.last_step = steps
        metrics = dict(_flat_metrics(self.last_rows))
        metrics[PRIMARY_METRIC] = self.last_rows[self.primary_row][PRIMARY_METRIC]
        return self.prefix_name_to_metrics(metrics, self.name)


def _flat_metrics(section: dict, prefix: str = ""):
    """(name, value) of every metric in nested result rows: row/metric, row/ubinary/metric, row/dims/256/metric."""
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _flat_metrics(value, f"{prefix}{key}/")
        elif key != "bytes_per_vector":
            yield f"{prefix}{key}", value


def prepare_evaluators(
    sources,
    benchmarks: list[Benchmark],
    batch_size: int = 32,
    max_seq_length: int | None = None,
    precisions: tuple[str, ...] = ("float32",),
    ignore_identical_ids: bool = True,
    dims: Sequence[int] = (),
    source_prompts: dict[str, dict[str, str]] | None = None,
):
    """In-training evaluators: per-source validation retrieval (primary: their mean NDCG@10) and the chosen
    benchmarks. Encoding goes through SentenceTransformer.encode, which sentence-transformers shares across DDP
    ranks while the trainer evaluates, so ranks do not redo each other's work. A source's validation set is
    embedded with its prompts (`source_prompts`: source -> column -> prompt), the benchmarks with the model's."""
    evaluators = []
    with_validation = [s for s in sources if len(s.validation)]
    group = "val/mean" if len(with_validation) > 1 else None
    prompts_of = {name: (columns["anchor"], columns["positive"]) for name, columns in (source_prompts or {}).items()}
    validation = [
        validation_benchmark(
            f"val/{s.spec.name}",
            s.validation["anchor"],
            s.validation["positive"],
            [t for c in s.validation.column_names if c.startswith("negative") for t in s.validation[c]] or None,
            group=group,
            prompts=prompts_of.get(s.spec.name),
        )
        for s in with_validation
    ]
    if validation:
        evaluators.append(RetrievalEvaluator(validation, name="validation", batch_size=batch_size))
    if benchmarks:
        evaluators.append(
            RetrievalEvaluator(
                benchmarks,
                name="benchmarks",
                batch_size=batch_size,
                max_seq_length=max_seq_length,
                precisions=precisions,
                show_progress_bar=True,
                ignore_identical_ids=ignore_identical_ids,
                dims=dims,
            )
        )
    if not evaluators:
        return None
    return evaluators[0] if len(evaluators) == 1 else SequentialEvaluator(evaluators, main_score_function=itemgetter(0))


def member(evaluator, name: str) -> RetrievalEvaluator | None:
    """The evaluator called `name` (prepare_evaluators' "validation" or "benchmarks"), or None."""
    return next((e for e in getattr(evaluator, "evaluators", [evaluator]) if getattr(e, "name", None) == name), None)


def benchmark_rows(model, evaluator: RetrievalEvaluator | None) -> dict[str, dict]:
    """Benchmark a model on every rank together: rank 0 runs the evaluator, the others serve its encoding (under
    the same autocast: they serve from inside the context)."""
    if evaluator is None:
        return {}
    rows = {}
    with inference_autocast(model.device), distributed_evaluation(model) as runs_evaluator:
        if runs_evaluator:
            rows = evaluator.compute_rows(model)
    return distributed.broadcast_object(rows)


def final_benchmark_rows(trainer, evaluator: RetrievalEvaluator | None) -> dict[str, dict]:
    """The final model's benchmark rows: those of the trainer's evaluation at the last step when there was one
    (transformers evaluates at the end of a run), else computed now. Rank 0 holds the evaluator's rows."""
    if evaluator is None:
        return {}
    fresh = evaluator.last_step == trainer.state.global_step
    rows = distributed.broadcast_object(evaluator.last_rows if fresh else None)
    return rows if rows is not None else benchmark_rows(trainer.model, evaluator)
