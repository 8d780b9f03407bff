"""A development split for choosing settings without touching the SciFact test split: held-out SciFact *train*
claims searched against the whole SciFact corpus, and the bundled sample mixture minus those claims' pairs.

    python benchmarks/dev_split.py --out quality_experiment/dev    # beir/ (a BEIR folder) and mixture.yaml

The held-out claims (seeded) are train claims, never test claims; their pairs leave the SciFact training source, so
a setting chosen on this split has seen neither the claims it is scored on nor the test split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
from pathlib import Path

import yaml

from model_exploration.keys import REPO_ROOT


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--claims", type=int, default=150, help="train claims held out as dev queries")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scifact = REPO_ROOT / "data" / "scifact"
    with (scifact / "queries.jsonl").open() as f:
        claims = {q["_id"]: q["text"] for q in map(json.loads, f)}
    qrels = [line.split("\t") for line in (scifact / "qrels" / "train.tsv").read_text().splitlines()[1:] if line]
    sample = [json.loads(line) for line in (REPO_ROOT / "data" / "sample" / "scifact_train_pairs.jsonl").open()]
    trained_claims = sorted({row["claim"] for row in sample})  # train claims that are in the sample (no test ones)
    held = set(random.Random(args.seed).sample(trained_claims, args.claims))
    beir = args.out / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    with gzip.open(scifact / "corpus.jsonl.gz", "rt") as src, (beir / "corpus.jsonl").open("w") as dst:
        shutil.copyfileobj(src, dst)
    dev_ids = {q for q, text in claims.items() if text in held}
    judged = [(q, d, s) for q, d, s in qrels if q in dev_ids and int(s) > 0]
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": claims[q]}) + "\n" for q in sorted(dev_ids))
    )
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in judged)
    )
    kept = [row for row in sample if row["claim"] not in held]
    pairs = args.out / "scifact_train_pairs_minus_dev.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in kept))
    mixture = yaml.safe_load((REPO_ROOT / "model_exploration" / "mixtures" / "sample.yaml").read_text())
    for source in mixture["sources"]:
        source["data_files"] = str(
            pairs.resolve() if source["name"] == "scifact_train" else REPO_ROOT / source["data_files"]
        )
    (args.out / "mixture.yaml").write_text(yaml.safe_dump(mixture, sort_keys=False))
    print(f"dev: {len(dev_ids)} held-out train claims, {len(judged)} judged pairs, {len(sample) - len(kept)} pairs "
          f"out of training ({len(kept)} left) -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
