"""Fine-tune a Sentence Transformer on a weighted mixture of (query, passage) sources, in one process or under
torchrun DDP, and finish with a benchmark table.

    python model_exploration/st_trainer_ddp_hf.py --stage sample --model_name PATH --wb_mode disabled
    torchrun --nproc_per_node=auto model_exploration/st_trainer_ddp_hf.py --stage 2 ...

The run, top to bottom: parse flags -> resolve the mixture and its mirror (fetch.py) -> (dry run: print the plan;
--build_caches_only: build them) -> join the process group -> pick the run folder -> load the model -> load the
benchmarks (rank 0 fetches) -> with --hub_dir, check every input is in the mirror -> write the run folder ->
build/read the source caches (rank 0 builds) -> evaluators -> [sample stage: benchmark the starting model] ->
train (resumable) -> save -> benchmark -> results.json / .md -> the model card with them -> [--push_to_hub].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from datasets import DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from model_exploration import (
    binary,
    cli,
    config,
    distributed,
    evaluation,
    pretokenize,
    prompts,
    release,
    reporting,
    tracking,
    unpadded,
)
from model_exploration.benchmarks import load_benchmarks
from model_exploration.data import COMPLETE_MARKER, cache_path_for, check_offline_inputs
from model_exploration.errors import UserError, exit_status
from model_exploration.fetch import Mirror, default_root
from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss
from model_exploration.models import (
    bf16_native,
    capped_len,
    freeze_unused_pooler,
    load_sentence_transformer,
    set_max_len,
    transformer_config,
)
from model_exploration.sources import mixture_prompt_defaults
from model_exploration.training import (
    CHECKPOINT_MARKER,
    CheckpointCompleteCallback,
    MixtureTrainer,
    PreemptionCallback,
    missing_from_checkpoint,
    newest_complete_checkpoint,
    unmarked_but_resumable,
)
from model_exploration.utils import (
    build_dataset_configs_file,
    build_dataset_configs_s1,
    build_dataset_configs_s2,
    build_dataset_configs_sample,
    load_and_cache_datasets,
    prepare_evaluators,
)

logger = logging.getLogger("st_trainer")
# transformers renamed TrainingArguments.gradient_checkpointing to activation_checkpointing (the old name warns)
CHECKPOINTING_FIELD = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
)


def mixture_specs(args):
    if args.mixture:
        return build_dataset_configs_file(args.mixture, args.enable_sources, args.disable_sources)
    if args.stage == "1":
        return build_dataset_configs_s1(args.enable_sources, args.disable_sources)
    if args.stage == "2":
        return build_dataset_configs_s2(
            args.enable_sources,
            args.disable_sources,
            args.sde_weight_scale,
            args.stage1_replay_weight,
            args.arxiv_path,
            args.stage1_replay_rows,
            args.stage1_replay_triplets,
        )
    return build_dataset_configs_sample(args.enable_sources, args.disable_sources)


def run_prompts(args, model_prompts: dict[str, str] | None) -> prompts.Prompts:
    """The run's prompts (prompts.py): flags, the starting model's own (`model_prompts`), or the mixture file's."""
    return prompts.run_prompts(args, mixture_prompt_defaults(args.stage, args.mixture), model_prompts)


def source_prompts(sources, run: prompts.Prompts) -> dict[str, dict[str, str]]:
    """Source name -> column -> prompt of the loaded sources."""
    return {s.spec.name: prompts.source_prompts(s.spec, run) for s in sources}


def prefetch_command(args) -> str:
    """The login-node command that fetches what this run reads (named in every 'not in the mirror' error)."""
    what = f"--mixture {args.mixture}" if args.mixture else f"--stage {args.stage}"
    nrows = f" --nrows {args.nrows}" if args.nrows else ""
    return f"python data_prep/prefetch.py {what}{nrows}"


def make_mirror(args, cache_dir: Path) -> Mirror:
    """--hub_dir: read only from it (air-gapped nodes); else <cache_dir>/hub, filled on demand by rank 0."""
    root = args.hub_dir or default_root(cache_dir)
    return Mirror(root, offline=bool(args.hub_dir), prefetch_hint=prefetch_command(args))


