"""Fine-tune a Sentence Transformer on a weighted mixture of (query, passage) sources, in one process or under
torchrun DDP, and finish with a benchmark table.

    python model_exploration/st_trainer_ddp_hf.py --stage sample --model_name PATH --wb_mode disabled
    torchrun --nproc_per_node=auto model_exploration/st_trainer_ddp_hf.py --stage 2 ...

The run, top to bottom: parse flags -> resolve the mixture -> (dry run: print the plan, stop) -> join the process
group -> pick the run folder -> load the model -> build/read the source caches (rank 0 builds) -> evaluators ->
[sample stage: benchmark the starting model] -> train (resumable) -> save -> benchmark -> results.json / .md.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
from datasets import DatasetDict
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util.distributed import distributed_evaluation

from model_exploration import binary, cli, distributed, evaluation, pretokenize, tracking, unpadded
from model_exploration.data import cache_path_for
from model_exploration.errors import UserError, exit_status
from model_exploration.training import MixtureTrainer, PreemptionCallback, bf16_supported
from model_exploration.utils import (
    build_dataset_configs_file,
    build_dataset_configs_s1,
    build_dataset_configs_s2,
    build_dataset_configs_sample,
    load_and_cache_datasets,
    prepare_evaluators,
)

logger = logging.getLogger("st_trainer")


def mixture_specs(args):
    if args.mixture:
        return build_dataset_configs_file(args.mixture, args.enable_sources, args.disable_sources)
    if args.stage == "1":
        return build_dataset_configs_s1(args.enable_sources, args.disable_sources)
    if args.stage == "2":
        return build_dataset_configs_s2(
            args.enable_sources, args.disable_sources, args.sde_weight_scale, args.stage1_replay_weight, args.arxiv_path
        )
    return build_dataset_configs_sample(args.enable_sources, args.disable_sources)


def print_plan(specs, args, cache_dir: Path) -> None:
    total_weight = sum(s.weight for s in specs)
    print(f"{args.mixture or 'stage ' + args.stage}: {len(specs)} sources; a batch comes from source i with p ~ weight_i x size_i "
          f"(sizes are known once loaded; weight share shown)")  # fmt: skip
    print(f"{'source':48} {'weight':>8} {'w-share':>8}  columns / location / cache")
    for s in specs:
        expand = "  (one source per hub config, expanded at build time)" if s.expand_configs else ""
        print(f"{s.name:48} {s.weight:8.3f} {s.weight / total_weight:8.2%}  {s.describe()}{expand}")
        print(
            f"{'':67}cache: {cache_path_for(cache_dir, s, args.nrows, args.seed, args.max_datapoints_per_src_for_eval)}"
        )
        for member in s.replay_of:
            print(f"{'':67}replays {member.name}: {member.describe()}")


def resolve_output_dir(args) -> tuple[Path, str | None]:
    """(run folder, checkpoint to resume). Rank 0 picks a fresh run name and shares it, so all ranks agree."""
    if args.resume_checkpoint_path:
        path = Path(args.resume_checkpoint_path)
        if not path.exists():
            raise UserError(f"--resume_checkpoint_path: {path} does not exist")
        if not (path / "trainer_state.json").exists():
            complete = sorted(
                (p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
                key=lambda p: int(p.name.split("-")[-1]),
            )
            if not complete:
                raise UserError(f"--resume_checkpoint_path: no complete checkpoint (trainer_state.json) in {path}")
            path = complete[-1]
        return path.parent, str(path)
    name = args.run_name or distributed.broadcast_object(
        f"{Path(args.model_name).name}-stage{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return Path(args.output_base) / name, None


def load_model(args) -> tuple[SentenceTransformer, int]:
    """The model with max_seq_length set for training, and its own max_seq_length (the evaluation default)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with distributed.rank0_first():  # one download, then the others read the hub cache
        try:
            model = SentenceTransformer(args.model_name, device=device)
        except Exception as exc:  # noqa: BLE001 - any loading failure becomes one actionable line
            where = "local folder" if Path(args.model_name).exists() else "hub id (not a local folder)"
            raise UserError(
                f"--model_name {args.model_name}: cannot load it as a {where} ({type(exc).__name__}); "
                "pass a SentenceTransformer folder or a reachable hub id"
            ) from None
    native_max_len = model.max_seq_length
    wanted = args.model_max_len or (native_max_len if args.stage == "sample" else cli.DEFAULT_MAX_LEN)
    limit = getattr(model[0].auto_model.config, "max_position_embeddings", wanted)
    model.max_seq_length = min(wanted, limit)
    if wanted > limit:
        logger.warning("--model_max_len %d exceeds the model's %d positions; using %d", wanted, limit, limit)
    if args.unpad and unpadded.enable_unpadded(model):
        logger.info("unpadded forward on: dense layers and attention skip padding tokens (--no_unpad to turn off)")
    return model, native_max_len


