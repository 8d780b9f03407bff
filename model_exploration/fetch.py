"""Fetching: every source and benchmark is read from files in a local mirror, put there by one of five ways.

Why a mirror: GPU nodes are often air-gapped, so `python data_prep/prefetch.py --out DIR` fetches on a login node
exactly the files a mixture reads, and `--hub_dir DIR` (or ST_HUB_DIR) makes training read only from DIR. Without
`--hub_dir`, the mirror is `<cache_dir>/hub` and global rank 0 fills it on demand with the same code; either way
the rows a run trains on come from the same files read by the same function (`read_files`).

Mirror layout (what each way writes; a manifest, written last, lists a set of files once all are there):

    datasets/<org>/<name>/main/<path in repo>                   hub: a repo's files at their repo paths
    datasets/<org>/<name>/parquet-export/<config>/<split>/NNNN.parquet
                                                                the hub's parquet export (refs/convert/parquet)
    datasets/<org>/<name>/<main|parquet-export>/_manifests/<config>/<split>.json
    datasets/<org>/<name>/<main|parquet-export>/_manifests/<config>/_splits.json   `splits: all`: the split list
    ncbi/pubmed/baseline/pubmedYYnNNNN.xml.gz                   NCBI's PubMed baseline
    kaggle/Cornell-University/arxiv/arxiv-metadata-oai-snapshot.json
    models/<org>/<name>/                                        models (snapshot)

The ways (registry field `fetch`):
- `hub`: a `datasets`-loadable hub repo; the files of (config, split) are resolved by `datasets`' own config
  resolution (`load_dataset_builder`), so README `configs:`, `data_dir` and `data_files` mean what they mean there.
- `parquet_export`: repos that still ship a loading script, which `datasets` 5 refuses; the hub's automatic export
  holds them as parquet, one folder per config (the config list is that revision's folders).
- `pubmed_baseline`: NCBI's baseline (model_exploration/pubmed.py), md5-checked.
- `kaggle`: the arXiv snapshot through the Kaggle API (credentials from .env).
- `jsonl`: local JSON-lines files (bundled sample, a user's own data, mined negatives): one file or a glob, plain
  or .gz; nothing to fetch.
A hub source reads one file set per split of its `splits` (one manifest each), concatenated in that order by
data.py; `splits: all` takes every split the repo serves, listed when first fetched and recorded in the mirror.
With `--nrows N`, a hub source is fetched as the first N rows of its first file (read through HTTP range requests),
PubMed as its first file, and the manifest records `head_rows`, so a full run never mistakes a head for a source.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from model_exploration import pubmed
from model_exploration.errors import UserError
from model_exploration.keys import short_hash
from model_exploration.reporting import write_atomic
from model_exploration.sources import ALL_SPLITS, SourceSpec

logger = logging.getLogger(__name__)

EXPORT_REVISION = "refs/convert/parquet"
MANIFESTS = "_manifests"
SPLITS_FILE = "_splits"  # manifest name of a `splits: all` source's split list
CONFIGS_FILE = "_configs.json"
KAGGLE_DATASET = "Cornell-University/arxiv"
KAGGLE_FILE = "arxiv-metadata-oai-snapshot.json"
FORMATS = ("parquet", "json", "csv", "pubmed_xml", "arxiv_json")
# a smoke fetch's heads live apart from whole files (<checkout>/_heads/<path>): huggingface_hub would otherwise take
# a head at the whole file's path, with that file's download metadata, for the whole file
HEADS = "_heads"
# files whose first rows make a valid file of the same format (write_head); others are fetched whole
_HEADABLE = re.compile(r"\.(parquet|jsonl(\.gz)?)$")


@dataclasses.dataclass(frozen=True)
class FileSet:
    """The files of one source split in the mirror, as a manifest records them."""

    format: str
    paths: list[Path]
    head_rows: int | None = None
    revision: str | None = None

    def serves(self, nrows: int | None) -> bool:
        """Whether these files hold what a run reading `nrows` rows (None: all) needs."""
        return self.head_rows is None or (nrows is not None and nrows <= self.head_rows)

    def parquet_rows(self) -> int:
        """Rows of parquet files, from their footers (nothing else is read)."""
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in self.paths)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to fetch for one source split: where, which files, in which format."""

    checkout: Path  # mirror folder the paths are relative to
    key: str  # manifest name inside the checkout
    format: str
    remote: list[str]  # hub paths in repo, or URLs
    revision: str | None = None
    repo: str | None = None
    md5: dict[str, str] = dataclasses.field(default_factory=dict)

    def local(self, remote: str) -> str:
        return urllib.parse.urlparse(remote).path.rsplit("/", 1)[-1] if "://" in remote else remote


