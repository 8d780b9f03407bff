"""Retrieval evaluation: benchmarks, exact IR metrics, float and 1-bit (ubinary) search, result tables.

Why not only sentence-transformers' InformationRetrievalEvaluator: it scores one (queries, corpus, qrels) triple
per call and re-encodes the corpus each time; the NASA SDE benchmark has two qrels files over one corpus, the
comparison CLI caches corpus embeddings per model, and binary retrieval (Hamming search + rescoring) is not in it.
The metric definitions are the same (binary relevance, score > 0 relevant, ties broken by corpus id), and a test
checks agreement with it to 1e-4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
from sentence_transformers.util import quantize_embeddings

from model_exploration.data import read_jsonl
from model_exploration.errors import UserError

logger = logging.getLogger(__name__)

CUTOFFS = (1, 5, 10)
MAP_CUTOFF = 100
TABLE_COLUMNS = ("mrr@1", "mrr@5", "ndcg@1", "ndcg@5", "ndcg@10", "mrr@10")
NANOBEIR_DATASETS = (
    "NanoClimateFEVER", "NanoDBPedia", "NanoFEVER", "NanoFiQA2018", "NanoHotpotQA", "NanoMSMARCO", "NanoNFCorpus",
    "NanoNQ", "NanoQuoraRetrieval", "NanoSCIDOCS", "NanoArguAna", "NanoSciFact", "NanoTouche2020",
)  # fmt: skip
NASA_SMD_REPO = "nasa-impact/nasa-smd-IR-benchmark"
NASA_SDE_REPO = "nasa-impact/nasa-sde-IR-benchmark-20251024-v5"
NASA_SDE_QRELS = ("qa_pairs", "search_pairs")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class QuerySet:
    """Queries and their relevant documents (ids into the corpus); `name` becomes a results row."""

    name: str
    query_ids: list[str]
    query_texts: list[str]
    relevant: dict[str, set[str]]


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

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc_id, text in zip(self.corpus_ids, self.corpus_texts):
            h.update(doc_id.encode() + b"\0" + text.encode() + b"\1")
        return h.hexdigest()[:16]


def _find(folder: Path, stem: str) -> Path | None:
    return next(
        (folder / f"{stem}{ext}" for ext in (".jsonl", ".jsonl.gz") if (folder / f"{stem}{ext}").exists()), None
    )


def read_qrels(path: Path) -> dict[str, set[str]]:
    """BEIR qrels TSV (`query-id corpus-id score`, header optional); score > 0 is relevant."""
    relevant: dict[str, set[str]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (lineno == 1 and parts[0] == "query-id"):
                continue
            if len(parts) < 3:
                raise UserError(f"{path}:{lineno}: expected `query-id<TAB>corpus-id<TAB>score`")
            try:
                score = float(parts[2])
            except ValueError:
                raise UserError(f"{path}:{lineno}: score {parts[2]!r} is not a number") from None
            if score > 0:
                relevant.setdefault(parts[0], set()).add(parts[1])
    return relevant


def build_query_set(
    name: str, queries: dict[str, str], relevant: dict[str, set[str]], corpus_ids: set[str]
) -> QuerySet:
    """Keep judged queries with text and with at least one relevant document in the corpus; report what is not."""
    unknown_docs = sum(len(docs - corpus_ids) for docs in relevant.values())
    missing_queries = [q for q in relevant if q not in queries]
    kept = {q: docs & corpus_ids for q, docs in relevant.items() if q in queries and docs & corpus_ids}
    if unknown_docs or missing_queries:
        logger.warning(
            "%s: qrels name %d unknown document(s) and %d unknown query id(s); ignored (%d judged queries kept)",
            name, unknown_docs, len(missing_queries), len(kept),
        )  # fmt: skip
    if not kept:
        raise UserError(f"{name}: no judged query has a relevant document in the corpus; check the qrels ids")
    ids = sorted(kept)
    return QuerySet(name, ids, [queries[q] for q in ids], kept)


def load_beir_folder(
    folder: str | Path,
    name: str | None = None,
    qrels_files: Sequence[str] = ("test",),
    mean_name: str | None = None,
) -> Benchmark:
    """A local BEIR folder: corpus.jsonl[.gz] (`_id`, optional `title`, `text`), queries.jsonl[.gz], qrels/<f>.tsv.

    Document text is (title + " " + text).strip(), the protocol behind published BEIR/MTEB scores."""
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
        (
            (str(d["_id"]), (str(d.get("title") or "") + " " + str(d.get("text") or "")).strip())
            for d in read_jsonl(corpus_path, name)
        ),
    )  # sorted by id: position order == id order, which is the tie-break order
    corpus_ids = [d[0] for d in docs]
    id_set = set(corpus_ids)
    queries = {str(q["_id"]): str(q["text"]) for q in read_jsonl(queries_path, name)}
    query_sets = [
        build_query_set(name if len(qrels_paths) == 1 else f"{name}/{p.stem}", queries, read_qrels(p), id_set)
        for p in qrels_paths
    ]
    return Benchmark(name, corpus_ids, [d[1] for d in docs], query_sets, mean_name=mean_name)


def _hub_snapshot(repo_id: str, benchmark: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", token=os.environ.get("HUGGINGFACE_TOKEN")))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable line
        raise UserError(
            f"benchmark {benchmark}: cannot download {repo_id} ({type(exc).__name__}); check the network / "
            "HF token, or pass a local copy as beir:PATH"
        ) from None


def _load_nanobeir_dataset(dataset: str) -> Benchmark:
    from datasets import load_dataset

    repo = f"zeta-alpha-ai/{dataset}"
    try:
        corpus = load_dataset(repo, "corpus", split="train")
        queries = load_dataset(repo, "queries", split="train")
        qrels = load_dataset(repo, "qrels", split="train")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"benchmark nanobeir: cannot load {repo} ({type(exc).__name__}); check the network") from None
    docs = sorted((str(d["_id"]), str(d["text"]).strip()) for d in corpus)
    relevant: dict[str, set[str]] = {}
    for row in qrels:
        relevant.setdefault(str(row["query-id"]), set()).add(str(row["corpus-id"]))
    corpus_ids = [d[0] for d in docs]
    qs = build_query_set(f"nanobeir/{dataset}", {str(q["_id"]): q["text"] for q in queries}, relevant, set(corpus_ids))
    return Benchmark(f"nanobeir/{dataset}", corpus_ids, [d[1] for d in docs], [qs], group="nanobeir")


def canonical_spec(spec: str) -> str:
    """One spelling per benchmark: `beir:` paths made absolute (bundled data may be named relative to the repo,
    from any working directory)."""
    if not spec.startswith("beir:"):
        return spec
    path = Path(spec[len("beir:") :]).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    return f"beir:{path.resolve()}"


def load_benchmarks(spec: str) -> list[Benchmark]:
    """Benchmarks for one --benchmarks entry: nanobeir, nasa_smd, nasa_sde or beir:PATH."""
    if spec == "nanobeir":
        return [_load_nanobeir_dataset(d) for d in NANOBEIR_DATASETS]
    if spec == "nasa_smd":
        return [load_beir_folder(_hub_snapshot(NASA_SMD_REPO, spec), name="nasa_smd")]
    if spec == "nasa_sde":
        folder = _hub_snapshot(NASA_SDE_REPO, spec)
        return [load_beir_folder(folder, name="nasa_sde", qrels_files=NASA_SDE_QRELS, mean_name="nasa_sde")]
    if spec.startswith("beir:"):
        path = Path(canonical_spec(spec)[len("beir:") :])
        return [load_beir_folder(path, name=f"beir:{path.name}")]
    raise UserError(f"--benchmarks: unknown benchmark {spec!r}; use nanobeir, nasa_smd, nasa_sde or beir:PATH")


def validation_benchmark(
    name: str, anchors: list[str], positives: list[str], negatives: list[str] | None = None, group: str | None = None
) -> Benchmark:
    """In-training validation of one source: anchors are queries, the corpus holds every distinct positive (and
    negative) text, and a query's relevant documents are all those with its positive's exact text."""
    texts = sorted(set(positives) | set(negatives or []))
    doc_id = {t: f"d{i:08d}" for i, t in enumerate(texts)}
    query_ids = [f"q{i:08d}" for i in range(len(anchors))]
    relevant = {q: {doc_id[p]} for q, p in zip(query_ids, positives)}
    return Benchmark(
        name, [doc_id[t] for t in texts], texts, [QuerySet(name, query_ids, list(anchors), relevant)], group=group
    )


# ---------------------------------------------------------------- search


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row with ties broken by lower column index (deterministic, unlike torch.topk)."""
    values, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], idx[:, :k]


