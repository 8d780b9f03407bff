"""Upload a trained model to the Hugging Face Hub: a run folder's final/ (the model and its card, which holds the
run's benchmark table, mixture and command line), a checkpoint-N folder, or any SentenceTransformer folder.

    python data_prep/publish.py ../training_output/<run> --hub_model_id ORG/NAME --dry_run   # what would go, offline
    python data_prep/publish.py ../training_output/<run> --hub_model_id ORG/NAME [--hub_private_repo]
    python data_prep/publish.py ../training_output/<run>/checkpoint-12000 --hub_model_id ORG/NAME-step12000

For runs trained on nodes without internet (the trainer's --push_to_hub needs the hub from the start): run it on a
login node. A checkpoint's training state (optimizer, scheduler, RNG states) stays behind, and a folder whose text
files hold a secret of .env is refused. The token is HUGGINGFACE_TOKEN from .env (or HF_TOKEN), never printed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model_exploration import cli, release, tracking
from model_exploration.errors import UserError, exit_status
from model_exploration.training import CHECKPOINT_MARKER, missing_from_checkpoint

logger = logging.getLogger("publish")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="publish.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", type=Path, help="a run folder (its final/), a checkpoint-N folder or a model folder")
    p.add_argument("--hub_model_id", type=cli.hub_repo_id, required=True, metavar="ORG/NAME", help="the hub repo")
    p.add_argument("--hub_private_repo", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("--commit_message", default=None, help="default: 'Upload <folder>'")
    p.add_argument("--dry_run", action="store_true", help="print what would be uploaded and exit; no network")
    return p


def model_folder(folder: Path) -> Path:
    """The folder to upload: a run folder's final/, or the folder itself (a checkpoint must be complete)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if (folder / "final" / "modules.json").exists():
        return folder / "final"
    if folder.name.startswith("checkpoint-") and (missing := missing_from_checkpoint(folder)):
        if missing != [CHECKPOINT_MARKER]:  # an unmarked checkpoint (an older version's) is a model all the same
            raise UserError(f"{folder}: incomplete checkpoint (missing {', '.join(missing[:5])}); take another")
    if not (folder / "modules.json").exists():
        raise UserError(f"{folder}: not a run folder with final/ nor a SentenceTransformer folder (no modules.json)")
    return folder


def plan(folder: Path, repo_id: str, private: bool) -> list[str]:
    """The dry run's lines: the repo, each file with its size, what stays behind, whether the card holds results."""
    files, left_out = release.release_files(folder)
    size = sum((folder / f).stat().st_size for f in files)
    card = folder / release.CARD
    card_state = (
        "holds this run's benchmark table"
        if card.exists() and release.SECTION_TITLE in card.read_text(encoding="utf-8")
        else "has no benchmark table of a run (a checkpoint's card; final/ has one)"
    )
    lines = [
        f"would upload {folder} -> https://huggingface.co/{repo_id} ({'private' if private else 'public'} if created): "
        f"{len(files)} files, {size / 1e6:.1f} MB; the model card {card_state}"
    ]
    lines += [f"  {f:60} {(folder / f).stat().st_size:>14,} B" for f in files]
    if left_out:
        lines.append(f"left out (training state): {', '.join(left_out)}")
    leaked = release.files_with_secrets(folder, files)
    if leaked:
        lines.append(f"REFUSED: {', '.join(leaked)} hold(s) a secret of your .env")
    return lines


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    def run() -> None:
        args = build_parser().parse_args(argv)
        tracking.load_env()
        folder = model_folder(args.folder)
        if args.dry_run:
            print("\n".join(plan(folder, args.hub_model_id, args.hub_private_repo)))
            return
        message = args.commit_message or f"Upload {folder.parent.name}/{folder.name}"
        url = release.upload(folder, args.hub_model_id, args.hub_private_repo, message)
        print(f"uploaded {folder} to https://huggingface.co/{args.hub_model_id} ({url})")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