def print_plan(specs, args, cache_dir: Path, mirror: Mirror) -> None:
    """What a run would train on, offline: sources, columns, weights, where each sits in the mirror (one line per
    hub split, with its rows where parquet footers tell them), cache paths and, once built, the rows each split gave."""
    total_weight = sum(s.weight for s in specs)
    if args.config:
        print(f"config: {args.config}" + (f": {text}" if (text := config.description(args.config)) else ""))
    flags = config.command_line(args, cli.build_parser(), cli.machine_defaults(args))
    print(f"flags (those not at their defaults): {shlex.join(flags) or 'none'}")
    run_prompt = plan_prompts(args, mirror)
    print(f"{args.mixture or 'stage ' + args.stage}: {len(specs)} sources; a batch comes from source i with p ~ weight_i x size_i "
          f"(sizes are known once loaded; weight share shown)")  # fmt: skip
    print(f"mirror: {mirror.root} ({'read only: --hub_dir' if mirror.offline else 'filled on demand by rank 0'})")
    print(f"{'source':48} {'weight':>8} {'w-share':>8}  fetch / columns / mirror / cache")
    for s in specs:
        expand = "  (one source per config of the parquet export)" if s.expand_configs else ""
        print(f"{s.name:48} {s.weight:8.3f} {s.weight / total_weight:8.2%}  {s.describe()}{expand}")
        if not s.replay_of:
            for line in mirror.describe(s, args.nrows):
                print(f"{'':67}mirror: {line}")
        cache = cache_path_for(cache_dir, s, args.nrows, args.seed, args.max_datapoints_per_src_for_eval)
        print(f"{'':67}cache: {cache}{built_rows(cache)}")
        if run_prompt is not None:
            print(f"{'':67}prompts: {prompts.describe_columns(prompts.source_prompts(s, run_prompt))}")
        for member in s.replay_of:
            print(f"{'':67}replays {member.name}: {member.describe()}")
            for line in mirror.describe(member, args.nrows):
                print(f"{'':71}mirror: {line}")
        if s.replay_of:
            left_out = [m.name for m in build_dataset_configs_s1() if m.is_triplet and m not in s.replay_of]
            if left_out:
                print(
                    f"{'':67}not replayed (triplet sources; --stage1_replay_triplets adds them): {', '.join(left_out)}"
                )
    print(f"model: {args.model_name}: {model_plan(args, mirror)}")
    saved = "the model's saved prompts (not available offline yet)"
    print(f"prompts: {run_prompt.describe() if run_prompt else saved}")
    print(f"benchmarks: {' '.join(args.eval_benchmarks) or 'none'}")


def plan_prompts(args, mirror: Mirror) -> prompts.Prompts | None:
    """The run's prompts for the dry run, the model's read from its saved config (no weights); None when
    --prompts_from_model names a model that is not here yet."""
    model_prompts = None
    if args.prompts_from_model is not None:
        try:
            model_prompts = prompts.saved_prompts(mirror.model(args.model_name))
        except UserError:  # not in the mirror: model_plan says so
            pass
        if model_prompts is None:
            return None
    return run_prompts(args, model_prompts)


def model_plan(args, mirror: Mirror) -> str:
    """How the model would train, read from its config alone (no weights): the fast path or why not."""
    try:
        location = mirror.model(args.model_name)
    except UserError as exc:
        return str(exc).split(": ", 1)[1]
    config = transformer_config(location)
    if config is None:
        return "not available offline yet (fetched at start-up); its config decides the fast path"
    return unpadded.describe(config)


def built_rows(cache: Path) -> str:
    """' (built: ...)' with the pairs a built cache holds and the raw rows each hub split gave, else ''."""
    marker = cache / COMPLETE_MARKER
    if not marker.exists():
        return ""
    meta = json.loads(marker.read_text())
    per_split = ", ".join(f"{split} {rows:,}" for split, rows in meta.get("rows_per_split", {}).items())
    read = f"; rows read: {per_split}" if per_split else ""
    return f"  (built: {meta['train']:,} train + {meta['validation']:,} validation pairs{read})"


def build_caches(specs, args, cache_dir: Path, mirror: Mirror) -> None:
    """--build_caches_only: every source cache (and token cache with --pretokenize) in this process, then a table."""
    if distributed.world_size() > 1:
        raise UserError("--build_caches_only runs in one process: start it with python, not torchrun")
    started = time.perf_counter()
    sources = load_and_cache_datasets(specs, cache_dir, args.nrows, args.seed, args.max_datapoints_per_src_for_eval,
                                      args.n_data_src, mirror, args.num_proc)  # fmt: skip
    if args.pretokenize:
        model, _ = load_model(args, mirror)
        per_source = source_prompts(sources, run_prompts(args, model.prompts))
        for s in sources:
            pretokenize.pretokenize_source(s, model.tokenizer, model.max_seq_length, args.num_proc,
                                           per_source[s.spec.name])  # fmt: skip
    print(f"{'source':48} {'train':>10} {'val':>6} {'dropped':>8}  cache")
    for s in sources:
        print(f"{s.spec.name:48} {len(s.train):10d} {len(s.validation):6d} {s.dropped_empty:8d}  {s.cache_path}")
    print(f"{len(sources)} source caches ready in {time.perf_counter() - started:.0f} s under {cache_dir}")