def chunked_search(
    query_emb: torch.Tensor,
    corpus_size: int,
    score_chunk: Callable[[torch.Tensor, int, int], torch.Tensor],
    k: int,
    corpus_chunk_size: int = 16384,
    query_chunk_size: int = 256,
) -> np.ndarray:
    """Positions of the top-k corpus entries per query; memory is bounded by the chunk sizes, not the corpus."""
    k = min(k, corpus_size)
    results = []
    for q0 in range(0, len(query_emb), query_chunk_size):
        q = query_emb[q0 : q0 + query_chunk_size]
        best_scores = best_idx = None
        for c0 in range(0, corpus_size, corpus_chunk_size):
            c1 = min(corpus_size, c0 + corpus_chunk_size)
            scores, idx = _topk_stable(score_chunk(q, c0, c1), k)
            idx = idx + c0
            if best_scores is None:
                best_scores, best_idx = scores, idx
            else:  # earlier chunks hold lower positions, so a stable merge keeps the position tie-break
                merged_scores = torch.cat([best_scores, scores], dim=1)
                merged_idx = torch.cat([best_idx, idx], dim=1)
                best_scores, order = _topk_stable(merged_scores, k)
                best_idx = merged_idx.gather(1, order)
        results.append(best_idx.numpy())
    return np.concatenate(results)


