import json
import subprocess

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    InformationRetrievalEvaluator,
)
from sentence_transformers.util import quantize_embeddings

from helpers import PYTHON, REPO, subprocess_env
from model_exploration import evaluation
from model_exploration.errors import UserError


@pytest.fixture(scope="module")
def model(tiny_model):
    return SentenceTransformer(str(tiny_model), device="cpu")


def test_metrics_agree_with_sentence_transformers_evaluator(model, small_beir):
    bench = evaluation.load_beir_folder(small_beir)
    ours = evaluation.RetrievalEvaluator([bench], batch_size=32).compute_rows(model)[bench.name]
    qs = bench.query_sets[0]
    st = InformationRetrievalEvaluator(
        queries=dict(zip(qs.query_ids, qs.query_texts)),
        corpus=dict(zip(bench.corpus_ids, bench.corpus_texts)),
        relevant_docs=qs.relevant,
        mrr_at_k=[1, 5, 10], ndcg_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], map_at_k=[100],
        accuracy_at_k=[1], batch_size=32, name="st",
    )(model)  # fmt: skip
    for metric in (
        "mrr@1",
        "mrr@5",
        "mrr@10",
        "ndcg@1",
        "ndcg@5",
        "ndcg@10",
        "recall@1",
        "recall@5",
        "recall@10",
        "map@100",
    ):
        assert ours[metric] == pytest.approx(st[f"st_cosine_{metric}"], abs=1e-4), metric
    assert 0 < ours["ndcg@10"] < 1


def test_ties_are_broken_by_corpus_id_and_chunking_does_not_matter():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    for chunk in (1, 2, 4, 100):
        top = evaluation.chunked_search(
            scores[:, :0], 6, lambda q, c0, c1: scores[:, c0:c1], 4, corpus_chunk_size=chunk
        )
        assert top.tolist() == [[1, 3, 0, 2]]


def test_metric_definitions_on_a_hand_computed_case():
    ranked = [["a", "x", "b"], ["y", "z", "c"]]
    relevant = [{"a", "b"}, {"c", "w"}]
    m = evaluation.ir_metrics(ranked, relevant)
    assert m["mrr@1"] == pytest.approx(0.5)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3) / 2)
    idcg2 = 1 + 1 / np.log2(3)
    assert m["ndcg@5"] == pytest.approx(((1 + 1 / 2) / idcg2 + (1 / 2) / idcg2) / 2)
    assert m["recall@5"] == pytest.approx((1 + 0.5) / 2)
    assert m["map@100"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 3) / 2) / 2)


def test_binary_search_ranks_by_hamming_distance():
    rng = np.random.default_rng(0)
    corpus, queries = rng.normal(size=(300, 64)).astype(np.float32), rng.normal(size=(7, 64)).astype(np.float32)
    cp, qp = quantize_embeddings(corpus, "ubinary"), quantize_embeddings(queries, "ubinary")
    assert cp.shape == (300, 8) and cp.dtype == np.uint8
    distances = evaluation.hamming_distance(qp, cp)
    # Hamming distance = number of dimensions whose float signs disagree
    assert (distances == ((queries[:, None, :] > 0) != (corpus[None, :, :] > 0)).sum(-1)).all()
    top = evaluation.binary_search(qp, cp, 20)
    for q in range(7):
        expected = sorted(range(300), key=lambda d: (distances[q, d], d))[:20]
        assert top[q].tolist() == expected


def test_beir_folder_errors_and_unknown_documents(tmp_path, small_beir, caplog):
    with pytest.raises(UserError, match="qrels file"):
        broken = tmp_path / "noqrels"
        broken.mkdir()
        (broken / "corpus.jsonl").write_text('{"_id": "1", "text": "x"}\n')
        (broken / "queries.jsonl").write_text('{"_id": "q", "text": "y"}\n')
        evaluation.load_beir_folder(broken)
    qrels = (small_beir / "qrels" / "test.tsv").read_text() + "1\tno-such-doc\t1\n"
    copy = tmp_path / "copy"
    (copy / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        (copy / name).write_text((small_beir / name).read_text())
    (copy / "qrels" / "test.tsv").write_text(qrels)
    bench = evaluation.load_beir_folder(copy)
    assert "1 unknown document(s)" in caplog.text
    assert all("no-such-doc" not in docs for docs in bench.query_sets[0].relevant.values())


def test_validation_benchmark_counts_identical_positives_as_relevant():
    bench = evaluation.validation_benchmark("val", ["q1", "q2", "q3"], ["same", "same", "other"])
    assert len(bench.corpus_texts) == 2
    rel = bench.query_sets[0].relevant
    assert rel["q00000000"] == rel["q00000001"] != rel["q00000002"]


def test_comparison_cli_writes_tables_charts_binary_rows_and_skips_done_pairs(tiny_model, small_beir, tmp_path):
    out = tmp_path / "cmp"
    cmd = [PYTHON, str(REPO / "model_exploration" / "compare.py"), "--models", str(tiny_model),
           "--benchmarks", f"beir:{small_beir}", "--output_dir", str(out), "--precision", "ubinary",
           "--rescore_multiplier", "4"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
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
    second = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert second.returncode == 0 and "already in" in second.stderr
    assert json.loads((out / "results.json").read_text()) == results


def test_comparison_cli_bad_benchmark_is_one_line(tiny_model, tmp_path):
    out = subprocess.run(
        [PYTHON, str(REPO / "model_exploration" / "compare.py"), "--models", str(tiny_model),
         "--benchmarks", f"beir:{tmp_path / 'missing'}", "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: beir:missing: BEIR folder not found")
    assert "Traceback" not in out.stderr