def hub_checkout(repo: str, export: bool) -> Path:
    return Path("datasets") / repo / ("parquet-export" if export else "main")


def _manifest_path(root: Path, checkout: Path, key: str) -> Path:
    return root / checkout / MANIFESTS / f"{key}.json"


def source_location(spec: SourceSpec) -> tuple[Path, str]:
    """(mirror checkout, manifest key) of a source's split; pure, so a dry run can show it offline."""
    if spec.fetch == "pubmed_baseline":
        return Path("ncbi/pubmed/baseline"), "baseline"
    if spec.fetch == "kaggle":
        return Path("kaggle") / KAGGLE_DATASET, "snapshot"
    key = f"{spec.config or 'default'}/{spec.split}"
    if spec.data_dir or spec.data_files:  # the same repo read through other files is another file set
        key += "-" + short_hash(f"{spec.data_dir}|{spec.data_files}", 8)
    return hub_checkout(spec.hub, spec.fetch == "parquet_export"), key


def split_listing_location(spec: SourceSpec) -> tuple[Path, str]:
    """(mirror checkout, manifest key) of the split list of a `splits: all` source."""
    return source_location(dataclasses.replace(spec, splits=(SPLITS_FILE,)))


def files_key(paths: list[str]) -> str:
    """Manifest name of a fixed set of repo files (a BEIR folder in a hub repo)."""
    return "files-" + short_hash("|".join(paths), 8)


