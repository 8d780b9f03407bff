"""Mapping, cleaning, splitting and caching the sources of a mixture (their files come from fetch.Mirror).

Each source becomes a Dataset with columns anchor, positive[, negative] (texts, stripped, empty rows dropped and
counted) plus a held-out validation split drawn with a fixed seed. A source reads the hub splits its registry entry
lists (`splits`, train by default), concatenated in that order; the rows each split gave are recorded with the
cache.

Memory: a source is never held in Python. Its rows are converted to Arrow files in the build's work folder (local
JSON lines a chunk at a time, fetch.read_jsonl_lines; other files by `datasets`' builders), and one batched map
turns them into the cache's texts; a build holds a batch, whatever the source's size. The work folder is deleted
once the cache is written.

Cache semantics: global rank 0 builds each source once into `<cache_dir>/<name>-<key>` (the key hashes the
source spec, --nrows, --seed and the validation size), writing to a temporary folder that is renamed into place
and marked complete last; other ranks wait at a barrier and read it. A folder without the marker is rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_from_disk

from model_exploration import distributed
from model_exploration.errors import UserError
from model_exploration.fetch import JSONL_TEXT, Mirror, default_root, iter_jsonl, read_files, read_jsonl_lines
from model_exploration.keys import short_hash
from model_exploration.sources import SourceSpec

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: training rows in source order (_split_validation)
COMPLETE_MARKER = "_COMPLETE.json"
_XML_TAG = re.compile(r"<[^>]+>")
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass
class SourceData:
    spec: SourceSpec
    train: Dataset
    validation: Dataset
    dropped_empty: int
    cache_path: Path
    rows_per_split: dict[str, int] = dataclasses.field(default_factory=dict)  # raw rows read from each hub split


# ---------------------------------------------------------------- reading raw rows


def read_jsonl(path: Path, context: str, nrows: int | None = None) -> list[dict[str, Any]]:
    """The rows (the first `nrows` if given) of a JSON-lines file; malformed lines as fetch.iter_jsonl says."""
    return list(islice(iter_jsonl(path, context), nrows))


def load_raw(spec: SourceSpec, mirror: Mirror, nrows: int | None, work_dir: Path, num_proc: int = 1) -> Dataset:
    """A source's rows as an Arrow-backed Dataset: its real columns, or, for local JSON lines, each line as text
    (fetch.JSONL_TEXT; such rows may mix types Arrow cannot hold). Several hub splits are concatenated in the
    registry's order. Arrow files go to `work_dir`."""
    return load_raw_splits(spec, mirror, nrows, work_dir, num_proc)[0]


def load_raw_splits(spec: SourceSpec, mirror: Mirror, nrows: int | None, work_dir: Path, num_proc: int = 1):
    """(rows, {split: rows it gave}) of a source; with `nrows`, the first `nrows` of each split (a smoke test reads
    every split the full run will)."""
    if spec.fetch == "jsonl":
        files = mirror.source_files(spec, nrows)
        if not files.paths:
            raise UserError(f"source {spec.name!r}: no file matches {spec.local_path()}")
        missing = next((p for p in files.paths if not p.exists()), None)
        if missing:
            raise UserError(f"source {spec.name!r}: file not found: {missing}")
        rows = read_jsonl_lines(files.paths, nrows, work_dir, f"source {spec.name!r}")
        if len(rows) == 0:
            raise UserError(f"source {spec.name!r}: no rows in {files.paths[0]}")
        return rows, {}
    parts, counts = [], {}
    for member in mirror.split_members(spec):
        files = mirror.source_files(member, nrows)
        rows = read_files(files, nrows, work_dir / f"split-{len(parts)}", num_proc)
        if len(rows) == 0:
            raise UserError(f"source {spec.name!r}: no rows in {files.paths[0]} (split {member.split!r})")
        _check_columns(spec, rows[0], f" in split {member.split!r}")  # a split with other columns fails by name
        parts.append(rows)
        counts[member.split] = len(rows)
    counts = counts if spec.fetch in ("hub", "parquet_export") else {}  # NCBI, Kaggle: files, not hub splits
    if len(parts) == 1:
        return parts[0], counts
    try:
        return concatenate_datasets(parts), counts
    except ValueError as exc:
        raise UserError(
            f"source {spec.name!r}: splits {list(counts)} cannot be concatenated ({str(exc).splitlines()[0][:200]}); "
            "list only splits of one schema in `splits`"
        ) from None


# ---------------------------------------------------------------- columns and cleaning

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@functools.lru_cache(maxsize=256)
def _path_tokens(path: str) -> tuple[str | int, ...]:
    """`positives.docs[0]` -> ("positives", "docs", 0): parsed once per path, not once per row."""
    return tuple(key or int(index) for key, index in _PATH_TOKEN.findall(path))


