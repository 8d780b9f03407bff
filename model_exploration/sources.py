"""Data mixtures as data: the source registries in mixtures/*.yaml, parsed into `SourceSpec`s. Pure: no I/O
beyond reading the registry file (fetching is model_exploration/fetch.py, reading and caching data.py).

A registry lists sources with how they are fetched (`fetch`) and where they live (hub id / config / data_dir /
data_files, or a local file), which columns become anchor / positive / negative, and a weight. `weight` is the
expected number of passes over a source per epoch, so a batch comes from source i with probability proportional
to weight_i x size_i. A source's `query_prompt` / `document_prompt` / `prompts` (model_exploration/prompts.py) say
which prompt each of its columns is embedded with; the registry's top-level `query_prompt` / `document_prompt` are
the default of its sources.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Any

import yaml

from model_exploration.errors import UserError
from model_exploration.keys import REPO_ROOT, short_hash

MIXTURES_DIR = Path(__file__).resolve().parent / "mixtures"
FETCH_WAYS = ("hub", "parquet_export", "pubmed_baseline", "kaggle", "jsonl")
CLEANERS = ("strip_xml", "normalize_whitespace")
# where the sources that name no hub repo or file come from
FIXED_HOMES = {"pubmed_baseline": "NCBI PubMed baseline", "kaggle": "Kaggle Cornell-University/arxiv"}
# `splits: all`: every split the repo serves (as `datasets`' split="all"), listed when first fetched (fetch.Mirror)
ALL_SPLITS = "all"


# fields that do not change a source's rows (so not its cache key; prompts are in the token cache's key)
_NOT_IDENTITY = {"weight", "enabled", "unverified", "mined", "query_prompt", "document_prompt", "prompts"}
# registry-wide defaults of the sources' prompts (top-level keys of a mixture file)
PROMPT_DEFAULTS = ("query_prompt", "document_prompt")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    fetch: str = "hub"
    hub: str | None = None
    config: str | None = None
    data_dir: str | None = None
    data_files: str | None = None
    # hub splits read and concatenated in this order (hub and parquet_export sources); ("all",): every split
    splits: tuple[str, ...] = ("train",)
    anchor: str | None = None
    positive: str | None = None
    negative: str | tuple[str, ...] | None = None  # one column path, or several (columns negative_1..k)
    pair_from_list: str | None = None
    clean: str | None = None
    weight: float = 1.0
    enabled: bool = True
    expand_configs: bool = False
    # why the columns could not be checked against a public card (shown by --dry_run)
    unverified: str | None = None
    # how the negatives were mined (data_prep/mine_hard_negatives.py writes it; shown by --dry_run)
    mined: str | None = None
    # prompts (model_exploration/prompts.py): the anchor's and the other columns' (None: the run's; "": none), and
    # per output column ((column, prompt) pairs) where one column needs its own
    query_prompt: str | None = None
    document_prompt: str | None = None
    prompts: tuple[tuple[str, str], ...] = ()
    # Stage-1 replay: the specs it samples from and how many rows of each (None: every row)
    replay_of: tuple[SourceSpec, ...] = ()
    rows_per_source: int | None = None

    @property
    def is_triplet(self) -> bool:
        return self.negative is not None

    @property
    def negatives(self) -> tuple[str, ...]:
        """Column paths of the negatives (none, one, or several)."""
        if self.negative is None:
            return ()
        return (self.negative,) if isinstance(self.negative, str) else tuple(self.negative)

    @property
    def columns(self) -> list[str]:
        """Output columns, in the order MultipleNegativesRankingLoss reads them."""
        if len(self.negatives) > 1:
            return ["anchor", "positive"] + [f"negative_{i}" for i in range(1, len(self.negatives) + 1)]
        return ["anchor", "positive"] + (["negative"] if self.negatives else [])

    @property
    def column_paths(self) -> dict[str, str]:
        """Output column -> column path in the source's rows."""
        return dict(zip(self.columns, (self.anchor, self.positive, *self.negatives)))

    @property
    def split(self) -> str:
        """The split of a one-split spec (fetch.Mirror.split_members makes one per split of a source)."""
        if len(self.splits) != 1 or self.splits[0] == ALL_SPLITS:
            raise ValueError(f"source {self.name!r} reads splits {self.splits}: take Mirror.split_members(spec)")
        return self.splits[0]

    @property
    def reads_local_file(self) -> bool:
        """Whether the source is a file on local disk (JSON lines, or an arXiv snapshot passed by path), not fetched."""
        return bool(self.data_files) and self.fetch in ("jsonl", "kaggle")

    def local_path(self) -> Path:
        path = Path(self.data_files)
        return path if path.is_absolute() else REPO_ROOT / path

    def local_paths(self) -> list[Path]:
        """A local source's files: `data_files` itself, or the files its glob (`*`, `?`, `[...]`, `**`) matches,
        sorted, so that every node reads them in the same order."""
        if not any(c in self.data_files for c in "*?["):
            return [self.local_path()]
        return sorted(Path(p) for p in glob.glob(str(self.local_path()), recursive=True) if Path(p).is_file())

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the rows this source yields: not its weight or notes, but a local
        file's size and a hash of its first and last MiB, so that a rewritten file (negatives mined again) is read
        again, while ranks on nodes with their own copy of the file agree on the key."""
        return short_hash(json.dumps(self._identity(), sort_keys=True, default=str))

    def _identity(self) -> dict[str, Any]:
        spec = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_IDENTITY}
        spec["replay_of"] = [member._identity() for member in self.replay_of]
        # one split keeps the key it had before `splits` existed (`split: name`), so built caches stay valid
        splits = spec.pop("splits")
        spec["split"] = splits[0] if len(splits) == 1 else list(splits)
        if self.pair_from_list:  # single-member lists became (member, member) pairs: their caches are rebuilt
            spec["single_member"] = "anchor=positive"
        if self.reads_local_file:
            files = [p for p in self.local_paths() if p.exists()]
            if files == [self.local_path()]:
                spec["file"] = _file_signature(files[0])
            elif files:  # a glob: the files it matches now
                spec["files"] = {str(p): _file_signature(p) for p in files}
        return spec

    def describe(self) -> str:
        if self.replay_of:
            rows = f"{self.rows_per_source} random rows" if self.rows_per_source else "every row"
            return f"replay: {rows} of each of {len(self.replay_of)} Stage-1 sources (anchor, positive)"
        where = f"{self.fetch}: " + (self.hub or self.data_files or FIXED_HOMES.get(self.fetch, "?"))
        if self.config:
            where += f" [{self.config}]"
        if self.data_files and self.hub:
            where += f" files={self.data_files}"
        if self.splits != ("train",):
            where += f" splits={'+'.join(self.splits)}"
        cols = (
            f"two of {self.pair_from_list}[]"
            if self.pair_from_list
            else " -> ".join(c for c in (self.anchor, self.positive, *self.negatives) if c)
        )
        unverified = f"  [schema unverified: {self.unverified}]" if self.unverified else ""
        mined = f"  [mined: {self.mined}]" if self.mined else ""
        return f"{where}: {cols}{unverified}{mined}"


def _file_signature(path: Path, edge: int = 1 << 20) -> list:
    """Size and a hash of the first and last `edge` bytes: cheap on a multi-GB file, equal for equal copies."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(edge)
        f.seek(max(size - edge, 0))
        tail = f.read(edge)
    return [size, short_hash(head + tail)]


