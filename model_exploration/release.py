"""From a run to a released model: the model card says what the run measured and how it was trained, and the
model folder goes to the Hugging Face Hub.

The card is sentence-transformers' own (its card data and template: architecture, usage, training datasets and
hyperparameters, logs, versions, citations), rendered by the same huggingface_hub call as ST's
`generate_model_card`, with one section of ours inserted before ST's "Training Details": the run's final benchmark
table (the rows of results.md), the document protocol of each benchmark, the mixture (sources, weights, splits and
rows) and the command line. ST's template has no slot for these and its renderer takes no extra variables, so the
section is one template variable (`run_section`) placed in ST's template text at render time, not a copy of it.
Every secret of the environment (.env tokens) is redacted from the whole card.

Upload: the HF Trainer's own `push_to_hub` uploads `args.output_dir`, which here is the run folder (checkpoints'
siblings, W&B files, results, the final/ subfolder), after saving a second model copy into it; a release is the
model folder alone. So the trainer's `hub_model_id` / `hub_private_repo` name the repo (ST puts the id in the card's
usage example) and `upload` sends the model folder with huggingface_hub's `upload_folder`, leaving out a
checkpoint's training state (optimizer, scheduler, RNG states), which a released model does not need.
"""

from __future__ import annotations

import fnmatch
import logging
import shlex
from pathlib import Path

from model_exploration import distributed, reporting
from model_exploration.errors import UserError
from model_exploration.sources import FIXED_HOMES
from model_exploration.tracking import redact, secret_values

logger = logging.getLogger(__name__)

CARD = "README.md"
SECTION_TITLE = "## Training Run"
# the run's config.yaml as it travels with the model folder (config.json is the transformers model's own)
TRAINING_CONFIG = "training_config.yaml"
# ST's template heading our section goes before (appended at the end of the card if a later ST renames it)
_BEFORE = "## Training Details"
# what a checkpoint holds besides the model: the trainer's state for resuming, never part of a release
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json", "_COMPLETE.json")


# ---------------------------------------------------------------- the card