def resolve_output_dir(args) -> tuple[Path, str | None]:
    """(run folder, checkpoint to resume). Rank 0 picks a fresh run name and shares it, so all ranks agree."""
    if args.resume_checkpoint_path:
        path = Path(args.resume_checkpoint_path)
        if not path.exists():
            raise UserError(f"--resume_checkpoint_path: {path} does not exist")
        if path.name.startswith("checkpoint-"):
            missing = missing_from_checkpoint(path)
            if missing == [CHECKPOINT_MARKER] and unmarked_but_resumable(path):
                logger.warning("%s has no %s (not written by this version); resuming from it as named, trusting "
                               "that every rank finished writing it", path, CHECKPOINT_MARKER)  # fmt: skip
            elif missing:
                raise UserError(
                    f"--resume_checkpoint_path: {path} is incomplete (missing {', '.join(missing[:5])}); pass its run "
                    f"folder {path.parent} to resume from the newest complete checkpoint"
                )
        else:
            path = newest_complete_checkpoint(path)
            if path is None:
                raise UserError(f"--resume_checkpoint_path: no complete checkpoint in {args.resume_checkpoint_path}")
        return path.parent, str(path)
    name = args.run_name or distributed.broadcast_object(
        f"{Path(args.model_name).name}-stage{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return Path(args.output_base) / name, None


def load_model(args, mirror: Mirror) -> tuple[SentenceTransformer, int]:
    """The model with max_seq_length set for training, and its own max_seq_length (the evaluation default)."""
    with distributed.rank0_first():  # one download, then the others read the hub cache
        model = load_sentence_transformer(mirror.model(args.model_name))
    native_max_len = model.max_seq_length
    wanted = args.model_max_len or (native_max_len if args.stage == "sample" else cli.DEFAULT_MAX_LEN)
    set_max_len(model, wanted)
    if args.unpad and unpadded.enable_unpadded(model):
        logger.info("unpadded forward on: dense layers and attention skip padding tokens (--no_unpad to turn off)")
    too_large = [d for d in args.matryoshka_dims or () if d > model.get_embedding_dimension()]
    if too_large:
        raise UserError(
            f"--matryoshka_dims {too_large}: the model's embeddings have {model.get_embedding_dimension()} dimensions"
        )
    freeze_unused_pooler(model)
    return model, native_max_len


def matryoshka_weights(args, dims: list[int]) -> list[float]:
    """One weight per dimension of `dims` (full first): --matryoshka_weights, or the full dimension as heavy as all
    truncations together (with equal weights, four dimensions left the full one 0.010 NDCG@10 behind the plain
    fine-tune in the 80-step runs of docs/results.md)."""
    if args.matryoshka_weights is None:
        return [float(len(dims) - 1)] + [1.0] * (len(dims) - 1)
    if len(args.matryoshka_weights) != len(dims):
        raise UserError(
            f"--matryoshka_weights: {len(args.matryoshka_weights)} values for {len(dims)} dimensions "
            f"({' '.join(map(str, dims))}: the full dimension first); give one per dimension"
        )
    return args.matryoshka_weights


def build_loss(args, model, surrogate: binary.BinarySurrogate | None):
    """MNRL, its GradCache form (--mini_batch_size) or the binary-aware MNRL (--bat); all gather negatives
    across ranks with --gather_across_devices, for any per-rank batch sizes (losses.py); wrapped in
    sentence-transformers' MatryoshkaLoss with --matryoshka_dims."""
    gather = args.gather_across_devices
    if surrogate:
        loss = binary.BinaryAwareMNRLoss(
            model, surrogate, args.bat_float_weight, args.bat_asymmetric, gather_across_devices=gather
        )
    elif args.mini_batch_size:
        loss = GatheredCachedMNRLoss(
            model,
            mini_batch_size=args.mini_batch_size,
            mini_batch_num_tokens=args.mini_batch_tokens,
            gather_across_devices=gather,
        )
    else:
        loss = GatheredMNRLoss(model, gather_across_devices=gather)
    if args.matryoshka_dims:
        dims = sorted(set(args.matryoshka_dims) | {model.get_embedding_dimension()}, reverse=True)
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=dims, matryoshka_weights=matryoshka_weights(args, dims))
    return loss