def registry_entry(spec: SourceSpec) -> dict[str, Any]:
    """A spec as a registry entry (the fields that differ from their defaults), e.g. to write a mixture file."""
    defaults = SourceSpec(name=spec.name)
    skip = {"replay_of", "rows_per_source"}
    entry = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(SourceSpec)
        if f.name not in skip and getattr(spec, f.name) != getattr(defaults, f.name) or f.name == "name"
    }
    if spec.reads_local_file:
        # absolute: a mixture file resolves relative paths against its own folder, the registries against the repo
        entry["data_files"] = str(spec.local_path())
    if spec.prompts:
        entry["prompts"] = dict(spec.prompts)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}


def _parse_source(raw: dict[str, Any], registry: str) -> SourceSpec:
    known = ({f.name for f in dataclasses.fields(SourceSpec)} - {"replay_of", "rows_per_source"}) | {"split"}
    unknown = set(raw) - known
    name = raw.get("name", "?")
    if unknown:
        raise UserError(f"{registry}: source {name!r} has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    if "split" in raw:  # the one-split spelling of earlier mixture files
        if "splits" in raw:
            raise UserError(f"{registry}: source {name!r} has both `split` and `splits`; keep `splits`")
        raw = {("splits" if k == "split" else k): v for k, v in raw.items()}
    if "splits" in raw:
        splits = raw["splits"]
        splits = [splits] if isinstance(splits, str) else splits
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) and s for s in splits):
            raise UserError(f"{registry}: source {name!r}: `splits` is a list of split names (or `all`)")
        if ALL_SPLITS in splits and len(splits) > 1:
            raise UserError(f"{registry}: source {name!r}: `splits: all` already takes every split; list none besides")
        if len(set(splits)) != len(splits):
            raise UserError(f"{registry}: source {name!r} lists a split twice in {splits}")
        raw = raw | {"splits": tuple(splits)}
    raw = raw | _parse_prompts(raw, f"{registry}: source {name!r}")
    spec = SourceSpec(
        **{k: (str(v) if k == "config" else tuple(v) if isinstance(v, list) else v) for k, v in raw.items()}
    )
    if spec.fetch not in FETCH_WAYS:
        raise UserError(f"{registry}: source {name!r} has fetch {spec.fetch!r}; use one of {FETCH_WAYS}")
    if spec.fetch in ("hub", "parquet_export") and not spec.hub:
        raise UserError(f"{registry}: source {name!r} (fetch {spec.fetch}) needs `hub` (a dataset id)")
    if spec.splits != ("train",) and spec.fetch not in ("hub", "parquet_export"):
        raise UserError(f"{registry}: source {name!r}: `splits` applies to hub sources (fetch hub / parquet_export)")
    if spec.fetch == "jsonl" and not spec.data_files:
        raise UserError(f"{registry}: source {name!r} (fetch jsonl) needs `data_files`")
    if spec.expand_configs and spec.fetch != "parquet_export":
        raise UserError(
            f"{registry}: source {name!r}: expand_configs lists the parquet export's configs; set fetch: parquet_export"
        )
    if not spec.pair_from_list and not (spec.anchor and spec.positive):
        raise UserError(f"{registry}: source {name!r} needs `anchor` and `positive` columns (or `pair_from_list`)")
    if spec.clean and spec.clean not in CLEANERS:
        raise UserError(f"{registry}: source {name!r} has clean={spec.clean!r}; use one of {CLEANERS}")
    if spec.weight <= 0:
        raise UserError(f"{registry}: source {name!r} has weight {spec.weight}; weights must be > 0")
    unknown_columns = [c for c, _ in spec.prompts if c not in spec.columns]
    if unknown_columns:
        raise UserError(
            f"{registry}: source {name!r} has a prompt for column(s) {unknown_columns}, which it does not have "
            f"(its columns: {', '.join(spec.columns)}); key `prompts` by those"
        )
    return spec