def float_search(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int) -> np.ndarray:
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(corpus_emb.float(), dim=-1)
    return chunked_search(q, len(c), lambda qq, c0, c1: qq @ c[c0:c1].T, k)


def unpack_signs(packed: np.ndarray) -> torch.Tensor:
    """uint8 bit-packed embeddings -> float +1/-1 vectors."""
    return torch.from_numpy(np.unpackbits(packed, axis=-1).astype(np.float32) * 2 - 1)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two sets of packed bit vectors (popcount of XOR)."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(-1)


def binary_search(query_packed: np.ndarray, corpus_packed: np.ndarray, k: int) -> np.ndarray:
    """Hamming search over ubinary codes. For +/-1 vectors, dot = D - 2 * hamming, so ranking by the (exact,
    integer-valued) float dot product equals ranking by Hamming distance, and runs on BLAS in chunks."""
    q = unpack_signs(query_packed)
    return chunked_search(q, len(corpus_packed), lambda qq, c0, c1: qq @ unpack_signs(corpus_packed[c0:c1]).T, k)


def rescore(query_emb: torch.Tensor, corpus_packed: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Re-rank Hamming candidates by float query . sign(document), as sentence-transformers' quantized search does."""
    out = []
    for query, cand in zip(query_emb.float(), candidates, strict=True):
        scores = unpack_signs(corpus_packed[cand]) @ query
        # a stable sort keeps equal scores in their Hamming order, so ties stay deterministic
        out.append(cand[torch.sort(scores, descending=True, stable=True).indices[:k].numpy()])
    return np.stack(out)


# ---------------------------------------------------------------- metrics


def ir_metrics(ranked_ids: Sequence[Sequence[str]], relevant: Sequence[set[str]]) -> dict[str, float]:
    """MRR@k, NDCG@k, Recall@k for k in CUTOFFS and MAP@100, averaged over queries; binary relevance.
    Definitions match sentence-transformers' InformationRetrievalEvaluator."""
    sums = {f"{m}@{k}": 0.0 for m in ("mrr", "ndcg", "recall") for k in CUTOFFS}
    sums[f"map@{MAP_CUTOFF}"] = 0.0
    for hits, rel in zip(ranked_ids, relevant):
        flags = [doc in rel for doc in hits]
        for k in CUTOFFS:
            top = flags[:k]
            first = next((i for i, f in enumerate(top) if f), None)
            sums[f"mrr@{k}"] += 0.0 if first is None else 1.0 / (first + 1)
            dcg = sum(1.0 / math.log2(i + 2) for i, f in enumerate(top) if f)
            idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"recall@{k}"] += sum(top) / len(rel)
        correct, precision_sum = 0, 0.0
        for i, f in enumerate(flags[:MAP_CUTOFF]):
            if f:
                correct += 1
                precision_sum += correct / (i + 1)
        sums[f"map@{MAP_CUTOFF}"] += precision_sum / min(MAP_CUTOFF, len(rel))
    n = max(1, len(relevant))
    return {key: value / n for key, value in sums.items()}