def resolve_path(row: dict[str, Any], path: str) -> Any:
    """Value at a column path such as `text`, `texts[1]` or `positives.docs[0]`; KeyError if absent."""
    value: Any = row
    for token in _path_tokens(path):
        if isinstance(token, str):
            if not isinstance(value, dict) or token not in value:
                raise KeyError(token)
        elif not isinstance(value, (list, tuple)) or token >= len(value):
            raise KeyError(f"[{token}]")
        value = value[token]
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_as_text(v) for v in value)
    return str(value)


def _clean(text: str, cleaner: str | None) -> str:
    if cleaner == "strip_xml":
        text = html.unescape(_XML_TAG.sub("", text))
    if cleaner in ("strip_xml", "normalize_whitespace"):
        text = _WHITESPACE.sub(" ", text)
    return text.strip()


def _check_columns(spec: SourceSpec, first: dict[str, Any], where: str = "") -> None:
    wanted = [spec.pair_from_list] if spec.pair_from_list else list(spec.column_paths.values())
    for path in wanted:
        try:
            resolve_path(first, path)
        except KeyError:
            raise UserError(
                f"source {spec.name!r}: column {path!r} not found (columns: {list(first)}){where}; "
                "fix its anchor/positive/negative in the mixture registry"
            ) from None


def _batch_rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A batch's rows as dicts: zipped from its columns, or parsed from their JSON lines (checked when read)."""
    if JSONL_TEXT in batch:
        return [json.loads(text) for text in batch[JSONL_TEXT]]
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _value_or_empty(row: dict[str, Any], path: str) -> Any:
    try:
        return resolve_path(row, path)
    except KeyError:
        return ""  # a ragged row (e.g. one text in `texts`) counts as empty and is dropped


def _pair_from_list(row: dict[str, Any], column: str, seed: int, index: int) -> list:
    members = [m for m in (row.get(column) or []) if _as_text(m).strip()]
    # Seeded per row, so the pair drawn does not depend on batching or worker count. A single member is paired
    # with itself, as the original did (docs/mixtures.md, "WikiAnswers sets with one member": why that is kept).
    return random.Random(f"{seed}:{index}").sample(members, 2) if len(members) >= 2 else (members * 2 or ["", ""])


def _extract_batch(batch: dict[str, list], indices: list[int], spec: SourceSpec, seed: int) -> dict[str, list[str]]:
    """anchor/positive[/negative] texts of a batch of raw rows, cleaned; rows with an empty text are left out."""
    paths = list(spec.column_paths.values())
    out: list[list[str]] = [[] for _ in paths]
    for row, index in zip(_batch_rows(batch), indices):
        if spec.pair_from_list:
            values = _pair_from_list(row, spec.pair_from_list, seed, index)
        else:
            values = [_value_or_empty(row, path) for path in paths]
        texts = [_clean(_as_text(value), spec.clean) for value in values]
        if all(texts):
            for column, text in zip(out, texts):
                column.append(text)
    return dict(zip(spec.columns, out))


def _top_level_columns(spec: SourceSpec, raw: Dataset) -> list[str]:
    """The raw columns the column paths read (all of a local source's): the map converts only these to Python."""
    if raw.column_names == [JSONL_TEXT]:
        return raw.column_names
    paths = [spec.pair_from_list] if spec.pair_from_list else spec.column_paths.values()
    return sorted({_PATH_TOKEN.match(path).group(1) for path in paths})


def _self_pairs(pairs: Dataset) -> int:
    """Rows whose anchor is their positive (and not empty), counted by Arrow without reading rows into Python."""
    import pyarrow.compute as pc

    table = pairs.data.table
    same = pc.and_(pc.equal(table["anchor"], table["positive"]), pc.not_equal(table["anchor"], ""))
    return int(pc.sum(same).as_py() or 0)


def to_pairs(spec: SourceSpec, raw: Dataset, seed: int, num_proc: int = 1) -> tuple[Dataset, int]:
    """Map a raw source to anchor/positive[/negative] texts in one batched pass (parsing, column paths, cleaning,
    dropping rows with an empty text), Arrow in and out, so no more than a batch is ever held in Python; returns
    (pairs, rows dropped for empty text)."""
    _check_columns(spec, _batch_rows(raw[:1])[0])
    procs = num_proc if num_proc > 1 and len(raw) >= 10_000 * num_proc else None  # small sources: no pool start-up
    read = _top_level_columns(spec, raw)
    pairs = raw.select_columns(read).map(
        _extract_batch,
        batched=True,
        with_indices=True,
        remove_columns=read,
        features=Features({c: Value("string") for c in spec.columns}),
        fn_kwargs={"spec": spec, "seed": seed},
        num_proc=procs,
        desc=f"columns {spec.name}",
    )
    if spec.pair_from_list:
        logger.info("source %s: %d of %d kept rows are one-member sets, paired with themselves", spec.name,
                    _self_pairs(pairs), len(pairs))  # fmt: skip
    dropped = len(raw) - len(pairs)
    if len(pairs) == 0:
        raise UserError(
            f"source {spec.name!r}: all {len(raw)} rows have an empty anchor/positive/negative text; "
            "check its column mapping in the mixture registry"
        )
    if dropped:
        logger.warning("source %s: dropped %d of %d rows with empty texts", spec.name, dropped, len(raw))
    return pairs, dropped


