"""Check a mixture's training data against the benchmarks: no benchmark query and no judged (query, document) pair
may be trained on (model_exploration/overlap.py says how it is counted). Exit status 1 if one is.

    python data_prep/check_overlap.py --stage sample                       # the bundled pairs vs SciFact test
    python data_prep/check_overlap.py --stage 2 --hub_dir /shared/hub_mirror --cache_dir /shared/cache
    python data_prep/check_overlap.py --stage 1 --eval_benchmarks nanobeir nasa_smd nasa_sde --hub_dir DIR

It takes the trainer's flags, so it reads exactly what that run trains on (the same source caches, built here if
missing, and the same benchmarks with the same --doc_fields), and prints one row per benchmark row: how many of its
queries, judged pairs and documents are training texts, and in which sources.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model_exploration import cli, overlap, tracking
from model_exploration.benchmarks import load_benchmarks
from model_exploration.data import load_and_cache_datasets
from model_exploration.errors import exit_status
from model_exploration.st_trainer_ddp_hf import make_mirror, mixture_specs

logger = logging.getLogger("check_overlap")


def check(args) -> list[overlap.Overlap]:
    cache_dir = Path(args.cache_dir)
    mirror = make_mirror(args, cache_dir)
    benchmarks = [b for spec in args.eval_benchmarks for b in load_benchmarks(spec, mirror, args.doc_fields)]
    sources = load_and_cache_datasets(mixture_specs(args), cache_dir, args.nrows, args.seed,
                                      args.max_datapoints_per_src_for_eval, args.n_data_src, mirror, args.num_proc)  # fmt: skip
    return overlap.benchmark_overlap(sources, benchmarks)


def build_parser() -> argparse.ArgumentParser:
    parser, _ = cli.tool_parser("check_overlap.py", __doc__, "check_overlap")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    leaks = []

    def run() -> None:
        args = cli.parse_args(argv, build_parser())
        tracking.load_env()
        report = check(args)
        print(overlap.overlap_table(report))
        leaks.extend(e.row for e in report if e.leaks)
        print(
            f"\nqueries or judged pairs trained on: {', '.join(leaks)}"
            if leaks
            else "\nno benchmark query or judged pair is trained on"
        )

    status = exit_status(run)
    return status or (1 if leaks else 0)


if __name__ == "__main__":
    sys.exit(main())