# ---------------------------------------------------------------- evaluating a model


def encode(
    model, texts: list[str], batch_size: int, show_progress_bar: bool, max_seq_length: int | None = None
) -> torch.Tensor:
    """Float embeddings through SentenceTransformer.encode (length-sorted batches; under the trainer it shares the
    work across DDP ranks via sentence-transformers' distributed inference). `max_seq_length` applies to this
    call only, so a model trained on shorter texts is still evaluated under the benchmark's protocol."""
    previous = model.max_seq_length
    if max_seq_length:
        model.max_seq_length = max_seq_length
    try:
        emb = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress_bar)
    finally:
        model.max_seq_length = previous
    return emb.float().cpu()


def _score(benchmark: Benchmark, positions: np.ndarray, relevant: list[set[str]]) -> dict[str, float]:
    return ir_metrics([[benchmark.corpus_ids[p] for p in row] for row in positions], relevant)


def evaluate_benchmark(
    benchmark: Benchmark,
    corpus_emb: torch.Tensor,
    encode_queries: Callable[[list[str]], torch.Tensor],
    precisions: Sequence[str] = ("float32",),
    rescore_multiplier: int = 0,
) -> dict[str, dict]:
    """Metrics per query set (and their mean), for float and, if asked, ubinary search.

    Returns {row name: {metric: value, "ubinary": {...}, "ubinary_rescore": {...}}}; binary sections carry
    bytes_per_vector and retention_<metric> (binary / float)."""
    k = max(MAP_CUTOFF, max(CUTOFFS))
    corpus_packed = quantize_embeddings(corpus_emb.numpy(), "ubinary") if "ubinary" in precisions else None
    rows: dict[str, dict] = {}
    for qs in benchmark.query_sets:
        query_emb = encode_queries(qs.query_texts)
        relevant = [qs.relevant[q] for q in qs.query_ids]
        row = _score(benchmark, float_search(query_emb, corpus_emb, k), relevant)
        row["bytes_per_vector"] = int(corpus_emb.shape[1] * 4)
        if corpus_packed is not None:
            query_packed = quantize_embeddings(query_emb.numpy(), "ubinary")
            variants = {"ubinary": binary_search(query_packed, corpus_packed, k)}
            if rescore_multiplier > 0:
                candidates = binary_search(query_packed, corpus_packed, k * rescore_multiplier)
                variants["ubinary_rescore"] = rescore(query_emb, corpus_packed, candidates, k)
            for variant, positions in variants.items():
                metrics = _score(benchmark, positions, relevant)
                metrics["bytes_per_vector"] = int(corpus_packed.shape[1])
                metrics.update({f"retention_{m}": metrics[m] / row[m] if row[m] else 0.0 for m in TABLE_COLUMNS})
                row[variant] = metrics
        rows[qs.name] = row
    if benchmark.mean_name and len(rows) > 1:
        rows[benchmark.mean_name] = mean_rows(list(rows.values()))
    return rows


def add_group_means(rows: dict[str, dict], benchmarks: list[Benchmark]) -> dict[str, dict]:
    """Append a mean row per benchmark group (over each member's rows) to `rows`."""
    groups: dict[str, list[str]] = {}
    for b in benchmarks:
        if b.group:
            groups.setdefault(b.group, []).extend(b.mean_name and [b.mean_name] or [q.name for q in b.query_sets])
    for group, names in groups.items():
        if len(names) > 1:
            rows[group] = mean_rows([rows[n] for n in names])
    return rows


def mean_rows(rows: list[dict]) -> dict:
    """Unweighted mean of metric rows (nested binary sections included)."""
    out: dict = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = mean_rows([r[key] for r in rows if key in r])
        else:
            out[key] = float(np.mean([r[key] for r in rows]))
    return out


