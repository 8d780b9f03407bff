"""Mine hard negatives for the pair sources of a mixture and write the mixture that trains on them.

    python data_prep/mine_hard_negatives.py --stage sample --out mined/        # all pair sources, the stage's model
    python model_exploration/st_trainer_ddp_hf.py --mixture mined/mixture.yaml ...   # train on the triplets

It takes the trainer's flags (same mixture, model, --seed, --nrows, caches and --hub_dir), reads each source through
the same data path as training (its cached training split: held-out validation rows are never mined or trained
on), mines with sentence-transformers' mine_hard_negatives (model_exploration/negatives.py: guard, defaults) and
writes, under --out: `<source>_mined.jsonl` (anchor, positive, negative[_1..k]), `<source>_mined.json` (statistics
and settings) and `mixture.yaml`, the mixture with each mined pair source replaced by its triplet source (same
weight; other sources and the Stage-1 replay unchanged). `--dry_run` on that mixture shows how each was mined.
Before each source it logs the memory mining will hold (embeddings, candidate lists, texts); a source that needs
more than --mining_memory_gb is mined in chunks, and the output is written as it is mined. Anchors and passages are
embedded with the prompts training gives them (--query_prompt / --document_prompt / --prompts_from_model, the
mixture's and each source's own; docs/prompts.md), and mixture.yaml keeps them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

import psutil

from model_exploration import cli, prompts, tracking, unpadded
from model_exploration.data import load_and_cache_datasets
from model_exploration.errors import UserError, exit_status
from model_exploration.models import load_sentence_transformer, set_max_len
from model_exploration.negatives import (
    DEFAULT_NUM_NEGATIVES,
    DEFAULT_RELATIVE_MARGIN,
    MiningSettings,
    mine_source,
    mined_file,
    plan_mining,
    write_mined,
    write_mixture,
)
from model_exploration.sources import registry_entry
from model_exploration.st_trainer_ddp_hf import make_mirror, mixture_specs, run_prompts

logger = logging.getLogger("mine_hard_negatives")


def build_parser() -> argparse.ArgumentParser:
    parser, g = cli.tool_parser("mine_hard_negatives.py", __doc__, "mining")
    g.add_argument("--out", required=True, type=Path, help="folder for the mined sources and mixture.yaml")
    g.add_argument("--sources", nargs="+", default=None, metavar="NAME", help="pair sources to mine (default: all)")
    g.add_argument("--mining_model", default=None, help="the model that mines (default: --model_name, the trainee)")
    g.add_argument("--relative_margin", type=float, default=DEFAULT_RELATIVE_MARGIN,
                   help="false-negative guard: keep a candidate only if its similarity to the anchor is at least this "
                   "fraction below the positive's (0.05: NV-Retriever's 95%% filter)")  # fmt: skip
    g.add_argument("--num_negatives", type=int, default=DEFAULT_NUM_NEGATIVES, help="negatives per pair")
    g.add_argument("--range_max", type=int, default=50, help="candidates considered per anchor (nearest first)")
    g.add_argument("--mining_batch_size", type=int, default=64, help="texts per encoding batch while mining")
    g.add_argument("--mining_memory_gb", type=float, default=None,
                   help="host memory mining may hold; a source whose embeddings, candidates and texts need more is "
                   "mined in chunks, each pair's negatives drawn from its own chunk (default: 3/4 of the memory "
                   "available at start)")  # fmt: skip
    return parser


def run(argv: list[str] | None) -> Path:
    args = cli.parse_args(argv, build_parser())
    tracking.load_env()
    cache_dir = Path(args.cache_dir)
    mirror = make_mirror(args, cache_dir)
    specs = mixture_specs(args)
    # names checked before any cache is built; an expanded source ("math/algebra") by its own name or its parent
    listed = {s.name for s in specs if not s.replay_of}
    unlisted = sorted(n for n in args.sources or () if n not in listed and n.split("/")[0] not in listed)
    if unlisted:
        raise UserError(f"--sources: unknown source(s) {unlisted}; the mixture has {sorted(listed)}")
    sources = load_and_cache_datasets([s for s in specs if not s.replay_of], cache_dir, args.nrows, args.seed,
                                      args.max_datapoints_per_src_for_eval, args.n_data_src, mirror, args.num_proc)  # fmt: skip
    loaded = {s.spec.name for s in sources}
    unmatched = [n for n in args.sources or () if not any(m == n or m.split("/")[0] == n for m in loaded)]
    if unmatched:  # a misspelt config ("math/typo"), or a source left out by --n_data_src
        raise UserError(f"--sources: {unmatched} match no loaded source; loaded: {sorted(loaded)}")
    settings = MiningSettings(args.mining_model or args.model_name, args.relative_margin, args.num_negatives,
                              args.range_max, args.seed, args.mining_batch_size)  # fmt: skip
    model = load_sentence_transformer(mirror.model(settings.model_name), flag="--mining_model")
    # --prompts_from_model means the trainee's (--model_name) prompts, whichever model mines
    trainee = model.prompts if settings.model_name == args.model_name else None
    if trainee is None and args.prompts_from_model is not None:
        trainee = prompts.saved_prompts(mirror.model(args.model_name))
    run_prompt = run_prompts(args, trainee)
    if args.model_max_len:
        set_max_len(model, args.model_max_len)
    unpadded.enable_unpadded(model)
    budget = int(args.mining_memory_gb * 1e9) if args.mining_memory_gb else psutil.virtual_memory().available * 3 // 4
    entries = []
    for source in sources:
        name = source.spec.name
        chosen = not args.sources or name in args.sources or name.split("/")[0] in args.sources
        wanted = chosen and not source.spec.negatives
        if not wanted:
            entries.append(registry_entry(source.spec))
            continue
        texts = source.train.select_columns(["anchor", "positive"])
        plan = plan_mining(len(texts), texts.data.nbytes / len(texts), model.get_embedding_dimension(), settings,
                           budget, faiss=importlib.util.find_spec("faiss") is not None)  # fmt: skip
        logger.info("mining %s", plan.describe(name))
        started = time.perf_counter()
        columns = prompts.source_prompts(source.spec, run_prompt)
        logger.info("%s: prompts %s", name, prompts.describe_columns(columns))
        stats = mine_source(source.train, model, settings, plan, mined_file(args.out, source.spec),
                            (columns["anchor"], columns["positive"]))  # fmt: skip
        stats["seconds"] = round(time.perf_counter() - started, 1)
        if not stats["rows"]:  # nothing passed the guard: the pairs stay as they are
            logger.warning("%s: no candidate passed the guard (relative margin %s); kept as pairs",
                           source.spec.name, settings.relative_margin)  # fmt: skip
            entries.append(registry_entry(source.spec))
            continue
        entries.append(write_mined(args.out, source.spec, stats, settings))
    replay = next((s for s in specs if s.replay_of), None)
    replay_section = (
        {
            "name": replay.name,
            "weight": replay.weight,
            "rows_per_source": replay.rows_per_source or 0,
            "triplets": any(m.negatives for m in replay.replay_of),
        }  # fmt: skip
        if replay
        else None
    )
    defaults = {"query_prompt": run_prompt.query, "document_prompt": run_prompt.document}
    write_mixture(args.out / "mixture.yaml", entries, replay_section, {k: v for k, v in defaults.items() if v})
    return args.out / "mixture.yaml"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    def report() -> None:
        mixture = run(argv)
        print(f"wrote {mixture}; train with: python model_exploration/st_trainer_ddp_hf.py --mixture {mixture} ...")

    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
