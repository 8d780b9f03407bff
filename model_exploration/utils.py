"""The workflow's public helpers, under the names users of the original scripts know (a façade: each lives in
the module of its concern).

build_dataset_configs_s1(enable, disable) / _sample(enable, disable)                       -> list[SourceSpec]
build_dataset_configs_s2(enable, disable, sde_weight_scale, stage1_replay_weight, arxiv_path,
                         replay_rows_per_source, replay_triplets)                          -> list[SourceSpec]
build_dataset_configs_file(path, enable, disable)                                          -> list[SourceSpec]
load_and_cache_datasets(specs, cache_dir, nrows, seed, max_eval, n_data_src, mirror, num_proc)
                                                                                           -> list[SourceData]
prepare_evaluators(sources, benchmarks, batch_size, max_seq_length, precisions, ignore_identical_ids, dims)
                                                                                           -> evaluator | None
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
