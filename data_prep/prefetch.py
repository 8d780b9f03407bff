"""Fetch exactly the files a training run reads into a mirror folder, on a machine with internet (a login node),
so that GPU nodes without internet train from it with `--hub_dir DIR` (or ST_HUB_DIR=DIR).

    python data_prep/prefetch.py --stage 1 --out /shared/hub_mirror
    python data_prep/prefetch.py --stage 2 --out /shared/hub_mirror          # Stage 2 + the Stage-1 replay
    python data_prep/prefetch.py --stage 1 --nrows 200 --n_data_src 3 --out /shared/hub_mirror   # a smoke test's share
    python data_prep/prefetch.py --skip_sources --eval_benchmarks nanobeir nasa_smd nasa_sde --out DIR  # compare.py

It takes the trainer's flags (same mixture, same --nrows / --n_data_src / --enable_sources / --disable_sources /
--stage1_replay_* / --eval_benchmarks / --model_name), so it fetches what that run reads: every (expanded)
source, the Stage-1 replay's sources for Stage 2, the benchmarks, and the model. Run it again after an
interruption: finished sets of files are skipped (their manifests exist), and a file cut short resumes (hub
files through huggingface_hub, NCBI files through HTTP range requests). The hub token (HF_TOKEN, or
HUGGINGFACE_TOKEN in .env) and Kaggle credentials (.env) are read as in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from model_exploration import cli, tracking
from model_exploration.benchmarks import load_benchmarks
from model_exploration.errors import exit_status
from model_exploration.fetch import Mirror
from model_exploration.st_trainer_ddp_hf import mixture_specs

logger = logging.getLogger("prefetch")


def build_parser() -> argparse.ArgumentParser:
    parser, g = cli.tool_parser("prefetch.py", __doc__, "prefetch")
    g.add_argument("--out", required=True, type=Path, help="the mirror folder (pass it to training as --hub_dir)")
    g.add_argument("--skip_sources", action="store_true", help="fetch no training source")
    g.add_argument("--skip_model", action="store_true", help="do not fetch --model_name")
    return parser


def prefetch(args) -> list[str]:
    """Fetch sources, benchmarks and the model into args.out; returns one summary line per item."""
    mirror = Mirror(args.out, offline=False)
    lines = []

    def timed(label: str, fetch) -> None:
        started = time.perf_counter()
        detail = fetch()
        lines.append(f"{label:56} {detail}  ({time.perf_counter() - started:.0f} s)")
        print(lines[-1], flush=True)

    if not args.skip_sources:
        specs = [m for spec in mixture_specs(args) for m in mirror.expand(spec)]
        if args.n_data_src is not None:
            specs = specs[: args.n_data_src]
        for spec in specs:
            members = [m for s in spec.replay_of for m in mirror.expand(s)] if spec.replay_of else [spec]
            for member in members:
                if member.fetch != "jsonl":
                    for split in mirror.split_members(member):
                        label = f"source {member.name}" + (
                            f" [{split.split}]" if split.fetch in ("hub", "parquet_export") else ""
                        )
                        label += " (replay)" if spec.replay_of else ""
                        timed(label, lambda m=split: f"{len(mirror.source_files(m, args.nrows).paths)} file(s)")
    for benchmark in args.eval_benchmarks:
        if not benchmark.startswith("beir:"):
            timed(f"benchmark {benchmark}", lambda b=benchmark: f"{len(load_benchmarks(b, mirror))} corpus/corpora")
    if not args.skip_model and not Path(args.model_name).exists():
        timed(f"model {args.model_name}", lambda: str(mirror.fetch_model(args.model_name)))
    return lines


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    def run() -> None:
        args = cli.parse_args(argv, build_parser())
        tracking.load_env()
        lines = prefetch(args)
        print(f"\n{len(lines)} item(s) in {args.out}; train offline with --hub_dir {args.out}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