def training_arguments(
    args, output_dir: Path, has_evaluator: bool, trainer_prompts: dict | None = None
) -> SentenceTransformerTrainingArguments:
    """Identical on every rank (rank-dependent arguments deadlock DDP). The hub repo is named here (ST writes it into
    the card's usage example) but the trainer's own push stays off: release.py says why and uploads final/.
    `trainer_prompts`: source -> column -> prompt (its collator prepends them; prompts.py)."""
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        run_name=output_dir.name,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        bf16=bf16_native(),  # autocast; master weights stay fp32
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if has_evaluator else "no",
        eval_steps=args.eval_and_save_steps,
        save_strategy="steps",
        save_steps=args.eval_and_save_steps,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",  # W&B: run() adds tracking.wandb_callback() itself
        ddp_timeout=int(args.ddp_timeout_minutes * 60),
        dataloader_num_workers=args.dataloader_num_workers,
        # DDP's search for unused parameters walks the graph every step; the only unused ones (the pooler) are
        # frozen by load_model instead
        ddp_find_unused_parameters=False,
        **{CHECKPOINTING_FIELD: args.gradient_checkpointing},
        # a NaN/inf check of every micro-step's loss is a host-device sync: NaNs show in the logged loss instead
        logging_nan_inf_filter=False,
        # batches are copied from pinned memory without blocking the host (CUDA; a no-op on CPU)
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        hub_model_id=args.hub_model_id,
        hub_private_repo=args.hub_private_repo,
        prompts=trainer_prompts,
    )


