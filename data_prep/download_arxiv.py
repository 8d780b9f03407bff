"""Download the arXiv metadata snapshot (Kaggle dataset Cornell-University/arxiv) for the Stage-2 arXiv source.

    python data_prep/download_arxiv.py --out_dir data/arxiv

Credentials: KAGGLE_USERNAME / KAGGLE_KEY from .env (or the environment), else ~/.kaggle/kaggle.json.
Writes <out_dir>/arxiv-metadata-oai-snapshot.json (about 4 GB unzipped); the trainer reads it with --arxiv_path.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from model_exploration.errors import UserError, exit_status
from model_exploration.tracking import load_env

KAGGLE_DATASET = "Cornell-University/arxiv"
SNAPSHOT = "arxiv-metadata-oai-snapshot.json"


def download(out_dir: Path) -> Path:
    load_env()
    has_env = os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    if not has_env and not (Path.home() / ".kaggle" / "kaggle.json").exists():
        raise UserError(
            "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY in .env, or create ~/.kaggle/kaggle.json"
        )
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as exc:
        raise UserError(f"cannot import the kaggle package ({exc}); pip install -r requirements.txt") from None
    api = KaggleApi()
    api.authenticate()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        api.dataset_download_file(KAGGLE_DATASET, SNAPSHOT, path=str(out_dir))
    except Exception as exc:  # noqa: BLE001 - any API failure becomes one actionable line
        raise UserError(
            f"Kaggle download of {KAGGLE_DATASET}/{SNAPSHOT} failed ({type(exc).__name__}: {exc})"
        ) from None
    zipped = out_dir / f"{SNAPSHOT}.zip"
    if zipped.exists():
        import zipfile

        with zipfile.ZipFile(zipped) as archive:
            archive.extract(SNAPSHOT, out_dir)
        zipped.unlink()
    return out_dir / SNAPSHOT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("data/arxiv"))
    out_dir = parser.parse_args().out_dir
    return exit_status(lambda: print(download(out_dir)))


if __name__ == "__main__":
    sys.exit(main())