def replay_indices(size: int, rows: int | None, seed: int, name: str) -> list[int]:
    """A seeded random sample of `rows` row positions (all if None) spread over a whole source, in file order.
    Never the head of a file: sources such as trivia-qa are grouped by query, so a head is a handful of queries."""
    if rows is None or rows >= size:
        return list(range(size))
    return sorted(random.Random(f"{seed}:replay:{name}").sample(range(size), rows))


def _replay_pairs(spec: SourceSpec, mirror: Mirror, nrows, seed, work_dir: Path, num_proc) -> tuple[Dataset, int]:
    """The Stage-1 replay: each member's sampled rows as (anchor, positive) pairs. Each member is read, sampled,
    mapped and written to its own part; its raw files are deleted before the next is read (bounded disk)."""
    parts, dropped = [], 0
    members = [m for s in spec.replay_of for m in mirror.expand(s)]
    for i, member in enumerate(members):
        member_dir = work_dir / f"member-{i:04d}"
        raw = load_raw(member, mirror, nrows, member_dir, num_proc)
        chosen = replay_indices(len(raw), spec.rows_per_source, seed, member.name)
        raw = raw.select(chosen)
        pairs, n_dropped = to_pairs(member, raw, seed, num_proc)
        part = work_dir / f"part-{i:04d}"
        pairs.select_columns(["anchor", "positive"]).save_to_disk(str(part))
        shutil.rmtree(member_dir, ignore_errors=True)
        parts.append(part)
        dropped += n_dropped
        logger.info("replay %d/%d %s: %d of %d rows", i + 1, len(members), member.name, len(pairs), len(chosen))
    return concatenate_datasets([load_from_disk(str(p)) for p in parts]), dropped


def _load_pairs(spec: SourceSpec, mirror: Mirror, nrows, seed, work_dir: Path, num_proc: int):
    """(pairs, rows dropped for an empty text, raw rows per hub split)."""
    if spec.replay_of:
        return *_replay_pairs(spec, mirror, nrows, seed, work_dir, num_proc), {}
    raw, per_split = load_raw_splits(spec, mirror, nrows, work_dir, num_proc)
    return *to_pairs(spec, raw, seed, num_proc), per_split


# ---------------------------------------------------------------- caching


def cache_key(spec: SourceSpec, nrows: int | None, seed: int, max_eval: int) -> str:
    payload = f"{CACHE_FORMAT_VERSION}|{spec.fingerprint()}|{nrows}|{seed}|{max_eval}"
    return short_hash(payload)


def cache_path_for(cache_dir: Path, spec: SourceSpec, nrows: int | None, seed: int, max_eval: int) -> Path:
    return Path(cache_dir) / f"{spec.name.replace('/', '__')}-{cache_key(spec, nrows, seed, max_eval)}"