def run(argv: list[str] | None = None) -> None:
    args = cli.parse_args(argv)
    tracking.load_env()
    specs = mixture_specs(args)
    cache_dir = Path(args.cache_dir)
    mirror = make_mirror(args, cache_dir)
    if args.dry_run:
        print_plan(specs, args, cache_dir, mirror)
        return
    if args.build_caches_only:
        build_caches(specs, args, cache_dir, mirror)
        return

    tracking.check_wandb_credentials(args.wb_mode)
    distributed.init_process_group(args.ddp_timeout_minutes, args.build_wait_minutes)
    if args.push_to_hub:
        release.check_push_target(args.hub_model_id, args.hub_private_repo)
    output_dir, resume_from = resolve_output_dir(args)
    model, native_max_len = load_model(args, mirror)
    run_prompt = run_prompts(args, model.prompts)
    prompts.set_model_prompts(model, run_prompt)  # checkpoints and final/ save them; encode_query applies them
    with distributed.rank0_first():  # rank 0 fetches what the mirror lacks; the others then read it
        benchmarks = [b for spec in args.eval_benchmarks for b in load_benchmarks(spec, mirror, args.doc_fields)]
    check_offline_inputs(specs, cache_dir, args.nrows, args.seed, args.max_datapoints_per_src_for_eval, mirror,
                         args.n_data_src)  # fmt: skip
    if distributed.is_main_process():  # only once the inputs are known good: no half-made run folders
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(args, cli.build_parser(), output_dir)
        if args.wb_mode != "disabled":
            tracking.init_wandb(args, output_dir, vars(args))

    sources = load_and_cache_datasets(specs, cache_dir, args.nrows, args.seed, args.max_datapoints_per_src_for_eval,
                                      args.n_data_src, mirror, args.num_proc)  # fmt: skip
    for s in sources:
        read = ", ".join(f"{split} {rows}" for split, rows in s.rows_per_split.items())
        logger.info("source %-40s train %8d  val %4d  dropped(empty) %d%s", s.spec.name, len(s.train),
                    len(s.validation), s.dropped_empty, f"  rows read: {read}" if read else "")  # fmt: skip
    per_source = source_prompts(sources, run_prompt)
    for name, columns in per_source.items():
        logger.info("source %-40s prompts: %s", name, prompts.describe_columns(columns))
    trainer_prompts = prompts.trainer_prompts(per_source)
    collator_kwargs = {}
    if args.pretokenize:
        train_sets = {
            s.spec.name: pretokenize.pretokenize_source(
                s, model.tokenizer, model.max_seq_length, args.num_proc, per_source[s.spec.name]
            )[0]
            for s in sources
        }
        collator_kwargs["data_collator"] = pretokenize.PretokenizedCollator(
            preprocess_fn=model.preprocess,
            tokenizer=model.tokenizer,
            prompts=trainer_prompts or {},
            host_lengths=unpadded.is_enabled(model),
        )
        # the card's widget examples from the texts: ST's trainer samples them from the train datasets, which hold
        # token ids here, and with prompts (its `dataset_name` column) it fails on rows without a text (ST 6.2)
        model.model_card_data.set_widget_examples(DatasetDict({s.spec.name: s.train for s in sources}))
    else:
        train_sets = {s.spec.name: s.train for s in sources}

    precisions = ("float32", "ubinary") if args.bat else ("float32",)
    eval_max_len = capped_len(model, args.eval_max_len or native_max_len, "--eval_max_len")
    evaluator = prepare_evaluators(sources, benchmarks, args.eval_batch_size, eval_max_len, precisions,
                                   args.ignore_identical_ids, args.matryoshka_dims or (), per_source)  # fmt: skip
    benchmark_evaluator = evaluation.member(evaluator, "benchmarks")
    starting_rows = (
        evaluation.benchmark_rows(model, benchmark_evaluator) if args.stage == "sample" and not resume_from else {}
    )
    if args.bat and (args.bat_center != "none" or args.bat_rotation != "none"):  # after the starting model's rows
        texts, text_prompts = binary.calibration_texts([s.train for s in sources], args.bat_calibration_rows,
                                                       args.seed, [per_source[s.spec.name] for s in sources])  # fmt: skip
        binary.add_calibration(model, texts, args.bat_center, args.bat_rotation, args.seed, text_prompts)
    surrogate = binary.BinarySurrogate(args.bat, args.bat_beta_start, args.bat_beta_end) if args.bat else None
    preemption = PreemptionCallback()
    wandb_callback = tracking.wandb_callback() if args.wb_mode != "disabled" else None
    trainer = MixtureTrainer(
        model=model,
        args=training_arguments(args, output_dir, evaluator is not None, trainer_prompts),
        train_dataset=DatasetDict(train_sets),
        loss=build_loss(args, model, surrogate),
        callbacks=[preemption, CheckpointCompleteCallback()]
        + ([binary.SurrogateStepCallback(surrogate, args.bat_anneal_ratio)] if surrogate else [])
        + ([wandb_callback] if wandb_callback else []),
        evaluator=evaluator,
        source_weights={s.spec.name: s.spec.weight for s in sources},
        same_source_global_batch=args.same_source_global_batch,
        saved_max_len=eval_max_len,
        lr_schedule=dict(
            lr_min=args.lr_min_custom,
            cycle_steps=args.cosine_cycle_steps_custom,
            magnitude_fraction=args.cosine_magnitude_fraction_custom,
        )
        if args.custom_lr_scheduler
        else None,
        **collator_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    if preemption.stopped_at is not None:
        logger.warning("SIGTERM: saved checkpoint-%d; continue with --resume_checkpoint_path %s",
                       preemption.stopped_at, output_dir)  # fmt: skip
        return
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))

    final_rows = evaluation.final_benchmark_rows(trainer, benchmark_evaluator)
    if distributed.is_main_process():
        if final_rows:
            # a run's results.json: benchmark -> metric -> value of its final model; the tables add the start
            table = ({f"{args.model_name} (before)": starting_rows} if starting_rows else {}) | {
                str(final_dir): final_rows
            }
            reporting.write_results(table, output_dir, charts=False, json_payload=final_rows)
            print(reporting.markdown_table(table))
        # the card's table: the same rows, labelled without local paths
        card_table = {"starting model": starting_rows} if starting_rows else {}
        card_table |= {"this model": final_rows} if final_rows else {}
        command = release.command_line(sys.argv[1:] if argv is None else argv)
        run_config = release.write_training_config(output_dir / config.RUN_CONFIG, final_dir)
        section = release.run_section(card_table, benchmarks, sources, command, distributed.world_size(),
                                      eval_max_len, run_config, prompts.card_section(run_prompt, per_source))  # fmt: skip
        logger.info("model card with this run's results: %s", release.write_model_card(model, final_dir, section))
        if wandb_callback and wandb_callback.log_final_model(final_dir):  # WANDB_LOG_MODEL=end
            logger.info("final model logged to W&B as artifact model-%s", output_dir.name)
        if args.push_to_hub:
            url = release.upload(final_dir, args.hub_model_id, args.hub_private_repo, f"{output_dir.name}: final model")
            logger.info("pushed %s to the hub: %s", final_dir, url)
    distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        format=f"%(asctime)s [rank {distributed.rank()}] %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    return exit_status(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
