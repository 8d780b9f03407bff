"""Result files and tables: results.json / results.csv / results.md and bar charts, each written atomically.

A results mapping is {model: {benchmark row: {metric: value, "ubinary": {...}, "ubinary_rescore": {...}}}}.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from model_exploration.keys import slug

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("mrr@1", "mrr@5", "ndcg@1", "ndcg@5", "ndcg@10", "mrr@10")
BINARY_VARIANTS = ("ubinary", "ubinary_asym", "ubinary_rescore")  # Hamming, float query vs bits, re-ranked


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name and rename: a killed run leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path, default: Any, what: str) -> Any:
    """A JSON file this project wrote, or `default` when it is absent; a damaged one (a run killed before files
    were written atomically, a full disk) is reported and replaced by `default`, to be rebuilt."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        logger.warning("%s %s is unreadable (%s); rebuilding it", what, path, type(exc).__name__)
        return default


_HEADER = "MRR@1 | MRR@5 | NDCG@1 | NDCG@5 | NDCG@10 | MRR@10 | bytes/vector | NDCG@10 retention |"


def _benchmarks(results: dict[str, dict[str, dict]]) -> list[str]:
    return list(dict.fromkeys(b for per_model in results.values() for b in per_model))


def _cells(values: dict) -> str:
    retention = f"{values['retention_ndcg@10']:.3f}" if "retention_ndcg@10" in values else ""
    return " | ".join(f"{values[c]:.4f}" for c in TABLE_COLUMNS) + f" | {values['bytes_per_vector']} | {retention} |"


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """results[model][row] -> one table per benchmark row, in the original's format (MRR@1/5, NDCG@1/5) plus
    NDCG@10, MRR@10, bytes per vector and, for binary rows, NDCG@10 retention (binary / float)."""
    lines = []
    for bench in _benchmarks(results):
        lines += [f"### {bench}", "", f"| Model | {_HEADER}", "|---" * 9 + "|"]
        for model, per_model in results.items():
            if bench in per_model:
                lines += [f"| {label} | {_cells(values)}" for label, values, _ in variants_of(model, per_model[bench])]
        lines.append("")
    return "\n".join(lines)


def single_table(results: dict[str, dict[str, dict]]) -> str:
    """The rows of markdown_table in one table, the benchmark row first (a model card has room for one)."""
    lines = [f"| Benchmark | Model | {_HEADER}", "|---" * 10 + "|"]
    for bench in _benchmarks(results):
        for model, per_model in results.items():
            if bench in per_model:
                lines += [f"| {bench} | {label} | {_cells(v)}" for label, v, _ in variants_of(model, per_model[bench])]
    return "\n".join(lines)


def variants_of(model: str, row: dict) -> list[tuple[str, dict, str]]:
    """(label, metrics, precision) of every way a row was searched: float and binary at the full dimension, then
    at each truncated dimension (Matryoshka), largest first. Precision reads `ubinary@256` for a truncation. A row
    that records prompts (compare.py) names them in its label."""
    query, document = row.get("query_prompt", ""), row.get("document_prompt", "")
    if query or document:
        model = f"{model} [query {query!r}, document {document!r}]"
    out = [(model, row, "float32")] + [(f"{model} ({v})", row[v], v) for v in BINARY_VARIANTS if v in row]
    for dim, section in row.get("dims", {}).items():
        out.append((f"{model} (dim {dim})", section, f"float32@{dim}"))
        out += [(f"{model} (dim {dim}, {v})", section[v], f"{v}@{dim}") for v in BINARY_VARIANTS if v in section]
    return out


def flatten(results: dict[str, dict[str, dict]]) -> list[dict]:
    """One CSV row per (model, benchmark row, precision)."""
    records = []
    for model, per_model in results.items():
        for bench, row in per_model.items():
            for _, values, precision in variants_of(model, row):
                records.append(
                    {"model": model, "benchmark": bench, "precision": precision}
                    | {k: v for k, v in values.items() if not isinstance(v, dict)}
                )
    return records


def write_results(
    results: dict[str, dict[str, dict]], output_dir: Path, charts: bool = True, json_payload: dict | None = None
) -> None:
    """results.json (`json_payload`, default the results), results.csv, results.md and, with `charts`, a bar chart
    PNG per benchmark row, in output_dir; each file written to a temporary name and renamed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    records = flatten(results)
    buffer = io.StringIO()
    if records:
        fields = list(dict.fromkeys(k for r in records for k in r))
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    for name, text in (
        ("results.json", json.dumps(results if json_payload is None else json_payload, indent=2, sort_keys=True)),
        ("results.csv", buffer.getvalue()),
        ("results.md", markdown_table(results)),
    ):
        write_atomic(output_dir / name, text)
    if charts:
        write_charts(results, output_dir)


def _short(label: str) -> str:
    return "/".join(Path(label).parts[-2:]) if os.sep in label else label  # run/final, org/model


def _save(fig, output_dir: Path, name: str) -> None:
    tmp = output_dir / f".{name}.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, output_dir / name)


def write_charts(results: dict[str, dict[str, dict]], output_dir: Path) -> None:
    """Per benchmark row: a bar chart of the table's metrics (full dimension, float and binary), and where rows
    were scored at several dimensions, NDCG@10 against bytes per vector, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for bench in _benchmarks(results):
        rows = {model: per_model[bench] for model, per_model in results.items() if bench in per_model}
        labels, values = [], []
        for model, row in rows.items():
            for label, v, precision in variants_of(model, row):
                if "@" not in precision:
                    labels.append(_short(label))
                    values.append([v[c] for c in TABLE_COLUMNS])
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(TABLE_COLUMNS)), 4))
        width = 0.8 / max(1, len(labels))
        for i, (label, vals) in enumerate(zip(labels, values)):
            ax.bar([j + i * width for j in range(len(TABLE_COLUMNS))], vals, width, label=label)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(TABLE_COLUMNS))])
        ax.set_xticklabels([c.upper() for c in TABLE_COLUMNS])
        ax.set_ylim(0, 1)
        ax.set_title(bench)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = slug(bench.replace(".", "_"))
        _save(fig, output_dir, f"chart_{name}.png")
        plt.close(fig)
        if any("dims" in row for row in rows.values()):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for model, row in rows.items():
                points = sorted(
                    (v["bytes_per_vector"], v["ndcg@10"])
                    for _, v, precision in variants_of(model, row)
                    if not precision.startswith("ubinary_rescore")
                )
                ax.plot(*zip(*points), marker="o", label=_short(model))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes per vector (float32 and 1-bit, each truncation)")
            ax.set_ylabel("NDCG@10")
            ax.set_title(f"{bench}: quality against index size")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            _save(fig, output_dir, f"chart_{name}_ndcg_vs_bytes.png")
            plt.close(fig)