def _split_validation(pairs: Dataset, max_eval: int, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out up to `max_eval` rows drawn with `seed` (never more than a tenth of the source); 0 means no
    validation. The training rows keep their source order (the sampler shuffles them every epoch) as contiguous
    runs of the mapped file, so the cache is written by sequential reads: a shuffled split made one random read
    per row, which a source larger than the page cache turns into hours."""
    n_eval = min(max_eval, len(pairs) // 10)
    if n_eval <= 0:
        return pairs, pairs.select([])
    held_out = np.sort(np.random.default_rng(seed).choice(len(pairs), n_eval, replace=False))
    bounds = [-1, *held_out.tolist(), len(pairs)]
    runs = [pairs.select(range(start + 1, stop)) for start, stop in zip(bounds, bounds[1:]) if stop > start + 1]
    return concatenate_datasets(runs), pairs.select(held_out)


def _publish(tmp: Path, path: Path) -> None:
    """Rename a finished build into place. If another run sharing the cache published first, keep theirs (a
    reader may have it open); an incomplete leftover of a killed build is replaced."""
    try:
        os.rename(tmp, path)  # atomic; fails if `path` is a non-empty folder
    except OSError:
        if (path / COMPLETE_MARKER).exists():
            return
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)


def _is_intact(path: Path) -> bool:
    """The cached DatasetDict loads and each split has the row count its marker recorded."""
    try:
        meta = json.loads((path / COMPLETE_MARKER).read_text())
        splits = load_from_disk(str(path / "data"))
        return all(len(splits[name]) == meta[name] for name in splits)
    except Exception:  # noqa: BLE001 - any failure to read back means the cache cannot be trusted
        return False


def cached_build(path: Path, build) -> dict:
    """Build a cache folder once: rank 0 calls build(tmp_dir) -> metadata (row counts per split), in a temporary
    folder that is renamed into place with a completion marker written last; the other ranks wait and read. A
    folder without the marker (a killed build), or whose data no longer reads back with the recorded row counts,
    is rebuilt. Returns the metadata."""
    path = Path(path)
    with distributed.rank0_first() as builder:
        if builder and (path / COMPLETE_MARKER).exists() and not _is_intact(path):
            logger.warning("cache %s is damaged (unreadable or wrong row count); rebuilding it", path)
            shutil.rmtree(path)
        if builder and not (path / COMPLETE_MARKER).exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                meta = build(tmp)
                (tmp / COMPLETE_MARKER).write_text(json.dumps(meta))
                _publish(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((path / COMPLETE_MARKER).read_text())


def load_source(
    spec: SourceSpec,
    cache_dir: Path,
    nrows: int | None,
    seed: int,
    max_eval: int,
    mirror: Mirror | None = None,
    num_proc: int = 1,
) -> SourceData:
    path = cache_path_for(cache_dir, spec, nrows, seed, max_eval)
    mirror = mirror or Mirror(default_root(cache_dir), offline=False)

    def build(tmp: Path) -> dict:
        logger.info("building cache for source %s -> %s", spec.name, path)
        started = time.perf_counter()
        pairs, dropped, per_split = _load_pairs(spec, mirror, nrows, seed, tmp / "work", num_proc)
        train, validation = _split_validation(pairs, max_eval, seed)
        # datasets cannot read back an empty split, so an empty validation set is not written
        splits = {"train": train} | ({"validation": validation} if len(validation) else {})
        DatasetDict(splits).save_to_disk(str(tmp / "data"))
        shutil.rmtree(tmp / "work", ignore_errors=True)  # raw Arrow conversions: the cache holds the pairs
        seconds = time.perf_counter() - started
        rows = len(pairs) + dropped
        logger.info("source %s: %d rows read, %d kept in %.1f s (%.0f rows/s)", spec.name, rows, len(pairs), seconds,
                    rows / max(seconds, 1e-9))  # fmt: skip
        return {"source": spec.name, "train": len(train), "validation": len(validation), "dropped_empty": dropped,
                "rows_per_split": per_split}  # fmt: skip

    meta = cached_build(path, build)
    splits = load_from_disk(str(path / "data"))
    validation = splits["validation"] if "validation" in splits else splits["train"].select([])
    return SourceData(spec, splits["train"], validation, meta["dropped_empty"], path, meta.get("rows_per_split", {}))


def check_offline_inputs(
    specs: list[SourceSpec], cache_dir: Path, nrows, seed: int, max_eval: int, mirror: Mirror, n_data_src=None
) -> None:
    """Before a run writes anything: with a read-only mirror, every source whose cache is not built yet must have
    its files there (reading the manifests only), so a missing one fails now, in one line, not after hours."""
    if not mirror.offline:
        return
    checked = 0
    for spec in specs:  # in mixture order, so the error names the first source that is missing
        for source in mirror.expand(spec):
            if n_data_src is not None and checked >= n_data_src:
                return
            checked += 1
            if not (cache_path_for(cache_dir, source, nrows, seed, max_eval) / COMPLETE_MARKER).exists():
                for member in [m for s in source.replay_of for m in mirror.expand(s)] or [source]:
                    for split in mirror.split_members(member):
                        mirror.source_files(split, nrows)


def load_and_cache_datasets(
    specs: list[SourceSpec],
    cache_dir: Path,
    nrows: int | None = None,
    seed: int = 42,
    max_eval: int = 20,
    n_data_src: int | None = None,
    mirror: Mirror | None = None,
    num_proc: int = 1,
) -> list[SourceData]:
    """Every (expanded) source of the mixture, cached; `n_data_src` keeps the first N for smoke tests. Files come
    from `mirror` (default: `<cache_dir>/hub`, filled on demand by global rank 0)."""
    mirror = mirror or Mirror(default_root(cache_dir), offline=False)
    with distributed.rank0_first():  # rank 0 lists the hub configs (into the mirror); the others read the list
        expanded = [m for spec in specs for m in mirror.expand(spec)]
    if n_data_src is not None:
        expanded = expanded[:n_data_src]
    return [load_source(spec, cache_dir, nrows, seed, max_eval, mirror, num_proc) for spec in expanded]
