"""Secrets and W&B: .env loading, redaction, and a resumable run on rank 0 only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from model_exploration.errors import UserError
from model_exploration.keys import REPO_ROOT
from model_exploration.reporting import write_atomic

SECRET_ENV_KEYS = ("WANDB_API_KEY", "HUGGINGFACE_TOKEN", "HF_TOKEN", "KAGGLE_KEY")
RUN_ID_FILE = "wandb_run_id.txt"


def load_env(path: str | Path | None = None) -> None:
    """Read `.env` (cwd, else the repo root) without overriding variables already set in the environment.
    HUGGINGFACE_TOKEN is exported as HF_TOKEN, which every hub call of this process (and its ranks) reads;
    that replaces `huggingface-cli login`, so no token is written to disk or printed."""
    from dotenv import load_dotenv

    candidates = [Path(path)] if path else [Path.cwd() / ".env", REPO_ROOT / ".env"]
    for candidate in candidates:
        if candidate.is_file():
            load_dotenv(candidate, override=False)
            break
    if os.environ.get("HUGGINGFACE_TOKEN") and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = os.environ["HUGGINGFACE_TOKEN"]


def secret_values() -> list[str]:
    return [v for k in SECRET_ENV_KEYS if len(v := os.environ.get(k, "")) >= 6]


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """Replace any secret value found in strings of a (nested) structure by '***'."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


def resolve_run_id(output_dir: Path, override: str | None) -> str:
    """The W&B run id of this output directory: --resume_run_id, else the saved one, else a new one (saved)."""
    from wandb.sdk.lib.runid import generate_id

    path = output_dir / RUN_ID_FILE
    run_id = override or (path.read_text().strip() if path.exists() else "") or generate_id()
    write_atomic(path, run_id)
    return run_id


def check_wandb_credentials(mode: str) -> None:
    if mode != "online":
        return
    has_netrc = any(
        "api.wandb.ai" in p.read_text(errors="ignore")
        for p in (Path.home() / ".netrc", Path.home() / "_netrc")
        if p.is_file()
    )
    if not os.environ.get("WANDB_API_KEY") and not has_netrc:
        raise UserError(
            "--wb_mode online: no W&B key (set WANDB_API_KEY in .env or run `wandb login`), "
            "or pass --wb_mode offline / disabled"
        )


def init_wandb(args, output_dir: Path, config: dict[str, Any]) -> None:
    """Start (or continue) the run on rank 0; the HF WandbCallback then logs into it. Offline runs cannot be
    resumed by W&B, so the global step in our logs is the step counter to trust there. An offline run stages its
    artifacts (WANDB_LOG_MODEL's model) in its own wandb/ folder instead of ~/.local/share/wandb, so that
    `wandb sync <run>/wandb/offline-run-*` from a login node finds them with the run (unless WANDB_DATA_DIR is set)."""
    import wandb

    if args.wb_mode == "offline":
        os.environ.setdefault("WANDB_DATA_DIR", str((output_dir / "wandb").resolve()))
    run_id = resolve_run_id(output_dir, args.resume_run_id)
    wandb.init(
        project=args.wb_project,
        entity=args.wb_entity,
        id=run_id,
        name=output_dir.name,
        resume="allow",
        mode=args.wb_mode,
        dir=str(output_dir),
        config=redact(config),
    )


def wandb_callback():
    """transformers' WandbCallback (metrics from rank 0; WANDB_LOG_MODEL=checkpoint logs each checkpoint folder),
    except for the final model of WANDB_LOG_MODEL=end: its on_train_end saves the model through a bare HF Trainer,
    which writes only a state dict for a model that is not a PreTrainedModel (a SentenceTransformer is not), so the
    artifact would not load with SentenceTransformer(...). Instead `log_final_model` logs the final/ folder, once its
    card holds the run's results, from rank 0 only; a run stopped by SIGTERM to be resumed logs none."""
    import numbers

    from transformers.integrations import WandbCallback

    class FinalFolderWandbCallback(WandbCallback):
        def on_train_end(self, args, state, control, **kwargs):
            return None

        def log_final_model(self, folder: Path) -> bool:
            """The final model folder as artifact model-<run name> (alias final_model), when WANDB_LOG_MODEL asks;
            returns whether it was logged. Call on rank 0."""
            if not (self._log_model.is_enabled and self._initialized and self._wandb.run is not None):
                return False
            run = self._wandb.run
            summary = {
                k: v for k, v in dict(run.summary).items() if isinstance(v, numbers.Number) and not k.startswith("_")
            }
            artifact = self._wandb.Artifact(
                name=f"model-{run.name}", type="model", metadata=summary | {"final_model": True}
            )
            artifact.add_dir(str(folder))
            run.log_artifact(artifact, aliases=["final_model"])
            return True

    return FinalFolderWandbCallback()
