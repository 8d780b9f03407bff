"""Compare checkpoints on retrieval benchmarks and write results.json / .csv / .md and a bar chart per benchmark.

    python model_exploration/compare.py --models M1 M2 --benchmarks nanobeir nasa_smd nasa_sde beir:PATH \\
        --output_dir DIR [--precision ubinary] [--rescore_multiplier 4]

A model is a hub id or a local SentenceTransformer folder (trainer checkpoints included). Re-running skips the
model x benchmark pairs already in DIR (same precision and prompt settings); corpus embeddings are cached per model,
benchmark and document prompt under DIR/embeddings, so adding a precision or a metric does not re-encode a corpus.

Prompts (docs/prompts.md): each model embeds queries and documents with its own saved prompts by default, the ones
its `encode_query` / `encode_document` apply; `--query_prompt` / `--document_prompt` (text) or
`--query_prompt_name` / `--document_prompt_name` (a name in the model's `prompts`) override them, one value for all
models or one per model. Each row records the prompts it used (JSON, CSV, and the table's model label).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from model_exploration import config, evaluation, prompts, reporting, unpadded
from model_exploration.benchmarks import canonical_spec, load_benchmarks
from model_exploration.cli import HUB_DIR_ENV, doc_fields, shown_default
from model_exploration.encoding import encode_fast
from model_exploration.errors import UserError, exit_status
from model_exploration.fetch import Mirror
from model_exploration.keys import short_hash, slug
from model_exploration.models import capped_len, load_sentence_transformer
from model_exploration.reporting import read_json

logger = logging.getLogger("compare")
DONE_FILE = "evaluated.json"
COMPARE = "model_exploration/compare.py"
PREFETCH_HINT = "python data_prep/prefetch.py --skip_sources --skip_model --eval_benchmarks <the --benchmarks above>"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="a YAML mapping of these flags' names (without dashes) to values, e.g. a recipe of recipes/ that says "
        "run_with: model_exploration/compare.py; flags given on the command line override it",
    )
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="print, offline, the models (where each is read from), benchmarks, precisions and the pairs already "
        "evaluated in --output_dir, then exit",
    )
    p.add_argument("--models", nargs="+", required=True, help="hub ids or local SentenceTransformer folders")
    p.add_argument("--benchmarks", nargs="+", required=True, help="nanobeir, nasa_smd, nasa_sde, beir:PATH")
    p.add_argument(
        "--output_dir",
        required=True,
        type=Path,
        help="results.json / .csv / .md, charts and the corpus embedding caches; a re-run skips what it holds",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        default=["float32"],
        choices=["float32", "ubinary"],
        help="one value for all models, or one per model; ubinary adds 1-bit rows: Hamming (1-bit queries) and "
        "asymmetric (float queries against the documents' bits)",
    )
    p.add_argument(
        "--rescore_multiplier",
        type=int,
        default=0,
        help="ubinary: also re-rank the top k x this many Hamming hits with the float query (0 = off)",
    )
    p.add_argument(
        "--token_budget",
        type=int,
        default=16384,
        help="padded tokens per encoding batch (texts are sorted by token count; see encoding.py)",
    )
    p.add_argument("--max_seq_length", type=int, default=None, help="default: each model's own")
    p.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=(),
        metavar="DIM",
        help="also score each model on its embeddings truncated to these dimensions (Matryoshka), from the same "
        "corpus encoding, float and (with --precision ubinary) 1-bit; adds an NDCG@10-vs-bytes chart",
    )
    p.add_argument("--no_charts", action="store_true", help="skip the PNG bar charts")
    shown_default(
        p.add_argument(
            "--hub_dir",
            default=os.environ.get(HUB_DIR_ENV),
            help=f"read hub benchmarks and models only from this mirror (data_prep/prefetch.py; env {HUB_DIR_ENV}); "
            "without it benchmarks are fetched into <output_dir>/hub and models into the Hugging Face cache",
        ),
        f"${HUB_DIR_ENV}",
    )
    p.add_argument(
        "--doc_fields",
        type=doc_fields,
        default=None,
        metavar="FIELDS",
        help="the corpus fields a document is embedded from, e.g. title,text or text (default: each benchmark's "
        "published protocol: text for NASA SMD / SDE as the paper, title,text for beir: folders)",
    )
    p.add_argument(
        "--keep_identical_ids",
        dest="ignore_identical_ids",
        action="store_false",
        help="count a retrieved document whose id equals the query id (BEIR and MTEB drop it by default)",
    )
    p.add_argument(
        "--no_unpad", dest="unpad", action="store_false", help="encode with the stock padded forward of BERT models"
    )
    for side, example in (("query", "'query: '"), ("document", "'passage: '; `query` = the query prompt")):
        p.add_argument(
            f"--{side}_prompt",
            nargs="+",
            default=None,
            metavar="TEXT",
            help=f"prompt for the {side} side instead of each model's own, e.g. {example} ('' = none); one for all "
            "models or one per model",
        )
        p.add_argument(
            f"--{side}_prompt_name",
            nargs="+",
            default=None,
            metavar="NAME",
            help=f"the {side} side's prompt by its name in each model's saved `prompts` (one, or one per model)",
        )
    return p


def per_model(values: list | None, models: list[str], flag: str) -> list:
    """A flag's value for each model: one value for all, or one per model (None for each if not given)."""
    if values is None:
        return [None] * len(models)
    if len(values) not in (1, len(models)):
        raise UserError(f"{flag}: give one value or one per model ({len(models)}), got {len(values)}")
    return values * len(models) if len(values) == 1 else list(values)