class RetrievalEvaluator(BaseEvaluator):
    """A sentence-transformers evaluator over our benchmarks, for the trainer's eval steps and end of run."""

    def __init__(
        self,
        benchmarks: list[Benchmark],
        name: str = "ir",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        show_progress_bar: bool = False,
        precisions: tuple[str, ...] = ("float32",),
    ):
        super().__init__()
        self.show_progress_bar = show_progress_bar
        self.precisions = precisions
        self.benchmarks = benchmarks
        self.name = name
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.primary_metric = "ndcg@10"
        self.last_rows: dict[str, dict] = {}
        self.last_step: int | None = None

    def compute_rows(self, model) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for benchmark in self.benchmarks:

            def encode_texts(texts: list[str]) -> torch.Tensor:
                return encode(model, texts, self.batch_size, self.show_progress_bar, self.max_seq_length)

            rows.update(
                evaluate_benchmark(benchmark, encode_texts(benchmark.corpus_texts), encode_texts, self.precisions)
            )
        return add_group_means(rows, self.benchmarks)

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        self.last_rows = self.compute_rows(model)
        self.last_step = steps
        metrics = {}
        for row, values in self.last_rows.items():
            for metric, value in values.items():
                if isinstance(value, dict):  # binary sections: row/ubinary/metric
                    metrics.update({f"{row}/{metric}/{m}": v for m, v in value.items() if m != "bytes_per_vector"})
                elif metric != "bytes_per_vector":
                    metrics[f"{row}/{metric}"] = value
        # primary: the last row, i.e. the group mean when there is one
        metrics["ndcg@10"] = self.last_rows[next(reversed(self.last_rows))]["ndcg@10"]
        return self.prefix_name_to_metrics(metrics, self.name)


# ---------------------------------------------------------------- results files


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """results[model][row] -> one table per benchmark row, in the original's format (MRR@1/5, NDCG@1/5) plus
    NDCG@10, MRR@10, bytes per vector and, for binary rows, NDCG@10 retention (binary / float)."""
    benchmarks: list[str] = []
    for per_model in results.values():
        benchmarks += [b for b in per_model if b not in benchmarks]
    lines = []
    for bench in benchmarks:
        lines += [f"### {bench}", "", "| Model | MRR@1 | MRR@5 | NDCG@1 | NDCG@5 | NDCG@10 | MRR@10 | bytes/vector | NDCG@10 retention |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for model, per_model in results.items():
            row = per_model.get(bench)
            if row is None:
                continue
            variants = [(model, row, "")] + [
                (f"{model} ({v})", row[v], f"{row[v]['retention_ndcg@10']:.3f}")
                for v in ("ubinary", "ubinary_rescore")
                if v in row
            ]
            for label, values, retention in variants:
                cells = " | ".join(f"{values[c]:.4f}" for c in TABLE_COLUMNS)
                lines.append(f"| {label} | {cells} | {values['bytes_per_vector']} | {retention} |")
        lines.append("")
    return "\n".join(lines)


def flatten(results: dict[str, dict[str, dict]]) -> list[dict]:
    """One CSV row per (model, benchmark row, precision)."""
    records = []
    for model, per_model in results.items():
        for bench, row in per_model.items():
            for precision, values in [("float32", row)] + [
                (v, row[v]) for v in ("ubinary", "ubinary_rescore") if v in row
            ]:
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
    import csv
    import io

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
        tmp = output_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, output_dir / name)
    if charts:
        write_charts(results, output_dir)


def write_charts(results: dict[str, dict[str, dict]], output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(b for per_model in results.values() for b in per_model))
    for bench in benchmarks:
        labels, values = [], []
        for model, per_model in results.items():
            if bench not in per_model:
                continue
            row = per_model[bench]
            for label, v in [(model, row)] + [
                (f"{model} ({p})", row[p]) for p in ("ubinary", "ubinary_rescore") if p in row
            ]:
                labels.append("/".join(Path(label).parts[-2:]) if os.sep in label else label)  # run/final, org/model
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
        slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in bench)
        fig.savefig(output_dir / f"chart_{slug}.png", dpi=100)
        plt.close(fig)