class Mirror:
    """Source, benchmark and model files on local disk. `offline`: only read (a --hub_dir prepared by
    prefetch.py); otherwise missing files are fetched (call from one process: rank 0 builds caches)."""

    def __init__(self, root: str | Path, offline: bool, prefetch_hint: str = "python data_prep/prefetch.py"):
        self.root = Path(root)
        self.offline = offline
        self.prefetch_hint = prefetch_hint

    # ------------------------------------------------------------ sources

    def describe(self, spec: SourceSpec, nrows: int | None = None) -> list[str]:
        """Lines for a dry run, read from the mirror only: where the source sits and whether it is there, one line
        per split, with the split's rows where its files say without reading the data (parquet footers)."""
        if spec.reads_local_file:
            paths = spec.local_paths()
            if paths != [spec.local_path()]:  # a glob
                return [f"local files {spec.local_path()}: " + (f"{len(paths)} file(s)" if paths else "none matches")]
            return [f"local file {spec.local_path()}" + ("" if spec.local_path().exists() else " (MISSING)")]
        if spec.expand_configs:
            listing = self.root / hub_checkout(spec.hub, export=True) / CONFIGS_FILE
            if not listing.exists():
                return [f"{listing.parent}: config list not fetched"]
            configs = [self.split_members(c, listed_only=True) for c in self.expand(spec)]
            fetched = sum(bool(c) and all(self._read_manifest(*source_location(m)) for m in c) for c in configs)
            return [f"{listing.parent}: {len(configs)} configs, {fetched} fetched"]
        members = self.split_members(spec, listed_only=True)
        if not members:
            checkout, key = split_listing_location(spec)
            return [f"{self.root / checkout} [{key}]: split list not fetched (splits: all)"]
        lines = []
        for member in members:
            checkout, key = source_location(member)
            found = self._read_manifest(checkout, key)
            if found is None:
                state = "not fetched"
            elif not found.serves(nrows):
                state = f"only the first {found.head_rows} rows fetched"
            else:
                head = f", first {found.head_rows} rows" if found.head_rows else ""
                rows = f", {found.parquet_rows():,} rows" if found.format == "parquet" else ""
                state = f"{len(found.paths)} file(s){head}{rows}"
            lines.append(f"{self.root / checkout} [{key}]: {state}")
        return lines

    def split_members(self, spec: SourceSpec, listed_only: bool = False) -> list[SourceSpec]:
        """One single-split spec per split a source reads, in its order. `splits: all`: the repo's splits, from the
        list recorded in the mirror (listed on the hub first when this mirror may fetch; with `listed_only`, none
        when it is not recorded). Sources that are not hub repos (local files, NCBI, Kaggle) are one split."""
        if spec.fetch not in ("hub", "parquet_export") or spec.replay_of:
            return [spec]
        splits = spec.splits
        if splits == (ALL_SPLITS,):
            checkout, key = split_listing_location(spec)
            path = _manifest_path(self.root, checkout, key)
            if path.exists():
                splits = json.loads(path.read_text())
            elif listed_only:
                return []
            elif self.offline:
                raise UserError(
                    f"source {spec.name!r} (splits: all): the split list of {spec.hub} is not in the mirror "
                    f"{self.root} ({path}); fetch it on a machine with internet: {self.prefetch_hint} --out {self.root}"
                )
            else:
                splits = _hub_call(spec, lambda: _hub_splits(spec))
                self.record_splits(spec, splits)
        return [dataclasses.replace(spec, splits=(split,)) for split in splits]

    def source_files(self, spec: SourceSpec, nrows: int | None = None) -> FileSet:
        """The files of a source split, fetched first when this mirror may fetch and they are missing."""
        if spec.fetch == "jsonl":
            return FileSet("json", spec.local_paths())
        if spec.fetch == "kaggle" and spec.data_files:  # --arxiv_path: a snapshot downloaded by hand
            if not spec.local_path().exists():
                raise UserError(
                    f"source {spec.name!r}: arXiv snapshot not found at {spec.local_path()}; download it with: "
                    f"python data_prep/download_arxiv.py --out_dir {spec.local_path().parent}"
                )
            return FileSet("arxiv_json", [spec.local_path()])
        checkout, key = source_location(spec)
        found = self._read_manifest(checkout, key)
        if found is not None and found.serves(nrows):
            return found
        if self.offline:
            what = "is not in" if found is None else f"holds only its first {found.head_rows} rows in"
            raise UserError(
                f"source {spec.name!r} {what} the mirror {self.root} ({checkout}/{MANIFESTS}/{key}.json); fetch it on "
                f"a machine with internet: {self.prefetch_hint} --out {self.root}"
            )
        plan = self._plan(spec, nrows)
        if nrows is not None and (plan.repo is not None or spec.fetch == "pubmed_baseline"):
            # a smoke test reads the first file only (a hub file's head, PubMed's first baseline file) and the
            # manifest says so, so that a full run fetches the rest
            return self._fetch(dataclasses.replace(plan, remote=plan.remote[:1]), nrows)
        return self._fetch(plan, None)

    def expand(self, spec: SourceSpec) -> list[SourceSpec]:
        """One spec per hub config for `expand_configs` sources (their parquet export's folders); others as is."""
        if not spec.expand_configs:
            return [spec]
        listing = self.root / hub_checkout(spec.hub, export=True) / CONFIGS_FILE
        if listing.exists():
            configs = json.loads(listing.read_text())
        elif self.offline:
            raise UserError(
                f"source {spec.name!r}: the config list of {spec.hub} is not in the mirror {self.root} ({listing}); "
                f"fetch it on a machine with internet: {self.prefetch_hint} --out {self.root}"
            )
        else:
            configs = _hub_call(spec, lambda: _export_configs(spec.hub))
            self.record_configs(spec.hub, configs)
        return [
            dataclasses.replace(spec, name=f"{spec.name}/{config}", config=config, expand_configs=False)
            for config in configs
        ]

    def record(self, checkout: Path, key: str, fmt: str, files: list[str], revision=None, head_rows=None, repo=None):
        """Write the manifest of a complete set of files (relative to the checkout): the mark that they are there."""
        meta = {"format": fmt, "files": files, "revision": revision, "head_rows": head_rows, "repo": repo,
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        write_atomic(_manifest_path(self.root, checkout, key), json.dumps(meta, indent=1))

    def record_splits(self, spec: SourceSpec, splits: list[str]) -> None:
        """The split list of a `splits: all` source, as the hub served it."""
        write_atomic(_manifest_path(self.root, *split_listing_location(spec)), json.dumps(splits, indent=1))

    def record_configs(self, repo: str, configs: list[str]) -> None:
        write_atomic(self.root / hub_checkout(repo, export=True) / CONFIGS_FILE, json.dumps(configs, indent=1))

    def _read_manifest(self, checkout: Path, key: str) -> FileSet | None:
        path = _manifest_path(self.root, checkout, key)
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
            found = FileSet(meta["format"], [self.root / checkout / f for f in meta["files"]], meta.get("head_rows"),
                            meta.get("revision"))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged manifest: fetched again (or reported missing offline)
        return found if all(f.exists() for f in found.paths) else None

    def _plan(self, spec: SourceSpec, nrows: int | None) -> _Plan:
        checkout, key = source_location(spec)
        if spec.fetch == "hub":
            fmt, revision, paths = _hub_call(spec, lambda: _resolve_hub(spec))
            return _Plan(checkout, key, fmt, paths, revision, spec.hub)
        if spec.fetch == "parquet_export":
            revision, paths = _hub_call(spec, lambda: _resolve_export(spec))
            return _Plan(checkout, key, "parquet", paths, revision, spec.hub)
        if spec.fetch == "pubmed_baseline":
            return _pubmed_plan(spec, checkout, key, first_only=nrows is not None)
        if spec.fetch == "kaggle":
            return _Plan(checkout, key, "arxiv_json", [f"kaggle://{KAGGLE_DATASET}/{KAGGLE_FILE}"])
        raise UserError(f"source {spec.name!r}: unknown fetch way {spec.fetch!r}")

    def _fetch(self, plan: _Plan, head_rows: int | None) -> FileSet:
        folder = self.root / plan.checkout
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        local = []
        for remote in plan.remote:
            name = plan.local(remote)
            if plan.repo is not None:
                name = _fetch_hub_file(plan.repo, plan.revision, remote, folder, head_rows)
            elif remote.startswith("kaggle://"):
                fetch_kaggle_snapshot(folder / name)
            else:
                download_url(remote, folder / name, plan.md5.get(remote))
            local.append(name)
        if plan.repo is not None and plan.checkout.name == "main":
            _fetch_card(plan.repo, plan.revision, folder)
        self.record(plan.checkout, plan.key, plan.format, local, plan.revision, head_rows, plan.repo)
        logger.info("fetched %s [%s]: %d file(s) in %.0f s", plan.checkout, plan.key, len(local),
                    time.perf_counter() - started)  # fmt: skip
        return FileSet(plan.format, [folder / f for f in local], head_rows, plan.revision)

    # ------------------------------------------------------------ benchmarks and models

    def hub_files(self, repo: str, paths: list[str], what: str) -> Path:
        """Fixed files of a hub repo (a BEIR folder), fetched when missing; returns the checkout folder."""
        checkout, key = hub_checkout(repo, export=False), files_key(paths)
        if self._read_manifest(checkout, key) is None:
            if self.offline:
                raise UserError(
                    f"{what}: {repo} is not in the mirror {self.root}; fetch it on a machine with internet: "
                    f"{self.prefetch_hint} --out {self.root}"
                )
            try:
                self._fetch(_Plan(checkout, key, "files", list(paths), None, repo), None)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
                raise UserError(f"{what}: cannot fetch {repo} ({_reason(exc)}); check the network / HF token") from None
        return self.root / checkout

    def hub_split(self, repo: str, config: str, split: str, what: str) -> FileSet:
        """The files of one (config, split) of a `datasets` hub repo (NanoBEIR's corpus / queries / qrels)."""
        return self.source_files(SourceSpec(name=what, fetch="hub", hub=repo, config=config, splits=(split,)))

    def model(self, name: str) -> str:
        """A hub model id as a folder of this mirror (offline), else the name itself (a local folder, or an id
        the hub serves)."""
        if Path(name).exists() or not self.offline:
            return name
        folder = self.root / "models" / name
        if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
            raise UserError(
                f"--model_name {name}: not a local folder and not in the mirror {self.root} ({folder}); fetch it on a "
                f"machine with internet: python data_prep/prefetch.py --skip_sources --eval_benchmarks --model_name "
                f"{name} --out {self.root}"
            )
        return str(folder)

    def fetch_model(self, name: str) -> Path:
        from huggingface_hub import snapshot_download

        folder = self.root / "models" / name
        try:
            snapshot_download(repo_id=name, local_dir=folder)
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
            raise UserError(
                f"--model_name {name}: cannot download it ({_reason(exc)}); check the id and token"
            ) from None
        return folder


# ---------------------------------------------------------------- resolving what to fetch (online)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else "") or type(exc).__name__


def _hub_call(spec: SourceSpec, call):
    """Run a hub query for a source; any failure becomes one line naming the source and what to do."""
    try:
        return call()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
        reason = _reason(exc)
        if "scripts are no longer supported" in reason:
            raise UserError(
                f"source {spec.name!r}: {spec.hub} is a loading-script repo, which datasets 5 refuses; set "
                "`fetch: parquet_export` for it in the mixture registry"
            ) from None
        where = f"{spec.hub}{f' [{spec.config}]' if spec.config else ''}"
        raise UserError(
            f"source {spec.name!r}: cannot reach hub dataset {where} ({reason}); check the id, network and HF token, "
            "or drop it with --disable_sources"
        ) from None


_HF_URL = re.compile(r"^hf://datasets/(?P<repo>[^@]+)@(?P<rev>[^/]+)/(?P<path>.+)$")


def _resolve_hub(spec: SourceSpec) -> tuple[str, str, list[str]]:
    """(format, revision, paths in repo) of a source's split, by `datasets`' own resolution of the repo's configs."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(spec.hub, name=spec.config, data_dir=spec.data_dir, data_files=spec.data_files)
    files = (builder.config.data_files or {}).get(spec.split)
    if not files:
        raise UserError(f"source {spec.name!r}: {spec.hub} has no split {spec.split!r}")
    matches = [_HF_URL.match(str(f)) for f in files]
    if not all(matches):
        raise UserError(f"source {spec.name!r}: unexpected data file location {files[0]} for {spec.hub}")
    if builder.name not in FORMATS:
        raise UserError(f"source {spec.name!r}: {spec.hub} is served as {builder.name!r}; supported: {FORMATS[:3]}")
    return builder.name, matches[0]["rev"], [urllib.parse.unquote(m["path"]) for m in matches]


def _hub_splits(spec: SourceSpec) -> list[str]:
    """The splits a hub source's repo serves (for `splits: all`): `datasets`' resolution of its data files, or the
    split folders of the config in the parquet export; train, validation, test first, then the others by name."""
    if spec.fetch == "hub":
        from datasets import load_dataset_builder

        builder = load_dataset_builder(spec.hub, name=spec.config, data_dir=spec.data_dir, data_files=spec.data_files)
        names = list(builder.config.data_files or {})
    else:
        from huggingface_hub import HfApi

        entries = HfApi().list_repo_tree(spec.hub, spec.config, revision=EXPORT_REVISION, repo_type="dataset")
        names = [e.path.rsplit("/", 1)[-1].removeprefix("partial-") for e in entries if not hasattr(e, "size")]
    if not names:
        raise UserError(f"source {spec.name!r}: {spec.hub} lists no split")
    order = {"train": 0, "validation": 1, "test": 2}
    return sorted(set(names), key=lambda s: (order.get(s, 3), s))


def _resolve_export(spec: SourceSpec) -> tuple[str, list[str]]:
    """(revision, paths) of a config's split in the hub's parquet export. The export of a split over 5 GB holds
    its first 5 GB as `partial-<split>`: used, with a warning."""
    from huggingface_hub import HfApi

    api = HfApi()
    revision = api.dataset_info(spec.hub, revision=EXPORT_REVISION).sha
    for folder in (f"{spec.config}/{spec.split}", f"{spec.config}/partial-{spec.split}"):
        try:
            entries = list(api.list_repo_tree(spec.hub, folder, revision=revision, repo_type="dataset"))
        except Exception:  # noqa: BLE001 - folder absent: try the next name
            continue
        paths = sorted(e.path for e in entries if e.path.endswith(".parquet"))
        if paths:
            if "partial-" in folder:
                logger.warning("source %s: the hub's parquet export holds only part of %s", spec.name, spec.hub)
            return revision, paths
    raise UserError(f"source {spec.name!r}: {spec.hub} has no parquet export of {spec.config}/{spec.split}")


def _export_configs(repo: str) -> list[str]:
    from huggingface_hub import HfApi

    entries = HfApi().list_repo_tree(repo, revision=EXPORT_REVISION, repo_type="dataset")
    return sorted(e.path for e in entries if not hasattr(e, "size"))  # folders have no size


def _pubmed_plan(spec: SourceSpec, checkout: Path, key: str, first_only: bool) -> _Plan:
    base = os.environ.get("ST_PUBMED_BASELINE_URL", pubmed.BASELINE_URL)
    try:
        with urllib.request.urlopen(base, timeout=60) as response:
            listing = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"source {spec.name!r}: cannot list the PubMed baseline at {base} ({_reason(exc)})") from None
    names = pubmed.baseline_files(listing)
    if not names:
        raise UserError(f"source {spec.name!r}: no pubmedYYnNNNN.xml.gz file listed at {base}")
    names = names[:1] if first_only else names
    urls = [urllib.parse.urljoin(base, n) for n in names]
    md5 = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url + ".md5", timeout=60) as response:
                md5[url] = pubmed.parse_md5(response.read().decode("ascii", "replace"))
        except (urllib.error.URLError, OSError):
            logger.warning("source %s: no checksum for %s; downloading it unchecked", spec.name, url)
    return _Plan(checkout, key, "pubmed_xml", urls, names[0][:8], md5=md5)


# ---------------------------------------------------------------- fetching files (online)


def _fetch_hub_file(repo: str, revision: str | None, path: str, checkout: Path, head_rows: int | None) -> str:
    """One repo file into the checkout: whole, at <path> (huggingface_hub resumes an interrupted download), or, with
    head_rows, its first rows only, read through HTTP range requests, at _heads/<path>. Returns where it went."""
    from huggingface_hub import hf_hub_download

    if head_rows is None or not _HEADABLE.search(path):
        hf_hub_download(repo, path, repo_type="dataset", revision=revision, local_dir=checkout)
        return path
    from huggingface_hub import HfFileSystem

    url = f"datasets/{repo}@{urllib.parse.quote(revision or 'main', safe='')}/{path}"
    with HfFileSystem().open(url, "rb") as remote:
        write_head(remote, checkout / HEADS / path, path, head_rows)
    return f"{HEADS}/{path}"


def _fetch_card(repo: str, revision: str | None, checkout: Path) -> None:
    """The dataset card (README.md) beside the data, for whoever reads the mirror offline; best effort."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo, "README.md", repo_type="dataset", revision=revision, local_dir=checkout)
    except Exception:  # noqa: BLE001 - a repo without a card is still a source
        logger.info("%s has no README.md", repo)


def write_head(remote, dest: Path, name: str, rows: int) -> None:
    """The first `rows` rows of a data file (parquet or JSON lines, gzip or not) as a file of the same format."""
    tmp = dest.with_name(dest.name + ".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(remote)
        batch = next(parquet.iter_batches(batch_size=rows), None)
        table = pa.Table.from_batches([batch]) if batch is not None else parquet.schema_arrow.empty_table()
        pq.write_table(table, tmp)
    else:
        source = gzip.open(remote, "rb") if name.endswith(".gz") else remote
        with gzip.open(tmp, "wb") if name.endswith(".gz") else tmp.open("wb") as out:
            for n, line in enumerate(source):
                if n >= rows:
                    break
                out.write(line)
    os.replace(tmp, dest)


def download_url(url: str, dest: Path, md5: str | None = None, chunk: int = 1 << 20) -> None:
    """HTTP(S) download that resumes a partial `.part` file (Range request) and checks an md5 if given."""
    from tqdm.auto import tqdm

    if dest.exists():
        return
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=120)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: the .part already holds the whole file
            raise UserError(f"download {url}: HTTP {exc.code}; check the address or retry later") from None
        response = None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"download {url}: {_reason(exc)}; check the network and retry (it resumes)") from None
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            total = have + int(response.headers.get("Content-Length") or 0)
            with part.open("ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                             unit_scale=True, desc=dest.name) as bar:  # fmt: skip
                while block := response.read(chunk):
                    f.write(block)
                    bar.update(len(block))
    if md5:
        digest = hashlib.md5()
        with part.open("rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        if digest.hexdigest() != md5:
            part.unlink()
            raise UserError(f"download {url}: md5 mismatch (file deleted); run the command again")
    os.replace(part, dest)


def fetch_kaggle_snapshot(dest: Path) -> None:
    """The arXiv snapshot through the Kaggle API. Large files arrive zipped (`<file>.zip`): unpacked here."""
    from model_exploration.tracking import load_env

    unzip_snapshot(dest)  # a zip left by an interrupted earlier run
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    load_env()
    if (
        not (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
        and not (Path.home() / ".kaggle" / "kaggle.json").exists()
    ):
        raise UserError(
            "source 'arxiv': no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY in .env, or create "
            "~/.kaggle/kaggle.json"
        )
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
        api.dataset_download_file(KAGGLE_DATASET, KAGGLE_FILE, path=str(dest.parent))
    except Exception as exc:  # noqa: BLE001 - any API failure becomes one actionable line
        raise UserError(
            f"source 'arxiv': Kaggle download of {KAGGLE_DATASET}/{KAGGLE_FILE} failed ({_reason(exc)})"
        ) from None
    unzip_snapshot(dest)


def unzip_snapshot(dest: Path) -> None:
    """Unpack `<dest>.zip` (how the Kaggle API delivers large files) into `dest`, atomically: an interrupted unpack
    leaves the zip and no half file, and the next run unpacks again."""
    import shutil
    import zipfile

    zipped = dest.with_name(dest.name + ".zip")
    if not zipped.exists() or not zipfile.is_zipfile(zipped):  # absent, or a cut download the Kaggle API resumes
        return
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(zipped) as archive, archive.open(dest.name) as member, tmp.open("wb") as out:
        shutil.copyfileobj(member, out, 1 << 20)
    os.replace(tmp, dest)
    zipped.unlink()


# ---------------------------------------------------------------- reading (the same for every mirror)


def iter_jsonl(path: str | Path, context: str) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines file (plain or .gz), streamed; a malformed line is a UserError naming `context`
    (the source or benchmark), the file and the line number."""
    path = Path(path)
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield parse_json_line(line, path, lineno, context)


def parse_json_line(line: str, path: str | Path, lineno: int, context: str) -> Any:
    """One JSON line, or a one-line UserError naming `context`, the file and the line number."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{context}: malformed JSON at {path}:{lineno} ({exc.msg}); fix or remove that line") from None


# A local JSON-lines source in Arrow: one column, each row's line as text. Kept as text because users' rows may mix
# types that one Arrow column cannot hold (a text here, a list of texts there); the column map (data.to_pairs)
# parses them again a batch at a time (json.loads is ~2 us for a 1 KB line).
JSONL_TEXT = "_jsonl_text"


def read_jsonl_lines(paths: list[Path], nrows: int | None, work_dir: Path, context: str, chunk_rows: int = 10_000):
    """The rows of JSON-lines files (plain or .gz, in the order given; the first `nrows` if given) as a
    memory-mapped `datasets.Dataset` of their lines, written to `work_dir` `chunk_rows` lines at a time, so a
    process holds one chunk whatever the files' size; only the head is read with `nrows`. Every line is checked
    here, so a malformed one fails before anything is built, naming `context`, the file and the line number."""
    import pyarrow as pa
    from datasets import Dataset

    schema = pa.schema([(JSONL_TEXT, pa.string())])
    work_dir.mkdir(parents=True, exist_ok=True)
    handle, dest = tempfile.mkstemp(prefix="jsonl-lines-", suffix=".arrow", dir=work_dir)  # never over a mapped one
    os.close(handle)
    written = 0
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for path in paths:
            if written == nrows:
                break
            rows = _checked_lines(path, context)
            if nrows is not None:
                rows = islice(rows, nrows - written)
            while chunk := list(islice(rows, chunk_rows)):
                writer.write_batch(pa.record_batch([pa.array(chunk, pa.string())], schema=schema))
                written += len(chunk)
    return Dataset.from_file(dest)


def _checked_lines(path: Path, context: str) -> Iterator[str]:
    """The non-empty lines of a JSON-lines file, each checked to be UTF-8 text holding one JSON object."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{context}: not UTF-8 text at {path}:{lineno}; re-encode the file as UTF-8") from None
            row = parse_json_line(text, path, lineno, context)
            if not isinstance(row, dict):
                raise UserError(
                    f"{context}: expected a JSON object at {path}:{lineno}, found {type(row).__name__}; "
                    "each line must be one row"
                )
            yield text


def _arxiv_rows(paths: list[str], limit: int | None = None):
    """id, title, abstract of the Kaggle snapshot's JSON lines (its other fields mix types Arrow cannot hold)."""
    rows = (row for path in paths for row in iter_jsonl(path, "source 'arxiv'"))
    for row in islice(rows, limit):
        yield {"id": str(row.get("id") or ""), "title": row.get("title") or "", "abstract": row.get("abstract") or ""}


def _pubmed_rows(paths: list[str], limit: int | None = None):
    yield from islice(pubmed.read_records(paths), limit)


def read_files(files: FileSet, nrows: int | None, work_dir: Path, num_proc: int = 1):
    """The rows of a file set as a `datasets.Dataset` (its real columns); the first `nrows` if given. Arrow
    conversions go to `work_dir`, which the caller deletes once the source's cache is written."""
    from datasets import Dataset, load_dataset

    paths = [str(p) for p in files.paths]
    cache = str(work_dir / "hf")
    if files.format in ("pubmed_xml", "arxiv_json"):
        generator = _pubmed_rows if files.format == "pubmed_xml" else _arxiv_rows
        if nrows is not None:
            return Dataset.from_generator(generator, gen_kwargs={"paths": paths[:1], "limit": nrows}, cache_dir=cache)
        # datasets shards the list of paths across processes: one baseline file per task
        procs = max(1, min(num_proc, len(paths)))
        return Dataset.from_generator(generator, gen_kwargs={"paths": paths}, cache_dir=cache,
                                      num_proc=procs if procs > 1 else None)  # fmt: skip
    builder = "csv" if files.format == "csv" else files.format
    kwargs = {"delimiter": "\t"} if builder == "csv" and paths[0].endswith((".tsv", ".tsv.gz")) else {}
    if nrows is not None:
        stream = load_dataset(builder, data_files=paths, split="train", streaming=True, **kwargs)
        return Dataset.from_list(list(stream.take(nrows)), features=stream.features)
    return load_dataset(builder, data_files=paths, split="train", cache_dir=cache,
                        num_proc=num_proc if num_proc > 1 and len(paths) > 1 else None, **kwargs)  # fmt: skip


def default_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "hub"
