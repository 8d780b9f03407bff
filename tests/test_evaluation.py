"""Retrieval metrics against trec_eval (pytrec_eval) and sentence-transformers, search, benchmarks, comparison CLI."""

import json
import logging
import random

import numpy as np
import pytest
import pytrec_eval
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import quantize_embeddings

from helpers import REPO_ROOT
from model_exploration import compare, evaluation, retrieval
from model_exploration.benchmarks import load_beir_folder, validation_benchmark
from model_exploration.errors import UserError

TREC_MEASURES = {"ndcg_cut.1,5,10", "recall.1,5,10", "map_cut.100", "recip_rank"}


@pytest.fixture(scope="module")
def model(tiny_model):
    return SentenceTransformer(str(tiny_model), device="cpu")


def trec_eval(ranked: list[list[str]], query_ids: list[str], qrels: dict[str, dict[str, int]]) -> dict[str, dict]:
    """pytrec_eval on our rankings (scores strictly decreasing with rank, so the order is ours, not its tie-break)."""
    run = {q: {d: 1.0 / (rank + 1) for rank, d in enumerate(hits)} for q, hits in zip(query_ids, ranked)}
    return pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in query_ids}, TREC_MEASURES).evaluate(run)


def assert_agrees_with_trec_eval(ranked, query_ids, qrels):
    ours = retrieval.ir_metrics(ranked, [qrels[q] for q in query_ids])
    theirs = trec_eval(ranked, query_ids, qrels)
    for k in (1, 5, 10):
        expected_ndcg = np.mean([theirs[q][f"ndcg_cut_{k}"] for q in query_ids])
        expected_recall = np.mean([theirs[q][f"recall_{k}"] for q in query_ids])
        assert ours[f"ndcg@{k}"] == pytest.approx(expected_ndcg, abs=1e-6), k
        assert ours[f"recall@{k}"] == pytest.approx(expected_recall, abs=1e-6), k
    # every query here has <= 100 relevant documents: our MAP@100 is trec_eval's map_cut_100
    assert ours["map@100"] == pytest.approx(np.mean([theirs[q]["map_cut_100"] for q in query_ids]), abs=1e-6)
    return ours


def test_graded_metrics_agree_with_trec_eval():
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(60)]
    qrels, ranked, query_ids = {}, [], []
    for q in range(40):
        judged = rng.sample(docs, rng.randint(1, 8))
        # grades 1..3 as in TREC-COVID / NFCorpus, and a judged document that is not in the corpus
        qrels[f"q{q}"] = {d: rng.randint(1, 3) for d in judged} | ({"missing-doc": 2} if q % 7 == 0 else {})
        ranked.append(rng.sample(docs, 30))
        query_ids.append(f"q{q}")
    ours = assert_agrees_with_trec_eval(ranked, query_ids, qrels)
    assert 0 < ours["ndcg@10"] < 1


