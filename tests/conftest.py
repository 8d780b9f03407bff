import gzip
import json
import os
import random
from pathlib import Path

import pytest

# Offline, single-threaded and quiet before any HF import: hub retries and a shared core cost minutes otherwise.
os.environ.update(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
)  # fmt: skip

from helpers import REPO_ROOT, build_tiny_model  # noqa: E402 - the environment above must be set first


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_no_dropout(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_no_dropout"), dropout=0.0)


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory) -> Path:
    """A real SciFact slice: 40 test claims, their cited abstracts and 300 other abstracts, in BEIR layout."""
    src = REPO_ROOT / "data" / "scifact"
    with gzip.open(src / "corpus.jsonl.gz", "rt") as f:
        corpus = [json.loads(line) for line in f]
    lines = (src / "qrels" / "test.tsv").read_text().splitlines()
    qrels = [line.split("\t") for line in lines[1:]]
    query_ids = sorted({q for q, _, _ in qrels})[:40]
    qrels = [r for r in qrels if r[0] in query_ids]
    needed = {d for _, d, _ in qrels}
    others = [d for d in corpus if d["_id"] not in needed]
    docs = [d for d in corpus if d["_id"] in needed] + random.Random(0).sample(others, 300)
    out = tmp_path_factory.mktemp("beir") / "scifact_small"
    (out / "qrels").mkdir(parents=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with (src / "queries.jsonl").open() as f:
        queries = [q for q in map(json.loads, f) if q["_id"] in query_ids]
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (out / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels)
    )
    return out
