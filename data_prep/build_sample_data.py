"""Build the bundled `sample` stage pairs from the raw public data under data/.

    python data_prep/build_sample_data.py            # rewrites data/sample/*.jsonl

Outputs are committed, so a fresh clone trains offline without running this. Test data is kept out of training:
SciFact uses train qrels only (its test split is the evaluation benchmark), minus the claims whose text is also a
test claim (SciFact lists two claims in both splits under different ids, each citing the same abstract in both:
trained on, they would be two test queries answered in training; data_prep/check_overlap.py found them), and
PubMedQA PQA-L drops the 500 questions of its official test set (test_ground_truth.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from model_exploration.keys import REPO_ROOT
from model_exploration.overlap import normalize


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(REPO_ROOT)}: {len(rows)} pairs")


def scifact_train_pairs(scifact_dir: Path) -> list[dict]:
    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = {d["_id"]: (d["title"] + " " + d["text"]).strip() for d in map(json.loads, f)}
    with (scifact_dir / "queries.jsonl").open(encoding="utf-8") as f:
        claims = {q["_id"]: q["text"] for q in map(json.loads, f)}
    test_claims = {normalize(claims[q]) for q, _, _ in _qrels(scifact_dir / "qrels" / "test.tsv")}
    rows, dropped = [], set()
    for query_id, doc_id, score in _qrels(scifact_dir / "qrels" / "train.tsv"):
        if normalize(claims[query_id]) in test_claims:
            dropped.add(claims[query_id])
        elif int(score) > 0:
            rows.append({"claim": claims[query_id], "abstract": docs[doc_id]})
    print(f"scifact: left out {len(dropped)} train claim(s) that are also test claims: {sorted(dropped)}")
    return rows


def _qrels(path: Path) -> list[list[str]]:
    """(query id, document id, score) rows of a BEIR qrels file."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]


def scitldr_pairs(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for paper in map(json.loads, f):
            if paper["target"] and paper["source"]:
                rows.append({"tldr": paper["target"][0], "abstract": " ".join(paper["source"])})
    return rows


def pubmedqa_pairs(folder: Path) -> list[dict]:
    questions = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8")))
    return [
        {"question": q["QUESTION"], "context": " ".join(q["CONTEXTS"])}
        for pmid, q in questions.items()
        if pmid not in test_ids
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=REPO_ROOT / "data")
    args = parser.parse_args()
    out = args.data_dir / "sample"
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "scifact_train_pairs.jsonl", scifact_train_pairs(args.data_dir / "scifact"))
    _write_jsonl(out / "scitldr_train_pairs.jsonl", scitldr_pairs(args.data_dir / "raw" / "scitldr-a" / "train.jsonl"))
    _write_jsonl(out / "pubmedqa_pqal_pairs.jsonl", pubmedqa_pairs(args.data_dir / "raw" / "pubmedqa-pqal"))


if __name__ == "__main__":
    main()