def test_metrics_agree_with_trec_eval_on_the_bundled_scifact_test_split():
    """A deterministic lexical (TF-IDF) run over the whole bundled SciFact test split, real qrels."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    bench = load_beir_folder(REPO_ROOT / "data" / "scifact")
    qs = bench.query_sets[0]
    vectorizer = TfidfVectorizer().fit(bench.corpus_texts)
    scores = torch.from_numpy(
        (vectorizer.transform(qs.query_texts) @ vectorizer.transform(bench.corpus_texts).T).toarray()
    )
    positions = retrieval.chunked_search(scores, len(bench.corpus_ids), lambda q, c0, c1: q[:, c0:c1], 100)
    ranked = [[bench.corpus_ids[p] for p in row] for row in positions]
    ours = assert_agrees_with_trec_eval(ranked, qs.query_ids, qs.relevant)
    assert len(qs.query_ids) == 300 and ours["ndcg@10"] > 0.5  # TF-IDF on SciFact: a real retrieval run


def test_graded_ndcg_by_hand():
    # ranking: a (grade 2), x (not relevant), b (grade 1); ideal: a, b
    m = retrieval.ir_metrics([["a", "x", "b"]], [{"a": 2, "b": 1}])
    dcg = 2 / np.log2(2) + 1 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert m["ndcg@5"] == pytest.approx(dcg / idcg)
    assert m["ndcg@1"] == pytest.approx(1.0) and m["recall@1"] == pytest.approx(0.5)
    binary = retrieval.ir_metrics([["a", "x", "b"]], [{"a": 1, "b": 1}])  # 0/1 grades: sentence-transformers' NDCG
    assert binary["ndcg@5"] == pytest.approx((1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3)))


def test_metrics_agree_with_sentence_transformers_evaluator(model, small_beir):
    bench = load_beir_folder(small_beir)
    ours = evaluation.RetrievalEvaluator([bench], batch_size=32).compute_rows(model)[bench.name]
    qs = bench.query_sets[0]
    st = InformationRetrievalEvaluator(
        queries=dict(zip(qs.query_ids, qs.query_texts)),
        corpus=dict(zip(bench.corpus_ids, bench.corpus_texts)),
        relevant_docs={q: set(docs) for q, docs in qs.relevant.items()},
        mrr_at_k=[1, 5, 10], ndcg_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], map_at_k=[100],
        accuracy_at_k=[1], batch_size=32, name="st",
    )(model)  # fmt: skip
    for metric in ("mrr@1", "mrr@5", "mrr@10", "ndcg@1", "ndcg@5", "ndcg@10", "recall@1", "recall@5", "recall@10",
                   "map@100"):  # fmt: skip
        assert ours[metric] == pytest.approx(st[f"st_cosine_{metric}"], abs=1e-4), metric
    assert 0 < ours["ndcg@10"] < 1


def _beir(folder, docs, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs)
    )
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    )
    return folder


def test_queries_that_are_also_corpus_documents_score_as_beir_does(model, tmp_path):
    """ArguAna / Quora style: each query is in the corpus under its own id. BEIR and MTEB drop a document whose id
    is the query's (ignore_identical_ids); the identical text would otherwise always rank first."""
    texts = ["Vitamin D supplementation reduces fracture risk in older adults.",
             "Aspirin lowers the risk of a second heart attack.",
             "Statins reduce cholesterol in patients with diabetes."]  # fmt: skip
    docs = [(f"q{i}", t) for i, t in enumerate(texts)] + [
        (f"d{i}", t + " A randomized trial.") for i, t in enumerate(texts)
    ]
    bench = load_beir_folder(_beir(tmp_path / "argu", docs, [(f"q{i}", t) for i, t in enumerate(texts)],
                                   [(f"q{i}", f"d{i}", 1) for i in range(3)]))  # fmt: skip
    corpus = evaluation.encode(model, bench.corpus_texts, 8, False)

    def encode_queries(q):
        return evaluation.encode(model, q, 8, False)

    default = evaluation.evaluate_benchmark(bench, corpus, encode_queries)[bench.name]
    kept = evaluation.evaluate_benchmark(bench, corpus, encode_queries, ignore_identical_ids=False)[bench.name]
    assert kept["mrr@1"] == 0.0  # the query's own copy is always first
    qs = bench.query_sets[0]
    positions = retrieval.float_search(encode_queries(qs.query_texts), corpus, 101)
    ranked = retrieval.drop_identical_ids([[bench.corpus_ids[p] for p in row] for row in positions], qs.query_ids, 100)
    assert all(q not in hits for q, hits in zip(qs.query_ids, ranked))
    assert default == pytest.approx(
        retrieval.ir_metrics(ranked, [qs.relevant[q] for q in qs.query_ids]) | {"bytes_per_vector": 256}
    )
    assert default["mrr@10"] > kept["mrr@10"]


