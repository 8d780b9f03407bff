"""Hard negatives mined for the pair sources of a mixture: (anchor, positive) -> (anchor, positive, negative...),
written as source files that a mixture registry references.

The mining itself is sentence-transformers' `mine_hard_negatives`: embed the anchors and the passages, take each
anchor's nearest passages, drop the anchor's own positives, and keep as negatives the nearest that pass the
false-negative guard. What is ours: which rows (a source's training split from its cache, so its held-out
validation rows never become training data), the defaults, seeding, and the output as a source plus a mixture:

- guard: `relative_margin` 0.05: a candidate counts as a negative only if its similarity to the anchor is at least
  5% below the positive's (NV-Retriever's TopK-PercPos at 95%, their best false-negative filter): a passage almost
  as close as the positive is more likely an unlabelled positive than a negative;
- negatives: the top-scoring candidates that pass the guard (`sampling_strategy="top"`), 1 per pair by default
  (a triplet source, like msmarco and specter); with k > 1 the source has columns negative_1..k;
- seed: Python / NumPy / torch seeded before mining, and the output is in the source's row order;
- model: the model being trained by default (the miner should agree with the trainee about what is close), on the
  GPU when there is one, with faiss when it is installed (exact search otherwise).
Rows for which no candidate passes the guard are dropped and counted (sentence-transformers reports them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import yaml

from model_exploration.reporting import write_atomic
from model_exploration.sources import SourceSpec

logger = logging.getLogger(__name__)

DEFAULT_RELATIVE_MARGIN = 0.05
DEFAULT_NUM_NEGATIVES = 1


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    model_name: str
    relative_margin: float = DEFAULT_RELATIVE_MARGIN
    num_negatives: int = DEFAULT_NUM_NEGATIVES
    range_max: int = 50
    seed: int = 42
    batch_size: int = 64

    def describe(self, source: str) -> str:
        model = "/".join(Path(self.model_name).parts[-2:])
        return (
            f"{self.num_negatives} hard negative(s) per pair of {source} by {model}, relative margin "
            f"{self.relative_margin}, top {self.range_max} candidates, seed {self.seed}"
        )


def mine_source(train, model, settings: MiningSettings) -> tuple[list[dict], dict]:
    """Triplets (or n-tuples) for the (anchor, positive) rows of `train`, and mining statistics."""
    from sentence_transformers.util import mine_hard_negatives
    from transformers import set_seed

    set_seed(settings.seed)  # Python, NumPy and torch
    pairs = train.select_columns(["anchor", "positive"])
    mined = mine_hard_negatives(
        pairs,
        model,
        anchor_column_name="anchor",
        positive_column_name="positive",
        relative_margin=settings.relative_margin,
        num_negatives=settings.num_negatives,
        range_max=settings.range_max,
        sampling_strategy="top",
        output_format="triplet" if settings.num_negatives == 1 else "n-tuple",
        batch_size=settings.batch_size,
        use_faiss=importlib.util.find_spec("faiss") is not None,
        verbose=True,
    )
    rows = mined.to_list()
    stats = {"pairs": len(pairs), "rows": len(rows), "anchors_with_negatives": len({r["anchor"] for r in rows})}
    return rows, stats


def mined_spec(spec: SourceSpec, file: Path, settings: MiningSettings) -> dict:
    """The registry entry of a mined source (a local JSON-lines file next to the mixture that references it; the
    source is named after its file, `<source>_mined`)."""
    negatives = (
        "negative" if settings.num_negatives == 1 else [f"negative_{i}" for i in range(1, settings.num_negatives + 1)]
    )
    return {
        "name": file.stem,
        "fetch": "jsonl",
        "data_files": file.name,
        "anchor": "anchor",
        "positive": "positive",
        "negative": negatives,
        "weight": spec.weight,
        "mined": settings.describe(spec.name),
    }


def write_mined(out: Path, spec: SourceSpec, rows: list[dict], stats: dict, settings: MiningSettings) -> dict:
    """`<out>/<source>_mined.jsonl` (written atomically) and its statistics beside it; returns the registry entry."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{spec.name.replace('/', '__')}_mined.jsonl"
    write_atomic(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(
        file.with_suffix(".json"), json.dumps({"source": spec.name, **stats, **dataclasses.asdict(settings)}, indent=1)
    )
    logger.info("%s: %d pairs -> %d rows with negatives -> %s", spec.name, stats["pairs"], stats["rows"], file)
    return mined_spec(spec, file, settings)


def write_mixture(path: Path, entries: list[dict], replay: dict | None = None) -> None:
    """A mixture file listing `entries` (registry dicts), with the Stage-1 replay section when the stage had one."""
    payload = {"sources": entries} | ({"stage1_replay": replay} if replay else {})
    header = "# Written by data_prep/mine_hard_negatives.py: the mixture with its mined pair sources.\n"
    write_atomic(path, header + yaml.safe_dump(payload, sort_keys=False, width=200))
