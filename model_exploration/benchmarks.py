"""Retrieval benchmarks, loaded into one form: a corpus and one or more judged query sets over it.

- `beir:PATH`: a local BEIR folder (corpus.jsonl[.gz] with `_id`, optional `title`, `text`; queries.jsonl[.gz];
  qrels/<name>.tsv with `query-id corpus-id score`). Documents are embedded as (title + " " + text).strip(), the
  protocol behind published BEIR/MTEB scores.
- `nanobeir`: sentence-transformers/NanoBEIR-en, what sentence-transformers' NanoBEIREvaluator loads by default:
  subsets corpus / queries / qrels, one split per dataset (NanoSciFact, ...); corpus text already holds the title.
  Taken and scored as NanoBEIREvaluator does (documents and queries with an empty text are left out; a retrieved
  document whose id is the query's counts), so its rows are comparable with published NanoBEIR scores (tested).
- `nasa_smd`: nasa-impact/nasa-smd-IR-benchmark, a BEIR folder in a hub repo (qrels/test.tsv).
- `nasa_sde`: nasa-impact/nasa-sde-IR-benchmark-20251024-v5, a BEIR folder with two qrels files over one corpus,
  qa_pairs and search_pairs: a row for each and their unweighted mean (the paper's headline `nasa_sde`).
  Both NASA benchmarks embed a document's `text` alone, as the paper's evaluation did (so its table compares).
`doc_fields` (--doc_fields) replaces the protocol of the BEIR-layout benchmarks, e.g. ("title", "text") for the NASA
ones under BEIR's convention; NanoBEIR's corpus has one text field, which already holds the title.
Hub benchmarks are read from the same mirror as the training sources (model_exploration/fetch.py).

Relevance is graded as the qrels say (TREC-COVID and NFCorpus have grades 1 and 2): a document with grade > 0 is
relevant, and NDCG uses the grade as its gain, as trec_eval / MTEB do. A qrels line naming a document that is not
in the corpus keeps counting as relevant (it can never be retrieved), as in trec_eval; it is reported.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from model_exploration.data import read_jsonl
from model_exploration.errors import UserError
from model_exploration.fetch import Mirror, read_files
from model_exploration.keys import REPO_ROOT, short_hash

logger = logging.getLogger(__name__)

NANOBEIR_REPO = "sentence-transformers/NanoBEIR-en"
NANOBEIR_DATASETS = (
    "NanoClimateFEVER", "NanoDBPedia", "NanoFEVER", "NanoFiQA2018", "NanoHotpotQA", "NanoMSMARCO", "NanoNFCorpus",
    "NanoNQ", "NanoQuoraRetrieval", "NanoSCIDOCS", "NanoArguAna", "NanoSciFact", "NanoTouche2020",
)  # fmt: skip
NASA_SMD_REPO = "nasa-impact/nasa-smd-IR-benchmark"
NASA_SDE_REPO = "nasa-impact/nasa-sde-IR-benchmark-20251024-v5"
NASA_SDE_QRELS = ("qa_pairs", "search_pairs")
DOC_FIELDS = ("title", "text")  # fields a document may be embedded from, in the order they are joined
BEIR_DOC_FIELDS = ("title", "text")  # BEIR's and MTEB's convention: the published scores of BEIR folders
PAPER_DOC_FIELDS = ("text",)  # the INDUS-SDE-ST paper's NASA SMD / SDE protocol


@dataclasses.dataclass
class QuerySet:
    """Queries and their judged documents (corpus id -> grade > 0); `name` becomes a results row."""

    name: str
    query_ids: list[str]
    query_texts: list[str]
    relevant: dict[str, dict[str, int]]


@dataclasses.dataclass
class Benchmark:
    """One corpus and one or more query sets over it (encoded once). `mean_name` adds the unweighted mean of its
    query sets as a row; benchmarks sharing a `group` (the NanoBEIR datasets) also get a mean row of that name."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_sets: list[QuerySet]
    mean_name: str | None = None
    group: str | None = None
    # scored under the protocol of its published numbers: NanoBEIR's (sentence-transformers' evaluator) counts a
    # retrieved document whose id is the query's; BEIR's and MTEB's drop it (--keep_identical_ids keeps it)
    keeps_identical_ids: bool = False
    # the corpus fields each document was embedded from (joined with a space), as reported with the results
    doc_fields: tuple[str, ...] = ("text",)
    # prompts of its own (a source's validation set: the source's); None: the evaluator's
    query_prompt: str | None = None
    corpus_prompt: str | None = None

    def fingerprint(self) -> str:
        return short_hash(d.encode() + b"\0" + t.encode() + b"\1" for d, t in zip(self.corpus_ids, self.corpus_texts))

    @property
    def headline(self) -> str:
        """The row that stands for this benchmark: its group's mean, its own mean, or its only row."""
        return self.group or self.mean_name or self.query_sets[0].name