def test_ties_are_broken_by_corpus_id_and_chunking_does_not_matter():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    for chunk in (1, 2, 4, 100):
        top = retrieval.chunked_search(scores[:, :0], 6, lambda q, c0, c1: scores[:, c0:c1], 4, corpus_chunk_size=chunk)
        assert top.tolist() == [[1, 3, 0, 2]]


def test_binary_search_ranks_by_hamming_distance():
    rng = np.random.default_rng(0)
    corpus, queries = rng.normal(size=(300, 64)).astype(np.float32), rng.normal(size=(7, 64)).astype(np.float32)
    cp, qp = quantize_embeddings(corpus, "ubinary"), quantize_embeddings(queries, "ubinary")
    assert cp.shape == (300, 8) and cp.dtype == np.uint8
    distances = np.bitwise_count(qp[:, None, :] ^ cp[None, :, :]).sum(-1)  # popcount of XOR
    # Hamming distance = number of dimensions whose float signs disagree
    assert (distances == ((queries[:, None, :] > 0) != (corpus[None, :, :] > 0)).sum(-1)).all()
    top = retrieval.binary_search(qp, cp, 20)
    for q in range(7):
        assert top[q].tolist() == sorted(range(300), key=lambda d: (distances[q, d], d))[:20]


def test_asymmetric_search_equals_brute_force_float_query_against_document_bits():
    from sentence_transformers.util import quantize_embeddings

    from model_exploration.retrieval import asymmetric_search

    generator = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(7, 24, generator=generator), torch.randn(300, 24, generator=generator)
    packed = quantize_embeddings(corpus.numpy(), "ubinary")
    assert packed.shape == (300, 3)  # the index stays 1 bit per dimension
    brute = queries @ torch.where(corpus > 0, 1.0, -1.0).T
    expected = torch.sort(brute, dim=1, descending=True, stable=True).indices[:, :10].numpy()
    assert np.array_equal(asymmetric_search(queries, packed, 10), expected)
    assert np.array_equal(asymmetric_search(3 * queries, packed, 10), expected)  # the query norm does not rank


def test_qrels_grades_unknown_documents_and_missing_files(tmp_path, small_beir, caplog):
    with pytest.raises(UserError, match="qrels file"):
        broken = tmp_path / "noqrels"
        broken.mkdir()
        (broken / "corpus.jsonl").write_text('{"_id": "1", "text": "x"}\n')
        (broken / "queries.jsonl").write_text('{"_id": "q", "text": "y"}\n')
        load_beir_folder(broken)
    folder = _beir(tmp_path / "graded", [("a", "alpha"), ("b", "beta")], [("q", "alpha?")],
                   [("q", "a", 2), ("q", "b", 1), ("q", "zzz", 1), ("q", "b2", 0)])  # fmt: skip
    bench = load_beir_folder(folder)
    # grades kept, grade 0 is not relevant, a judged document missing from the corpus stays judged (trec_eval)
    assert bench.query_sets[0].relevant == {"q": {"a": 2, "b": 1, "zzz": 1}}
    assert "1 document(s) not in the corpus" in caplog.text


def test_validation_benchmark_counts_identical_positives_as_relevant():
    bench = validation_benchmark("val", ["q1", "q2", "q3"], ["same", "same", "other"])
    assert len(bench.corpus_texts) == 2
    rel = bench.query_sets[0].relevant
    assert rel["q00000000"] == rel["q00000001"] != rel["q00000002"]


def test_primary_metric_is_the_first_benchmarks_headline_row(model, small_beir, tmp_path):
    first = load_beir_folder(small_beir)
    second = validation_benchmark("val/x", ["a question"], ["an answer"])
    for order in ([first, second], [second, first]):
        evaluator = evaluation.RetrievalEvaluator(order, name="b")
        metrics = evaluator(model)
        assert metrics["b_ndcg@10"] == evaluator.last_rows[order[0].headline]["ndcg@10"]


def _compare(tiny_model, small_beir, out, *extra):
    return compare.main(["--models", str(tiny_model), "--benchmarks", f"beir:{small_beir}", "--output_dir", str(out),
                         "--precision", "ubinary", "--rescore_multiplier", "4", *extra])  # fmt: skip


