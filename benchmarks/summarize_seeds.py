"""Mean +- sd over seeds of compare.py results, per training variant (run folders named `<variant>-s<seed>`).

    python benchmarks/summarize_seeds.py quality_experiment/eval/results.json --benchmark beir:scifact

Columns: NDCG@10 with float search, with 1-bit Hamming search, with asymmetric search (float query against the
documents' bits) and with Hamming + float rescoring; then each run against the plain float fine-tune of the same
seed and budget (the `pairs` variant): Hamming / plain float, asymmetric / plain float and own float - plain float
(means of the per-seed values; the issue's yardstick: a 1-bit model is judged against the best float model trained
as long, not against its own float score, which would reward losing float quality); the Hamming retention against
the run's own float score; and NDCG@10 at each truncated dimension, float and Hamming. A model not named
`<variant>-s<seed>` (the starting model) is its own one-run variant.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

SEEDED = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


PLAIN = "pairs"  # the plain float fine-tune


def variant_and_seed(model: str) -> tuple[str, str | None]:
    path = Path(model)
    run = path.parent.name if path.name == "final" else path.name
    match = SEEDED.match(run)
    return (match["variant"], match["seed"]) if match else (f"{'/'.join(path.parts[-2:])} (start)", None)


def columns(row: dict, plain_float: float | None) -> dict[str, float]:
    """The summarized numbers of one model's row; `plain_float`: the plain fine-tune's float NDCG@10 at this seed."""
    values = {"float": row["ndcg@10"]}
    if "ubinary" in row:
        values["hamming"] = row["ubinary"]["ndcg@10"]
    if "ubinary_asym" in row:
        values["asymmetric"] = row["ubinary_asym"]["ndcg@10"]
    if "ubinary_rescore" in row:
        values["hamming + rescore"] = row["ubinary_rescore"]["ndcg@10"]
    if plain_float:
        if "hamming" in values:
            values["hamming / plain float"] = values["hamming"] / plain_float
        if "asymmetric" in values:
            values["asym / plain float"] = values["asymmetric"] / plain_float
        values["float - plain float"] = values["float"] - plain_float
    if "ubinary" in row:
        values["hamming / own float"] = row["ubinary"]["ndcg@10"] / row["ndcg@10"]
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
    runs = [(*variant_and_seed(model), rows[benchmark]) for model, rows in results.items() if benchmark in rows]
    plain = {seed: row["ndcg@10"] for variant, seed, row in runs if variant == PLAIN}
    by_variant: dict[str, list[dict[str, float]]] = {}
    for variant, seed, row in runs:
        by_variant.setdefault(variant, []).append(columns(row, plain.get(seed)))
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