def run_section(
    results: dict[str, dict[str, dict]],
    benchmarks,
    sources,
    command: str,
    processes: int,
    eval_max_len: int,
    run_config: str | None = None,
    prompts: str = "",
) -> str:
    """The card's section for this run: benchmark table (results.md's rows; `results` maps a row label such as
    "this model" to benchmark rows), document protocols, mixture, prompts (markdown, prompts.card_section), command
    line and the run's configuration (`run_config`: the text of TRAINING_CONFIG, which sits beside the card)."""
    lines = [SECTION_TITLE, "", "### Benchmark Results", ""]
    if results:
        protocols = sorted({f"{b.group or b.name}: {' + '.join(b.doc_fields)}" for b in benchmarks})
        lines += [
            f"Scored at the end of the training run (texts cut at {eval_max_len} tokens): MRR and NDCG at 1, 5 and "
            "10; 1-bit rows search sign bits by Hamming distance (`precision='ubinary'`). Documents are embedded "
            f"from: {'; '.join(protocols)}.",
            "",
            reporting.single_table(results),
        ]
    else:
        lines.append("No benchmark was evaluated in this run (`--eval_benchmarks` was empty).")
    lines += ["", "### Training Mixture", "", "A batch comes from source i with probability ~ weight_i x size_i.", ""]
    lines += ["| Source | Data | Rows read | Weight | Training pairs | Validation pairs |", "|---" * 6 + "|"]
    lines += [f"| {' | '.join(row)} |" for row in mixture_rows(sources)]
    if prompts:
        lines += ["", prompts.rstrip("\n")]
    launcher = f"torchrun ({processes} processes) " if processes > 1 else "python "
    lines += ["", "### Command", "", "```bash", launcher + command, "```", ""]
    if run_config is not None:
        lines += [
            "### Configuration",
            "",
            f"The resolved configuration of this run is [`{TRAINING_CONFIG}`]({TRAINING_CONFIG}), beside this card; "
            f"`python model_exploration/st_trainer_ddp_hf.py --config {TRAINING_CONFIG}` launches the same run again "
            "(docs/recipes.md of the training workflow).",
            "",
            f"<details><summary>{TRAINING_CONFIG}</summary>",
            "",
            "```yaml",
            run_config.rstrip("\n"),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def write_training_config(run_config: Path, folder: Path) -> str:
    """Copy the run's config.yaml (already free of secrets) into the model folder as TRAINING_CONFIG, so that a
    published model carries the configuration it was trained with; returns its text."""
    text = Path(run_config).read_text(encoding="utf-8")
    reporting.write_atomic(Path(folder) / TRAINING_CONFIG, text)
    return text


def mixture_rows(sources) -> list[tuple[str, ...]]:
    """(source, data, rows read, weight, training pairs, validation pairs) per registry source: rows read per hub
    split where a source reads several; the sources of an `expand_configs` entry (one per Stack Exchange site) are
    summed into their entry's row."""
    rows: dict[str, dict] = {}
    for s in sources:
        spec, name = s.spec, s.spec.name.split("/")[0]
        if spec.replay_of:
            data = f"replay of {len(spec.replay_of)} Stage-1 sources"
        elif spec.reads_local_file:
            data = f"file {Path(spec.data_files).name}"  # no local path in a published card
        else:
            data = (spec.hub or FIXED_HOMES.get(spec.fetch, spec.fetch)) + (f" [{spec.config}]" if spec.config else "")
        row = rows.setdefault(name, {"data": data, "splits": "", "weight": spec.weight, "read": 0, "train": 0,
                                     "validation": 0, "members": 0})  # fmt: skip
        if len(s.rows_per_split) > 1:
            row["splits"] = ", ".join(f"{split} {n:,}" for split, n in s.rows_per_split.items())
        row["read"] += len(s.train) + len(s.validation) + s.dropped_empty
        row["train"] += len(s.train)
        row["validation"] += len(s.validation)
        row["members"] += 1
        if row["members"] > 1:
            row["data"] = f"{spec.hub}, {row['members']} configs"
    return [
        (
            name,
            r["data"],
            r["splits"] or f"{r['read']:,}",
            f"{r['weight']:g}",
            f"{r['train']:,}",
            f"{r['validation']:,}",
        )
        for name, r in rows.items()
    ]


def command_line(argv: list[str]) -> str:
    return shlex.join(["model_exploration/st_trainer_ddp_hf.py", *argv])


def write_model_card(model, folder: Path, section: str) -> Path:
    """Render sentence-transformers' card for `model` with `section` before its Training Details, secrets redacted,
    into folder/README.md (written atomically). Returns the card's path."""
    from huggingface_hub import ModelCard

    template = Path(model.model_card_data.template_path).read_text(encoding="utf-8")
    slot = "{{ run_section }}\n\n"
    template = template.replace(_BEFORE, slot + _BEFORE, 1) if _BEFORE in template else template + "\n" + slot
    card = ModelCard.from_template(model.model_card_data, template_str=template, run_section=section)
    path = Path(folder) / CARD
    reporting.write_atomic(path, redact(str(card)))
    return path


# ---------------------------------------------------------------- the hub


def release_files(folder: Path) -> tuple[list[str], list[str]]:
    """(files to upload, files left out) of a model folder, relative paths; training state is left out."""
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    left_out = [f for f in files if any(fnmatch.fnmatch(Path(f).name, pattern) for pattern in TRAINING_STATE)]
    return [f for f in files if f not in left_out], left_out


def files_with_secrets(folder: Path, files: list[str]) -> list[str]:
    """Text files among `files` (cards, configs, tokenizer files) that hold a secret of the environment."""
    secrets = [s.encode() for s in secret_values()]
    texts = [f for f in files if Path(f).suffix in (".md", ".json", ".txt", ".yaml", ".yml")]
    return [f for f in texts if any(s in (Path(folder) / f).read_bytes() for s in secrets)]


def create_repo(repo_id: str, private: bool, flag: str = "--hub_model_id") -> str:
    """Create the model repo if it does not exist (the token from HF_TOKEN, which tracking.load_env sets from
    .env's HUGGINGFACE_TOKEN); returns its URL. Any failure is one line naming the repo."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise UserError(
            f"{flag} {repo_id}: no hub token; set HUGGINGFACE_TOKEN in .env (or HF_TOKEN), or `hf auth login`"
        )
    try:
        return str(HfApi().create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
        raise UserError(
            f"{flag} {repo_id}: cannot create or reach the repo ({_reason(exc)}); check the id, token and network"
        ) from None


def upload(folder: Path, repo_id: str, private: bool, commit_message: str, flag: str = "--hub_model_id") -> str:
    """Upload a model folder (release_files) to `repo_id`, created if missing; refuses a folder whose text files
    hold a secret. Returns the commit URL."""
    files, _ = release_files(folder)
    if "modules.json" not in files:
        raise UserError(f"{folder}: not a SentenceTransformer folder (no modules.json)")
    leaked = files_with_secrets(folder, files)
    if leaked:
        raise UserError(f"{folder}: {', '.join(leaked)} hold(s) a secret of your .env; not uploaded")
    create_repo(repo_id, private, flag)
    from huggingface_hub import HfApi

    try:
        commit = HfApi().upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files,
                                       commit_message=commit_message, repo_type="model")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
        raise UserError(
            f"{flag} {repo_id}: upload of {folder} failed ({_reason(exc)}); nothing local is lost: retry with "
            f"python data_prep/publish.py {folder} --hub_model_id {repo_id}"
        ) from None
    logger.info("uploaded %d files of %s to %s", len(files), folder, repo_id)
    return str(getattr(commit, "commit_url", commit))


def check_push_target(repo_id: str, private: bool) -> None:
    """--push_to_hub: rank 0 creates the repo before any training, so a missing token or a node without internet
    fails in the first minute, not after the run; every rank raises the same one-line error."""
    error = None
    if distributed.is_main_process():
        try:
            logger.info("--push_to_hub: %s is ready", create_repo(repo_id, private))
        except UserError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise UserError(error + "; or train without --push_to_hub and publish later with data_prep/publish.py")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact((text.splitlines()[0][:200] if text else "") or type(exc).__name__)