def test_comparison_cli_writes_tables_charts_binary_rows_and_skips_done_pairs(tiny_model, small_beir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "cmp"
    assert _compare(tiny_model, small_beir, out) == 0
    results = json.loads((out / "results.json").read_text())
    row = results[str(tiny_model)]["beir:scifact_small"]
    assert "ndcg@10" in row and row["bytes_per_vector"] == 256
    assert row["ubinary"]["bytes_per_vector"] == 8
    assert row["ubinary"]["retention_ndcg@10"] == pytest.approx(row["ubinary"]["ndcg@10"] / row["ndcg@10"])
    assert "ubinary_rescore" in row
    for name in ("results.csv", "results.md", "chart_beir_scifact_small.png"):
        assert (out / name).stat().st_size > 0
    assert "| MRR@1 | MRR@5 | NDCG@1 | NDCG@5 |" in (out / "results.md").read_text()
    assert list((out / "embeddings").rglob("*.npy"))
    caplog.clear()
    assert _compare(tiny_model, small_beir, out) == 0
    assert "already in" in caplog.text and json.loads((out / "results.json").read_text()) == results

    # a run killed while the files were written (before they were atomic): rebuilt with a warning, same numbers
    (out / "evaluated.json").write_text('{"trunc')
    next((out / "embeddings").rglob("*.npy")).write_bytes(b"\x93NUMPY")
    caplog.clear()
    assert _compare(tiny_model, small_beir, out) == 0
    assert "unreadable" in caplog.text
    assert json.loads((out / "results.json").read_text()) == results


def test_comparison_cli_bad_benchmark_is_one_line(tiny_model, tmp_path, capsys):
    code = compare.main(["--models", str(tiny_model), "--benchmarks", f"beir:{tmp_path / 'missing'}",
                         "--output_dir", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: beir:missing: BEIR folder not found")
    assert "Traceback" not in err


def test_every_evaluation_runs_under_the_training_autocast(model, small_beir, monkeypatch):
    """Where the GPU computes bf16 natively, the starting model's rows, the in-training evaluator and compare.py's
    encoder all run under the trainer's bf16 autocast (over fp32 weights), so their scores come from the same
    arithmetic. Forced here on the CPU, whose bf16 autocast is real."""
    from model_exploration import models
    from model_exploration.encoding import encode_fast

    monkeypatch.setattr(models, "bf16_native", lambda dev=None: True)
    seen = []
    handle = model[0].register_forward_hook(lambda m, args, out: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        evaluator = evaluation.RetrievalEvaluator([load_beir_folder(small_beir)], name="benchmarks")
        evaluation.benchmark_rows(model, evaluator)  # the starting model's rows, before any trainer exists
        evaluator(model)  # the trainer's eval steps call this
        encode_fast(model, ["a claim about cells", "an abstract"])  # compare.py
    finally:
        handle.remove()
    assert seen and all(seen)
    assert next(model.parameters()).dtype == torch.float32  # autocast over fp32 weights, as in training


def test_benchmark_length_is_capped_at_the_positions_the_model_has(tmp_path, caplog):
    """A RoBERTa position past its table fails on CPU (an index out of bounds) and is a sticky device-side assert on
    CUDA: the evaluation length is capped like the training length, with the same one-line warning."""
    from helpers import build_tiny_model
    from model_exploration.models import capped_len

    model = SentenceTransformer(str(build_tiny_model(tmp_path, arch="roberta", positions=34)), device="cpu")
    texts = ["word " * 100, "short"]
    with pytest.raises((IndexError, RuntimeError), match="out of"):
        evaluation.encode(model, texts, 8, False, 64)
    assert capped_len(model, 64, "--eval_max_len") == 32
    assert "--eval_max_len 64 exceeds the 32 tokens this model can embed" in caplog.text
    assert evaluation.encode(model, texts, 8, False, 32).shape == (2, 64)
