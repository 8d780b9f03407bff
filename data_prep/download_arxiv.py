"""Download the arXiv metadata snapshot (Kaggle dataset Cornell-University/arxiv) to a folder of your choice, for
`--arxiv_path`. (`python data_prep/prefetch.py --stage 2 --out DIR` fetches it into a mirror with the rest.)

    python data_prep/download_arxiv.py --out_dir data/arxiv

Credentials: KAGGLE_USERNAME / KAGGLE_KEY from .env (or the environment), else ~/.kaggle/kaggle.json.
Writes <out_dir>/arxiv-metadata-oai-snapshot.json (about 4.5 GB unzipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_exploration.errors import exit_status
from model_exploration.fetch import KAGGLE_FILE, fetch_kaggle_snapshot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("data/arxiv"))
    dest = parser.parse_args().out_dir / KAGGLE_FILE
    return exit_status(lambda: (fetch_kaggle_snapshot(dest), print(dest)))


if __name__ == "__main__":
    sys.exit(main())