def _find(folder: Path, stem: str) -> Path | None:
    return next(
        (folder / f"{stem}{ext}" for ext in (".jsonl", ".jsonl.gz") if (folder / f"{stem}{ext}").exists()), None
    )


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (`query-id corpus-id score`, header optional) -> {query: {document: grade}}, grades > 0."""
    relevant: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (lineno == 1 and parts[0] == "query-id"):
                continue
            if len(parts) < 3:
                raise UserError(f"{path}:{lineno}: expected `query-id<TAB>corpus-id<TAB>score`")
            try:
                grade = float(parts[2])
            except ValueError:
                raise UserError(f"{path}:{lineno}: score {parts[2]!r} is not a number") from None
            if grade > 0:
                relevant.setdefault(parts[0], {})[parts[1]] = int(grade) if grade.is_integer() else grade
    return relevant


def build_query_set(
    name: str, queries: dict[str, str], relevant: dict[str, dict[str, int]], corpus_ids: set[str]
) -> QuerySet:
    """Judged queries that have a text and at least one relevant document; what the qrels name but the corpus or
    the queries lack is reported."""
    unknown_docs = sum(1 for docs in relevant.values() for d in docs if d not in corpus_ids)
    missing_queries = [q for q in relevant if q not in queries]
    kept = {q: docs for q, docs in relevant.items() if q in queries and docs}
    if unknown_docs or missing_queries:
        logger.warning(
            "%s: qrels name %d document(s) not in the corpus (kept as relevant, never retrieved: trec_eval "
            "semantics) and %d unknown query id(s) (ignored); %d judged queries",
            name, unknown_docs, len(missing_queries), len(kept),
        )  # fmt: skip
    if not any(d in corpus_ids for docs in kept.values() for d in docs):
        raise UserError(f"{name}: no judged query has a relevant document in the corpus; check the qrels ids")
    ids = sorted(kept)
    return QuerySet(name, ids, [queries[q] for q in ids], kept)


def load_beir_folder(
    folder: str | Path,
    name: str | None = None,
    qrels_files: Sequence[str] = ("test",),
    mean_name: str | None = None,
    doc_fields: Sequence[str] = BEIR_DOC_FIELDS,
) -> Benchmark:
    """A BEIR folder; one query set per qrels file (named `<name>/<file>` when there are several). A document is its
    `doc_fields` joined with a space, stripped: (title + " " + text).strip() by default."""
    folder = Path(folder)
    name = name or f"beir:{folder.name}"
    if not folder.is_dir():
        raise UserError(f"{name}: BEIR folder not found: {folder}")
    corpus_path, queries_path = _find(folder, "corpus"), _find(folder, "queries")
    if corpus_path is None or queries_path is None:
        raise UserError(f"{name}: {folder} needs corpus.jsonl[.gz] and queries.jsonl[.gz]")
    qrels_paths = [folder / "qrels" / f"{stem}.tsv" for stem in qrels_files]
    missing = [str(p) for p in qrels_paths if not p.exists()]
    if missing:
        raise UserError(f"{name}: qrels file(s) missing: {', '.join(missing)}; a BEIR folder needs qrels/test.tsv")
    docs = sorted(
        (str(d["_id"]), " ".join(str(d.get(field) or "") for field in doc_fields).strip())
        for d in read_jsonl(corpus_path, name)
    )  # sorted by id: position order == id order, which is the tie-break order
    logger.info("%s: %d documents embedded as %s", name, len(docs), " + ".join(doc_fields))
    corpus_ids = [d[0] for d in docs]
    id_set = set(corpus_ids)
    queries = {str(q["_id"]): str(q["text"]) for q in read_jsonl(queries_path, name)}
    query_sets = [
        build_query_set(name if len(qrels_paths) == 1 else f"{name}/{p.stem}", queries, read_qrels(p), id_set)
        for p in qrels_paths
    ]
    return Benchmark(
        name, corpus_ids, [d[1] for d in docs], query_sets, mean_name=mean_name, doc_fields=tuple(doc_fields)
    )


def _hub_rows(mirror: Mirror, repo: str, config: str, split: str, what: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as work:
        return read_files(mirror.hub_split(repo, config, split, what), None, Path(work)).to_list()


def load_nanobeir_dataset(dataset: str, mirror: Mirror) -> Benchmark:
    """One NanoBEIR dataset (a split of each of NanoBEIR-en's corpus / queries / qrels subsets)."""
    name = f"nanobeir/{dataset}"
    corpus, queries, qrels = (
        _hub_rows(mirror, NANOBEIR_REPO, subset, dataset, name) for subset in ("corpus", "queries", "qrels")
    )
    docs = sorted((str(d["_id"]), d["text"]) for d in corpus if d["text"])
    relevant: dict[str, dict[str, int]] = {}
    for row in qrels:
        ids = row["corpus-id"] if isinstance(row["corpus-id"], list) else [row["corpus-id"]]
        relevant.setdefault(str(row["query-id"]), {}).update({str(i): 1 for i in ids})
    corpus_ids = [d[0] for d in docs]
    texts = {str(q["_id"]): q["text"] for q in queries if q["text"]}
    qs = build_query_set(name, texts, relevant, set(corpus_ids))
    return Benchmark(name, corpus_ids, [d[1] for d in docs], [qs], group="nanobeir", keeps_identical_ids=True)


def canonical_spec(spec: str) -> str:
    """One spelling per benchmark: `beir:` paths made absolute (bundled data may be named relative to the repo,
    from any working directory)."""
    if not spec.startswith("beir:"):
        return spec
    path = Path(spec[len("beir:") :]).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    return f"beir:{path.resolve()}"


def load_benchmarks(spec: str, mirror: Mirror, doc_fields: Sequence[str] | None = None) -> list[Benchmark]:
    """Benchmarks for one --benchmarks entry: nanobeir, nasa_smd, nasa_sde or beir:PATH. `doc_fields`: what a
    document is embedded from (default: each benchmark's published protocol, module docstring)."""
    if spec == "nanobeir":
        return [load_nanobeir_dataset(d, mirror) for d in NANOBEIR_DATASETS]
    if spec == "nasa_smd":
        folder = mirror.hub_files(NASA_SMD_REPO, ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"], spec)
        return [load_beir_folder(folder, name="nasa_smd", doc_fields=doc_fields or PAPER_DOC_FIELDS)]
    if spec == "nasa_sde":
        files = ["corpus.jsonl", "queries.jsonl"] + [f"qrels/{q}.tsv" for q in NASA_SDE_QRELS]
        folder = mirror.hub_files(NASA_SDE_REPO, files, spec)
        return [load_beir_folder(folder, name="nasa_sde", qrels_files=NASA_SDE_QRELS, mean_name="nasa_sde",
                                 doc_fields=doc_fields or PAPER_DOC_FIELDS)]  # fmt: skip
    if spec.startswith("beir:"):
        path = Path(canonical_spec(spec)[len("beir:") :])
        return [load_beir_folder(path, name=f"beir:{path.name}", doc_fields=doc_fields or BEIR_DOC_FIELDS)]
    raise UserError(f"--benchmarks: unknown benchmark {spec!r}; use nanobeir, nasa_smd, nasa_sde or beir:PATH")


def validation_benchmark(
    name: str,
    anchors: list[str],
    positives: list[str],
    negatives: list[str] | None = None,
    group: str | None = None,
    prompts: tuple[str, str] | None = None,
) -> Benchmark:
    """In-training validation of one source: anchors are queries, the corpus holds every distinct positive (and
    negative) text, and a query's relevant documents are all those with its positive's exact text. `prompts`: the
    source's (anchor prompt, positive prompt)."""
    texts = sorted(set(positives) | set(negatives or []))
    doc_id = {t: f"d{i:08d}" for i, t in enumerate(texts)}
    query_ids = [f"q{i:08d}" for i in range(len(anchors))]
    relevant = {q: {doc_id[p]: 1} for q, p in zip(query_ids, positives)}
    query_prompt, corpus_prompt = prompts or (None, None)
    return Benchmark(name, [doc_id[t] for t in texts], texts, [QuerySet(name, query_ids, list(anchors), relevant)],
                     group=group, query_prompt=query_prompt, corpus_prompt=corpus_prompt)  # fmt: skip