def model_prompts(model, name: str, query=None, document=None, query_name=None, document_name=None):
    """A model's query and document prompts: its own (those encode_query / encode_document apply), unless a text or
    a name of its saved prompts is given for a side."""
    who = f"--models {name}"
    own = prompts.own_prompts(model.prompts, who, "--query_prompt_name", query_name)
    if document_name:
        own = dataclasses.replace(
            own,
            document=prompts.own_prompts(model.prompts, who, "--document_prompt_name", None, document_name).document,
        )
    query = own.query if query is None else query
    document = own.document if document is None else document
    given = any(v is not None for v in (query_name, document_name)) or (query, document) != (own.query, own.document)
    return prompts.Prompts(
        query, query if document == prompts.SYMMETRIC else document, "given" if given else own.origin
    )


def model_fingerprint(model_name: str) -> str:
    """Identity of a model's weights: a local folder by its weight files' sizes and mtimes, a hub id by name."""
    path = Path(model_name)
    if path.is_dir():
        stats = sorted(
            (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in path.rglob("*")
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json")
        )
        payload = json.dumps([str(path.resolve()), stats])
    else:
        payload = model_name
    return short_hash(payload)


def cached_corpus_embeddings(
    model, model_name: str, benchmark, args, cache_root: Path, max_len: int, prompt: str = ""
) -> torch.Tensor:
    # without a prompt the key is as it was before prompts existed, so those caches stay valid
    key = short_hash(
        f"{model_fingerprint(model_name)}|{benchmark.fingerprint()}|{max_len}" + (f"|{prompt}" * bool(prompt))
    )
    path = cache_root / slug(model_name) / f"{slug(benchmark.name)}-{key}.npy"
    if path.exists():
        try:
            return torch.from_numpy(np.load(path))
        except (ValueError, OSError, EOFError):
            logger.warning("embedding cache %s is unreadable; encoding the corpus again", path)
    emb = encode_fast(model, benchmark.corpus_texts, args.token_budget, max_len, show_progress_bar=True, prompt=prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.save(f, emb.numpy())
    os.replace(tmp, path)  # a killed run never leaves a truncated cache behind
    return emb


def load_model(name: str, unpad: bool = True):
    """fp32 weights, encoded under the trainer's autocast (encode_fast): the scores of its in-training evaluation."""
    model = load_sentence_transformer(name, flag="--models")
    if unpad:
        unpadded.enable_unpadded(model)
    return model


def plan(args, precisions: dict[str, str], done: dict) -> list[str]:
    """--dry_run: what a comparison would evaluate, offline: each model and where it is read from, the benchmarks,
    the precisions, and the model x benchmark pairs already in --output_dir."""
    described = config.description(args.config) if args.config else None
    lines = [f"config {args.config}" + (f": {described}" if described else "")] if args.config else []
    lines.append(f"output: {args.output_dir}; benchmarks: {' '.join(args.benchmarks)}")
    for name in args.models:
        if Path(name).is_dir():
            where = "local folder"
        elif name.count("/") != 1 or name.startswith((".", "/")) or Path(name).exists():
            where = "NOT FOUND: no such local folder (train it first, or pass --models with its path)"
        elif args.hub_dir:
            there = (Path(args.hub_dir) / "models" / name / "modules.json").exists()
            fetch = f"python data_prep/prefetch.py --skip_sources --eval_benchmarks --model_name {name} --out {args.hub_dir}"
            where = f"hub id, read from the mirror {args.hub_dir} ({'there' if there else 'MISSING: ' + fetch})"
        else:
            where = "hub id, fetched into the Hugging Face cache at start"
        finished = sorted(b for b in args.benchmarks if b in done.get(name, {}))
        lines.append(
            f"model {name}: {where}; precision {precisions[name]}"
            + (f"; dims {' '.join(map(str, args.dims))}" if args.dims else "")
            + (f"; already evaluated: {' '.join(finished)}" if finished else "")
        )
    return lines


def run(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(config.expand(parser, argv, COMPARE))
    if len(args.precision) not in (1, len(args.models)):
        raise UserError(f"--precision: give one value or one per model ({len(args.models)}), got {len(args.precision)}")
    precisions = dict(
        zip(args.models, args.precision * len(args.models) if len(args.precision) == 1 else args.precision)
    )
    for side in ("query", "document"):
        if getattr(args, f"{side}_prompt") is not None and getattr(args, f"{side}_prompt_name") is not None:
            raise UserError(f"--{side}_prompt and --{side}_prompt_name both set the {side} prompt; keep one")
    prompt_flags = {
        flag: dict(zip(args.models, per_model(getattr(args, flag), args.models, f"--{flag}")))
        for flag in ("query_prompt", "document_prompt", "query_prompt_name", "document_prompt_name")
    }
    out: Path = args.output_dir
    args.benchmarks = list(dict.fromkeys(canonical_spec(b) for b in args.benchmarks))
    if args.dry_run:
        print("\n".join(plan(args, precisions, read_json(out / DONE_FILE, {}, "progress file"))))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    results = read_json(out / "results.json", {}, "results file")
    done = read_json(out / DONE_FILE, {}, "progress file") if results else {}  # no results: nothing is done
    mirror = Mirror(args.hub_dir or out / "hub", offline=bool(args.hub_dir), prefetch_hint=PREFETCH_HINT)

    def signature(model_name: str) -> str:
        rescore = args.rescore_multiplier if precisions[model_name] == "ubinary" else 0
        # the 1-bit searches a result holds (results from before the asymmetric search are redone)
        binary = "|searches=hamming,asym" if precisions[model_name] == "ubinary" else ""
        identical = "ignore" if args.ignore_identical_ids else "keep"
        dims = ",".join(map(str, sorted(args.dims)))
        docs = ",".join(args.doc_fields or ("default",))
        # the prompts asked for (results from before prompts existed are redone: a model's own now apply)
        given = "|".join(str(prompt_flags[flag][model_name]) for flag in prompt_flags)
        return (f"{precisions[model_name]}|rescore={rescore}|max_len={args.max_seq_length}|identical_ids={identical}"
                f"|dims={dims}|docs={docs}{binary}|prompts={given}")  # fmt: skip

    loaded: dict[str, list] = {}
    for model_name in args.models:
        todo = [b for b in args.benchmarks if done.get(model_name, {}).get(b) != signature(model_name)]
        if not todo:
            logger.info("%s: all benchmarks already in %s, skipped", model_name, out / "results.json")
            continue
        model = load_model(mirror.model(model_name), args.unpad)
        max_len = capped_len(model, args.max_seq_length or model.max_seq_length, "--max_seq_length")
        used = model_prompts(model, model_name, *(prompt_flags[flag][model_name] for flag in prompt_flags))
        logger.info("%s: prompts %s", model_name, used.describe())
        for spec in todo:
            if spec not in loaded:
                loaded[spec] = load_benchmarks(spec, mirror, args.doc_fields)
            rows: dict[str, dict] = {}
            for benchmark in loaded[spec]:
                corpus_emb = cached_corpus_embeddings(
                    model, model_name, benchmark, args, out / "embeddings", max_len, used.document
                )
                encode_queries = partial(encode_fast, model, token_budget=args.token_budget, max_seq_length=max_len,
                                         prompt=used.query)  # fmt: skip
                rows.update(
                    evaluation.evaluate_benchmark(
                        benchmark,
                        corpus_emb,
                        encode_queries,
                        precisions=("float32", precisions[model_name]),
                        rescore_multiplier=args.rescore_multiplier,
                        ignore_identical_ids=args.ignore_identical_ids,
                        dims=args.dims,
                    )
                )
            evaluation.add_group_means(rows, loaded[spec])
            for row in rows.values():  # which prompts each row used
                row.update(query_prompt=used.query, document_prompt=used.document)
            results.setdefault(model_name, {}).update(rows)
            done.setdefault(model_name, {})[spec] = signature(model_name)
            # written after every pair, so an interrupted comparison keeps what it finished
            reporting.write_results(results, out, charts=False)
            reporting.write_atomic(out / DONE_FILE, json.dumps(done, indent=2))
            for name, row in rows.items():
                extra = "".join(
                    f"  {v}: ndcg@10 {row[v]['ndcg@10']:.4f} (retention {row[v]['retention_ndcg@10']:.3f})"
                    for v in reporting.BINARY_VARIANTS
                    if v in row
                )
                print(f"{model_name} | {name} | ndcg@10 {row['ndcg@10']:.4f}{extra}", flush=True)
    reporting.write_results(results, out, charts=not args.no_charts)
    print(reporting.markdown_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return exit_status(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
