"""Training data against the benchmarks: which benchmark queries, judged (query, document) pairs and documents a
mixture trains on.

Why: a benchmark scores what a model does on text it was not trained on. Reading more splits of a source (squad_v2
validation, cnn_dailymail test, every split of the NASA SDE corpus, as the original did) or a corpus that a benchmark
was drawn from (the NASA SDE corpus and NASA SDE IR) can put a benchmark's queries into training, and nothing in a
results table would show it. Counted by exact text after case folding and whitespace normalisation, over the rows
a run trains on (each source's training split; its held-out validation rows are not trained on):
- queries: judged queries whose text is a training text (anchor, positive or negative);
- judged pairs: (query, relevant document) that is a training (anchor, positive) pair, in either order;
- documents: corpus documents that are training texts. A benchmark whose corpus is the collection a source was
  built from shares documents by design (BEIR's SciFact: the test claims' abstracts are the train claims' too);
  what must be zero are the queries and the judged pairs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from model_exploration.benchmarks import Benchmark


def normalize(text: str) -> str:
    return " ".join(str(text).casefold().split())


@dataclasses.dataclass
class Overlap:
    """One benchmark row (query set) against the training rows of each source: ids found, per source."""

    row: str
    queries: int
    judged_pairs: int
    documents: int
    queries_trained: dict[str, set[str]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    pairs_trained: dict[str, set[tuple[str, str]]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    documents_trained: dict[str, set[str]] = dataclasses.field(default_factory=lambda: defaultdict(set))

    @property
    def leaks(self) -> bool:
        """Whether a query or a judged pair of this row is trained on."""
        return any(self.queries_trained.values()) or any(self.pairs_trained.values())


def benchmark_overlap(sources, benchmarks: list[Benchmark], batch_size: int = 10_000) -> list[Overlap]:
    """One Overlap per query set of `benchmarks`, counted over the training split of every source (data.SourceData).
    Memory is the benchmarks' texts; the training rows are streamed."""
    report: dict[str, Overlap] = {}
    queries: dict[str, list[tuple[Overlap, str]]] = defaultdict(list)
    documents: dict[str, list[tuple[Overlap, str]]] = defaultdict(list)
    pairs: dict[tuple[str, str], list[tuple[Overlap, str, str]]] = defaultdict(list)
    for bench in benchmarks:
        doc_text = dict(zip(bench.corpus_ids, map(normalize, bench.corpus_texts)))
        for qs in bench.query_sets:
            judged = sum(len(docs) for docs in qs.relevant.values())
            entry = report[qs.name] = Overlap(qs.name, len(qs.query_ids), judged, len(bench.corpus_ids))
            for doc_id, text in doc_text.items():
                documents[text].append((entry, doc_id))
            for query_id, text in zip(qs.query_ids, map(normalize, qs.query_texts)):
                queries[text].append((entry, query_id))
                for doc_id in qs.relevant[query_id]:
                    if doc_id in doc_text:
                        pairs[(text, doc_text[doc_id])].append((entry, query_id, doc_id))
    for source in sources:
        name, train = source.spec.name, source.train
        for batch in train.iter(batch_size=batch_size):
            columns = [[normalize(t) for t in batch[c]] for c in train.column_names]
            for text in {t for column in columns for t in column}:
                for entry, query_id in queries.get(text, ()):
                    entry.queries_trained[name].add(query_id)
                for entry, doc_id in documents.get(text, ()):
                    entry.documents_trained[name].add(doc_id)
            for anchor, positive in zip(columns[0], columns[1]):
                for key in ((anchor, positive), (positive, anchor)):
                    for entry, query_id, doc_id in pairs.get(key, ()):
                        entry.pairs_trained[name].add((query_id, doc_id))
    return list(report.values())


def overlap_table(report: list[Overlap]) -> str:
    """Per benchmark row: its size and what of it is trained on (total, and the sources that hold it)."""

    def cell(found: dict[str, set], total: int) -> str:
        union = set().union(*found.values()) if found else set()
        holders = ", ".join(f"{name} {len(ids)}" for name, ids in sorted(found.items()) if ids)
        return f"{len(union)} of {total}" + (f" ({holders})" if holders else "")

    lines = [
        "| benchmark row | queries trained on | judged pairs trained on | documents trained on |",
        "|---|---|---|---|",
    ]
    for e in report:
        lines.append(f"| {e.row} | {cell(e.queries_trained, e.queries)} | {cell(e.pairs_trained, e.judged_pairs)} | "
                     f"{cell(e.documents_trained, e.documents)} |")  # fmt: skip
    return "\n".join(lines)