def build_loss(args, model, surrogate: binary.BinarySurrogate | None):
    """MNRL, its GradCache form (--mini_batch_size) or the binary-aware MNRL (--bat); all gather negatives
    across ranks with --gather_across_devices."""
    gather = args.gather_across_devices
    if surrogate:
        return binary.BinaryAwareMNRLoss(
            model, surrogate, float_weight=args.bat_float_weight, gather_across_devices=gather
        )
    if args.mini_batch_size:
        return CachedMultipleNegativesRankingLoss(
            model,
            mini_batch_size=args.mini_batch_size,
            mini_batch_num_tokens=args.mini_batch_tokens,
            gather_across_devices=gather,
        )
    return MultipleNegativesRankingLoss(model, gather_across_devices=gather)


def benchmark_rows(
    model, benchmarks, batch_size: int, max_seq_length: int, precisions: tuple[str, ...]
) -> dict[str, dict]:
    """Benchmark a model on every rank together: rank 0 runs the evaluator, the others serve its encoding."""
    if not benchmarks:
        return {}
    rows = {}
    with distributed_evaluation(model) as runs_evaluator:
        if runs_evaluator:
            evaluator = evaluation.RetrievalEvaluator(
                benchmarks,
                batch_size=batch_size,
                max_seq_length=max_seq_length,
                show_progress_bar=True,
                precisions=precisions,
            )
            rows = evaluator.compute_rows(model)
    return distributed.broadcast_object(rows)


def final_benchmark_rows(
    trainer, evaluator, benchmarks, batch_size: int, max_seq_length: int, precisions
) -> dict[str, dict]:
    """The final model's benchmark rows: those of the trainer's evaluation at the last step when there was one
    (transformers evaluates at the end of a run), else computed now. Rank 0 holds the evaluator's rows."""
    members = getattr(evaluator, "evaluators", [evaluator])
    in_training = next((e for e in members if getattr(e, "name", None) == "benchmarks"), None)
    fresh = in_training is not None and in_training.last_step == trainer.state.global_step
    rows = distributed.broadcast_object(in_training.last_rows if fresh else None)
    return (
        rows if rows is not None else benchmark_rows(trainer.model, benchmarks, batch_size, max_seq_length, precisions)
    )


def training_arguments(args, output_dir: Path, has_evaluator: bool) -> SentenceTransformerTrainingArguments:
    """Identical on every rank (rank-dependent arguments deadlock DDP)."""
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
        bf16=bf16_supported(),  # autocast; master weights stay fp32
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if has_evaluator else "no",
        eval_steps=args.eval_and_save_steps,
        save_strategy="steps",
        save_steps=args.eval_and_save_steps,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        seed=args.seed,
        data_seed=args.seed,
        report_to=["wandb"] if args.wb_mode != "disabled" else "none",
        ddp_timeout=int(args.ddp_timeout_minutes * 60),
        dataloader_num_workers=args.dataloader_num_workers,
    )


