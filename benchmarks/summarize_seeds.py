"""Mean +- sd over seeds of compare.py results, per training variant (run folders named `<variant>-s<seed>`).

    python benchmarks/summarize_seeds.py quality_experiment/eval/results.json --benchmark beir:scifact

Columns: NDCG@10 with float search, with 1-bit Hamming search and with Hamming + float rescoring, the Hamming
retention against the run's own float score (mean of the per-seed ratios), and NDCG@10 at each truncated dimension,
float and Hamming. A model not named `<variant>-s<seed>` (the starting model) is its own one-run variant.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

SEEDED = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def variant_of(model: str) -> str:
    path = Path(model)
    run = path.parent.name if path.name == "final" else path.name
    match = SEEDED.match(run)
    return match["variant"] if match else f"{'/'.join(path.parts[-2:])} (start)"


def columns(row: dict) -> dict[str, float]:
    """The summarized numbers of one model's row."""
    values = {"float": row["ndcg@10"]}
    if "ubinary" in row:
        values["hamming"] = row["ubinary"]["ndcg@10"]
        values["hamming / float"] = row["ubinary"]["ndcg@10"] / row["ndcg@10"]
    if "ubinary_rescore" in row:
        values["hamming + rescore"] = row["ubinary_rescore"]["ndcg@10"]
    for dim, section in sorted(row.get("dims", {}).items(), key=lambda item: -int(item[0])):
        values[f"float@{dim}"] = section["ndcg@10"]
        if "ubinary" in section:
            values[f"hamming@{dim}"] = section["ubinary"]["ndcg@10"]
    return values


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(results: dict, benchmark: str) -> str:
    by_variant: dict[str, list[dict[str, float]]] = {}
    for model, rows in results.items():
        if benchmark in rows:
            by_variant.setdefault(variant_of(model), []).append(columns(rows[benchmark]))
    names = list(dict.fromkeys(name for runs in by_variant.values() for run in runs for name in run))
    lines = [f"### {benchmark}: NDCG@10, mean ± sd over seeds", "",
             "| variant | runs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]  # fmt: skip
    for variant, runs in by_variant.items():
        cells = [
            cell([run[name] for run in runs if name in run]) if any(name in run for run in runs) else ""
            for name in names
        ]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="compare.py's results.json")
    parser.add_argument("--benchmark", default="beir:scifact", help="the benchmark row to summarize")
    args = parser.parse_args()
    print(summarize(json.loads(args.results.read_text()), args.benchmark))


if __name__ == "__main__":
    main()
