"""The workflow's public helpers, under the names users of the original scripts know (a façade: each lives in
the module of its concern).

build_dataset_configs_s1 / _s2 / _sample / _file(path)                                  -> list[SourceSpec]
load_and_cache_datasets(specs, cache_dir, nrows, seed, max_eval, n_data_src, mirror)      -> list[SourceData]
prepare_evaluators(sources, benchmarks, batch_size, max_seq_length, precisions)           -> evaluator | None
"""

from model_exploration.data import load_and_cache_datasets
from model_exploration.evaluation import prepare_evaluators
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