def run(argv: list[str] | None = None) -> None:
    args = cli.parse_args(argv)
    tracking.load_env()
    specs = mixture_specs(args)
    cache_dir = Path(args.cache_dir or Path(args.output_base) / "cache")
    if args.dry_run:
        print_plan(specs, args, cache_dir)
        return

    tracking.check_wandb_credentials(args.wb_mode)
    distributed.init_process_group(args.ddp_timeout_minutes)
    output_dir, resume_from = resolve_output_dir(args)
    model, native_max_len = load_model(args)
    if distributed.is_main_process():  # only once the inputs are known good: no half-made run folders
        output_dir.mkdir(parents=True, exist_ok=True)
        tracking.save_args(vars(args), output_dir)
        if args.wb_mode != "disabled":
            tracking.init_wandb(args, output_dir, vars(args))
    eval_max_len = args.eval_max_len or native_max_len

    sources = load_and_cache_datasets(
        specs, cache_dir, args.nrows, args.seed, args.max_datapoints_per_src_for_eval, args.n_data_src
    )
    for s in sources:
        logger.info(
            "source %-40s train %8d  val %4d  dropped(empty) %d",
            s.spec.name,
            len(s.train),
            len(s.validation),
            s.dropped_empty,
        )
    collator_kwargs = {}
    if args.pretokenize:
        train_sets = {
            s.spec.name: pretokenize.pretokenize_source(s, model.tokenizer, model.max_seq_length)[0] for s in sources
        }
        collator_kwargs["data_collator"] = pretokenize.PretokenizedCollator(
            preprocess_fn=model.preprocess, tokenizer=model.tokenizer
        )
    else:
        train_sets = {s.spec.name: s.train for s in sources}

    benchmarks = [b for spec in args.eval_benchmarks for b in evaluation.load_benchmarks(spec)]
    precisions = ("float32", "ubinary") if args.bat else ("float32",)
    evaluator = prepare_evaluators(sources, benchmarks, args.eval_batch_size, eval_max_len, precisions)
    before = (
        benchmark_rows(model, benchmarks, args.eval_batch_size, eval_max_len, precisions)
        if args.stage == "sample" and not resume_from
        else {}
    )
    surrogate = binary.BinarySurrogate(args.bat, args.bat_beta_start, args.bat_beta_end) if args.bat else None
    loss = build_loss(args, model, surrogate)

    preemption = PreemptionCallback()
    trainer = MixtureTrainer(
        model=model,
        args=training_arguments(args, output_dir, evaluator is not None),
        train_dataset=DatasetDict(train_sets),
        loss=loss,
        callbacks=[preemption] + ([binary.SurrogateStepCallback(surrogate)] if surrogate else []),
        evaluator=evaluator,
        source_weights={s.spec.name: s.spec.weight for s in sources},
        same_source_global_batch=args.same_source_global_batch,
        lr_schedule=dict(
            lr_min=args.lr_min_custom,
            cycle_steps=args.cosine_cycle_steps_custom,
            magnitude_fraction=args.cosine_magnitude_fraction_custom,
        )
        if args.custom_lr_scheduler
        else None,
        **collator_kwargs,
    )
    train_dataloader = trainer.get_train_dataloader()
    if surrogate:
        total_steps = args.max_steps or math.ceil(
            args.num_train_epochs * len(train_dataloader) / args.gradient_accumulation_steps
        )
        surrogate.anneal_steps = max(1, round(args.bat_anneal_ratio * total_steps))
    sampler = train_dataloader.batch_sampler
    sampler = getattr(sampler, "batch_sampler", sampler)  # under DDP, accelerate's per-rank shard wraps ours
    for row in sampler.plan():
        logger.info("mixture %-40s weight %7.3f size %8d batches/epoch %6d share %6.2f%%",
                    row["source"], row["weight"], row["size"], row["batches"], 100 * row["share"])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume_from)
    if preemption.stopped_at is not None:
        logger.warning("SIGTERM: saved checkpoint-%d; continue with --resume_checkpoint_path %s",
                       preemption.stopped_at, output_dir)  # fmt: skip
        return
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))

    after = final_benchmark_rows(trainer, evaluator, benchmarks, args.eval_batch_size, eval_max_len, precisions)
    if distributed.is_main_process() and after:
        table = {f"{args.model_name} (before)": before} if before else {}
        table[str(final_dir)] = after
        # a run's results.json: benchmark -> metric -> value of its final model; the tables add the start
        evaluation.write_results(table, output_dir, charts=False, json_payload=after)
        print(evaluation.markdown_table(table))
    distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        format=f"%(asctime)s [rank {distributed.rank()}] %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    return exit_status(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
