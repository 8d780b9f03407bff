"""The workflow's public helpers, under the names users of the original scripts know.

build_dataset_configs_s1 / _s2 / _sample / _file(path)                          -> list[SourceSpec]
load_and_cache_datasets(specs, cache_dir, nrows, seed, max_eval, n_data_src)      -> list[SourceData]
prepare_evaluators(sources, benchmarks, batch_size, max_seq_length, precisions)    -> evaluator | None
"""

from __future__ import annotations

from operator import itemgetter

from sentence_transformers.base.evaluation.sequential import SequentialEvaluator

from model_exploration.data import SourceData, load_and_cache_datasets
from model_exploration.evaluation import Benchmark, RetrievalEvaluator, validation_benchmark
from model_exploration.sources import (
    build_dataset_configs_file,
    build_dataset_configs_s1,
    build_dataset_configs_s2,
    build_dataset_configs_sample,
)

__all__ = [
    "build_dataset_configs_file",
    "build_dataset_configs_s1",
    "build_dataset_configs_s2",
    "build_dataset_configs_sample",
    "load_and_cache_datasets",
    "prepare_evaluators",
]


def prepare_evaluators(
    sources: list[SourceData],
    benchmarks: list[Benchmark],
    batch_size: int = 32,
    max_seq_length: int | None = None,
    precisions: tuple[str, ...] = ("float32",),
):
    """In-training evaluators: per-source validation retrieval (its mean NDCG@10 is the primary metric) and the
    chosen benchmarks. Encoding goes through SentenceTransformer.encode, which sentence-transformers shares
    across DDP ranks while the trainer evaluates, so ranks do not redo each other's work."""
    evaluators = []
    validation = [
        validation_benchmark(
            f"val/{s.spec.name}",
            s.validation["anchor"],
            s.validation["positive"],
            s.validation["negative"] if "negative" in s.validation.column_names else None,
            group="val/mean",
        )
        for s in sources
        if len(s.validation)
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
            )
        )
    if not evaluators:
        return None
    return evaluators[0] if len(evaluators) == 1 else SequentialEvaluator(evaluators, main_score_function=itemgetter(0))