def _parse_prompts(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The prompt fields of a source (or the registry's defaults) checked: texts, and `prompts` a mapping of
    column -> text, kept as sorted (column, text) pairs (a SourceSpec is immutable)."""
    out: dict[str, Any] = {}
    for key in PROMPT_DEFAULTS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise UserError(f"{where}: `{key}` must be a text (quote it), got {raw[key]!r}")
    if "prompts" in raw:
        prompts = raw["prompts"]
        if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
        ):
            raise UserError(f"{where}: `prompts` maps a column to its prompt text, e.g. {{anchor: 'query: '}}")
        out["prompts"] = tuple(sorted(prompts.items()))
    return out


def load_registry(stage: str) -> tuple[list[SourceSpec], dict[str, Any]]:
    """All sources of a built-in registry (enabled or not) and its extra sections."""
    return _read_registry(MIXTURES_DIR / ("sample.yaml" if stage == "sample" else f"stage{stage}.yaml"))


def _read_registry(path: Path) -> tuple[list[SourceSpec], dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"mixture {path}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise UserError(f"mixture {path}: expected a YAML mapping with a non-empty `sources:` list")
    specs = [_parse_source(s, path.name) for s in raw["sources"]]
    names = [s.name for s in specs]
    if len(names) != len(set(names)):
        raise UserError(f"{path.name}: duplicate source names {sorted({n for n in names if names.count(n) > 1})}")
    _parse_prompts({k: v for k, v in raw.items() if k in PROMPT_DEFAULTS}, f"mixture {path.name}")
    return specs, {k: v for k, v in raw.items() if k != "sources"}


def mixture_prompt_defaults(stage: str, mixture: str | Path | None = None) -> tuple[str | None, str | None]:
    """(query_prompt, document_prompt) a mixture file (or the stage's registry) sets for all its sources; None
    where it sets none."""
    _, extra = _read_registry(Path(mixture).resolve()) if mixture else load_registry(stage)
    return extra.get("query_prompt"), extra.get("document_prompt")


def _select(specs: list[SourceSpec], enable: list[str] | None, disable: list[str] | None) -> list[SourceSpec]:
    names = {s.name for s in specs}
    for flag, chosen in (("--enable_sources", enable), ("--disable_sources", disable)):
        unknown = set(chosen or []) - names
        if unknown:
            raise UserError(f"{flag}: unknown source(s) {sorted(unknown)}; known: {sorted(names)}")
    return [s for s in specs if (s.enabled or s.name in (enable or [])) and s.name not in (disable or [])]


def build_dataset_configs_s1(enable: list[str] | None = None, disable: list[str] | None = None) -> list[SourceSpec]:
    """Stage-1 sources. `expand_configs` sources become one source per hub config when fetched (fetch.Mirror)."""
    specs, _ = load_registry("1")
    return _select(specs, enable, disable)


def stage1_replay(
    weight: float, rows_per_source: int | None, include_triplets: bool = False, name: str = "stage1_replay"
) -> SourceSpec:
    """The anti-forgetting share of Stage 2: a seeded random sample of `rows_per_source` rows (None: every row)
    spread over each whole Stage-1 pair source, merged into one (anchor, positive) source. Triplet sources are
    left out unless `include_triplets` (then their anchor and positive only), as the original replayed only the
    pair sources of Stage 1."""
    members = tuple(s for s in build_dataset_configs_s1() if include_triplets or not s.is_triplet)
    return SourceSpec(
        name=name,
        anchor="anchor",
        positive="positive",
        weight=weight,
        replay_of=members,
        rows_per_source=rows_per_source,
    )


def build_dataset_configs_s2(
    enable: list[str] | None = None,
    disable: list[str] | None = None,
    sde_weight_scale: float = 1.0,
    stage1_replay_weight: float | None = None,
    arxiv_path: str | None = None,
    replay_rows_per_source: int | None = None,
    replay_triplets: bool = False,
) -> list[SourceSpec]:
    """Stage-2 sources plus the anti-forgetting replay of Stage 1, built from the Stage-1 registry.
    `replay_rows_per_source`: None = the registry's, 0 = every row (the original's full replay)."""
    specs, extra = load_registry("2")
    replay_cfg = extra["stage1_replay"]
    weight = replay_cfg["weight"] if stage1_replay_weight is None else stage1_replay_weight
    rows = int(replay_cfg["rows_per_source"]) if replay_rows_per_source is None else replay_rows_per_source
    replay = stage1_replay(weight, rows or None, replay_triplets, name=replay_cfg["name"])
    adjusted = []
    for spec in specs:
        if spec.name == "nasa_sde_st_corpus":
            spec = dataclasses.replace(spec, weight=spec.weight * sde_weight_scale)
        if spec.fetch == "kaggle" and arxiv_path:
            spec = dataclasses.replace(spec, data_files=arxiv_path)
        adjusted.append(spec)
    selected = _select(adjusted + [replay], enable, disable)
    return [s for s in selected if s.weight > 0]


def build_dataset_configs_file(
    path: str | Path, enable: list[str] | None = None, disable: list[str] | None = None
) -> list[SourceSpec]:
    """A user's own mixture file (same format as mixtures/*.yaml, a `stage1_replay:` section included); relative
    `data_files` of local sources are relative to the file's folder. A relative path that is not there from the
    working directory is read from the repository (e.g. a recipe's recipes/mixtures/*.yaml, from any directory)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    path = path.resolve()
    specs, extra = _read_registry(path)
    specs = [
        dataclasses.replace(s, data_files=str(path.parent / s.data_files))
        if s.fetch == "jsonl" and not Path(s.data_files).is_absolute()
        else s
        for s in specs
    ]
    replay = extra.get("stage1_replay")
    if replay:
        rows = int(replay.get("rows_per_source", 0)) or None
        specs.append(stage1_replay(replay["weight"], rows, bool(replay.get("triplets")), name=replay["name"]))
    return _select(specs, enable, disable)


def build_dataset_configs_sample(enable: list[str] | None = None, disable: list[str] | None = None) -> list[SourceSpec]:
    specs, _ = load_registry("sample")
    return _select(specs, enable, disable)
