"""Quality features: hard-negative mining (data_prep/mine_hard_negatives.py), Matryoshka training and evaluation at
several dimensions from one encoding, the NDCG-vs-bytes chart."""

import importlib.util
import json
import random
import re

import pytest
import torch
from sentence_transformers import SentenceTransformer

from helpers import REPO_ROOT
from model_exploration import compare, evaluation, st_trainer_ddp_hf, unpadded
from model_exploration.benchmarks import load_beir_folder
from model_exploration.data import load_and_cache_datasets
from model_exploration.sources import build_dataset_configs_file, build_dataset_configs_sample


def _miner():
    spec = importlib.util.spec_from_file_location("mine", REPO_ROOT / "data_prep" / "mine_hard_negatives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mined(tiny_model, tmp_path_factory):
    """The sample stage's pairs (first 120 rows of each source) mined twice with the same seed by the tiny model.
    Its random weights score every passage alike, so the guard is tightened to a margin of 0.002 to keep some."""
    runs = tmp_path_factory.mktemp("mined")
    outs = []
    for attempt in ("a", "b"):
        argv = ["--stage", "sample", "--model_name", str(tiny_model), "--nrows", "120", "--relative_margin", "0.002",
                "--output_base", str(runs / "runs"), "--out", str(runs / attempt)]  # fmt: skip
        assert _miner().main(argv) == 0
        outs.append(runs / attempt)
    return outs, runs / "runs" / "cache"


def test_mining_is_seeded_and_never_mines_a_positive_or_a_validation_row(mined, tiny_model):
    (first, second), cache = mined
    files = sorted(first.glob("*_mined.jsonl"))
    assert len(files) == 3
    for file in files:
        assert file.read_text() == (second / file.name).read_text()  # same seed, same negatives
    specs = build_dataset_configs_sample()
    sources = {s.spec.name: s for s in load_and_cache_datasets(specs, cache, nrows=120, seed=42, max_eval=20)}
    for name, source in sources.items():
        rows = [json.loads(line) for line in (first / f"{name}_mined.jsonl").open()]
        positives: dict[str, set] = {}
        for anchor, positive in zip(source.train["anchor"], source.train["positive"]):
            positives.setdefault(anchor, set()).add(positive)
        train_pairs = set(zip(source.train["anchor"], source.train["positive"]))
        assert rows and all(r["negative"] not in positives[r["anchor"]] for r in rows), name
        # mined from the training split only: its pairs, negatives among its passages (never a validation row)
        assert {(r["anchor"], r["positive"]) for r in rows} <= train_pairs, name
        assert {r["negative"] for r in rows} <= set(source.train["positive"]), name


def test_mined_negatives_pass_the_false_negative_guard(mined, tiny_model):
    (first, _), _ = mined
    model = SentenceTransformer(str(tiny_model), device="cpu")
    rows = [json.loads(line) for line in (first / "scifact_train_mined.jsonl").open()][:40]

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(
            model.encode(a, convert_to_tensor=True), model.encode(b, convert_to_tensor=True)
        )

    anchors = [r["anchor"] for r in rows]
    positive, negative = cosine(anchors, [r["positive"] for r in rows]), cosine(anchors, [r["negative"] for r in rows])
    assert (negative <= positive - 0.002 * positive.abs() + 1e-5).all()  # at least 0.2% below the positive


def test_the_mined_mixture_reads_as_triplets_and_says_how_it_was_mined(mined, capsys):
    (first, _), cache = mined
    specs = build_dataset_configs_file(first / "mixture.yaml")
    assert all(s.negatives == ("negative",) and s.mined and "scifact_train" in specs[0].mined for s in specs)
    sources = load_and_cache_datasets(specs, cache, seed=42, max_eval=0)
    assert all(s.train.column_names == ["anchor", "positive", "negative"] for s in sources)
    assert st_trainer_ddp_hf.main(["--mixture", str(first / "mixture.yaml"), "--dry_run"]) == 0
    assert "[mined: 1 hard negative(s) per pair of scifact_train by" in capsys.readouterr().out


def test_truncated_dimensions_score_as_truncated_embeddings(tiny_model, small_beir):
    """Each `dims` section equals an evaluation of the embeddings cut to that dimension, float and 1-bit; one
    encoding serves them all."""
    model = SentenceTransformer(str(tiny_model), device="cpu")
    unpadded.enable_unpadded(model)
    bench = load_beir_folder(small_beir)
    corpus = evaluation.encode(model, bench.corpus_texts, 32, False)
    encoded = []

    def queries(texts):
        encoded.append(len(texts))
        return evaluation.encode(model, texts, 32, False)

    row = evaluation.evaluate_benchmark(bench, corpus, queries, ("float32", "ubinary"), dims=(32, 16))[bench.name]
    assert encoded == [len(bench.query_sets[0].query_ids)] and set(row["dims"]) == {"32", "16"}
    query_emb = queries(bench.query_sets[0].query_texts)
    for d in (32, 16):
        alone = evaluation.evaluate_benchmark(
            bench, corpus[:, :d], lambda t, d=d: query_emb[:, :d], ("float32", "ubinary")
        )
        section, reference = row["dims"][str(d)], alone[bench.name]
        binary = ("ubinary", "ubinary_asym")
        floats = {k: v for k, v in section.items() if k not in binary}
        assert floats == pytest.approx({k: v for k, v in reference.items() if k not in binary})
        for variant in binary:
            assert section[variant] == pytest.approx(reference[variant]), variant
        assert section["bytes_per_vector"] == 4 * d and section["ubinary"]["bytes_per_vector"] == d // 8


def test_matryoshka_training_and_the_bytes_chart(tiny_model, small_beir, tmp_path):
    argv = ["--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(tmp_path), "--run_name", "m",
            "--nrows", "40", "--max_steps", "2", "--batch_size", "8", "--gradient_accumulation_steps", "1",
            "--max_datapoints_per_src_for_eval", "0", "--eval_benchmarks", f"beir:{small_beir}",
            "--matryoshka_dims", "32", "16", "--wb_mode", "disabled"]  # fmt: skip
    assert st_trainer_ddp_hf.main(argv) == 0
    rows = json.loads((tmp_path / "m" / "results.json").read_text())["beir:scifact_small"]
    assert set(rows["dims"]) == {"32", "16"}
    card = (tmp_path / "m" / "final" / "README.md").read_text()
    assert "MatryoshkaLoss" in card and "matryoshka_dims" in card  # the model card records the loss
    assert re.search(r'"matryoshka_weights": \[\s*2\.0,\s*1\.0,\s*1\.0\s*\]', card)  # full dim = the others' sum
    out = tmp_path / "cmp"
    assert compare.main(["--models", str(tmp_path / "m" / "final"), str(tiny_model), "--benchmarks",
                         f"beir:{small_beir}", "--output_dir", str(out), "--dims", "32", "16", "--precision",
                         "ubinary"]) == 0  # fmt: skip
    assert (out / "chart_beir_scifact_small_ndcg_vs_bytes.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "(dim 16, ubinary)" in table and "(dim 32)" in table


def test_binary_training_with_calibration_end_to_end(tiny_model, small_beir, tmp_path):
    """--bat with a centred, ITQ-rotated calibration layer: the final folder holds the layer as a plain Dense
    module, and the run's table has Hamming and asymmetric rows with their bytes per vector."""
    argv = ["--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(tmp_path), "--run_name", "b",
            "--nrows", "40", "--max_steps", "3", "--batch_size", "8", "--gradient_accumulation_steps", "1",
            "--max_datapoints_per_src_for_eval", "0", "--eval_benchmarks", f"beir:{small_beir}", "--bat", "tanh",
            "--bat_float_weight", "1", "--bat_center", "mean", "--bat_rotation", "itq", "--bat_calibration_rows",
            "60", "--wb_mode", "disabled"]  # fmt: skip
    assert st_trainer_ddp_hf.main(argv) == 0
    modules = json.loads((tmp_path / "b" / "final" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense"]
    row = json.loads((tmp_path / "b" / "results.json").read_text())["beir:scifact_small"]
    assert row["ubinary"]["bytes_per_vector"] == row["ubinary_asym"]["bytes_per_vector"] == 8
    table = (tmp_path / "b" / "results.md").read_text()
    assert "(ubinary_asym)" in table and "(before)" in table


@pytest.mark.parametrize("flags, expected", [
    (["--matryoshka_dims", "32", "--matryoshka_weights", "1", "2", "3"],
     "error: --matryoshka_weights: 3 values for 2 dimensions (64 32: the full dimension first)"),
    (["--matryoshka_dims", "32", "--matryoshka_weights", "0", "0"], "--matryoshka_weights must be >= 0 and not all 0"),
    (["--bat_rotation", "itq"], "--bat_* options need --bat"),
    (["--bat", "--bat_center", "median"], "argument --bat_center: invalid choice: 'median'"),
])  # fmt: skip
def test_new_quality_flags_fail_in_one_line(tiny_model, tmp_path, capsys, flags, expected):
    argv = ["--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(tmp_path), "--nrows", "16",
            "--max_steps", "1", "--eval_benchmarks", "--wb_mode", "disabled", *flags]  # fmt: skip
    try:
        code = st_trainer_ddp_hf.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_written_mixture_keeps_the_local_sources_it_did_not_mine(tmp_path):
    """Sources left unmined are copied into the new mixture file as entries; their repo-relative files must still
    resolve from the file's own folder."""
    from model_exploration.negatives import write_mixture
    from model_exploration.sources import registry_entry

    specs = build_dataset_configs_sample()
    write_mixture(tmp_path / "elsewhere" / "mixture.yaml", [registry_entry(s) for s in specs], None)
    again = build_dataset_configs_file(tmp_path / "elsewhere" / "mixture.yaml")
    assert [s.local_path() for s in again] == [s.local_path() for s in specs]
    assert all(s.local_path().exists() for s in again)


def test_mining_plan_fits_the_budget_and_says_what_it_holds():
    from model_exploration.errors import UserError
    from model_exploration.negatives import MiningSettings, plan_mining

    settings = MiningSettings("m", range_max=50)
    whole = plan_mining(1_000_000, 1200, 384, settings, budget=64 * 10**9, faiss=False)
    assert whole.chunks == 1 and whole.peak <= whole.budget
    assert whole.embeddings == 5 * 1_000_000 * 384 * 4  # five float32 copies of an embedding a pair
    chunked = plan_mining(20_000_000, 1200, 384, settings, budget=64 * 10**9, faiss=False)
    assert chunked.chunks > 1 and chunked.peak <= chunked.budget and chunked.chunks * chunked.chunk_pairs >= 20_000_000
    assert chunked.query_block * chunked.chunk_pairs * 4 <= chunked.budget // 4  # exact search's block of scores
    assert f"{chunked.chunks} chunks of {chunked.chunk_pairs:,} pairs" in chunked.describe("paq")
    with_faiss = plan_mining(20_000_000, 1200, 384, settings, budget=64 * 10**9, faiss=True)
    assert with_faiss.scores == 0 and with_faiss.embeddings == 6 * with_faiss.chunk_pairs * 384 * 4
    with pytest.raises(UserError, match=r"^--mining_memory_gb 0\.3: too small to mine 1000 pairs at a time"):
        plan_mining(20_000_000, 1200, 384, settings, budget=3 * 10**8, faiss=False)


def test_a_source_over_the_mining_budget_is_mined_in_chunks_and_reads_back(tiny_model, tmp_path, caplog):
    """3,200 pairs under a budget that holds 40% of them: the plan is logged before mining, each pair's negative
    comes from its own chunk (a seeded random third of the training split), and the mined file builds its cache
    through the streamed JSON-lines path."""
    from model_exploration.negatives import ENCODER_BYTES, MiningSettings, plan_mining

    words = "cell membrane protein kinase signal receptor enzyme lipid gene tumour cortex neuron".split()
    rng = random.Random(0)
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for i in range(3200):
            f.write(json.dumps({"q": f"q{i} " + " ".join(rng.choices(words, k=6)),
                                "p": f"p{i} " + " ".join(rng.choices(words, k=30))}) + "\n")  # fmt: skip
    (tmp_path / "mixture.yaml").write_text(
        "sources:\n  - {name: local, fetch: jsonl, data_files: pairs.jsonl, anchor: q, positive: p}\n"
    )
    cache = tmp_path / "runs" / "cache"  # the miner's (--output_base runs): it finds this cache built
    source = load_and_cache_datasets(build_dataset_configs_file(tmp_path / "mixture.yaml"), cache)[0]
    texts = source.train.select_columns(["anchor", "positive"])
    faiss = importlib.util.find_spec("faiss") is not None
    whole = plan_mining(len(texts), texts.data.nbytes / len(texts), 64, MiningSettings("m"), 10**12, faiss)
    pairs_bytes = whole.embeddings + whole.candidates + whole.texts
    budget = int((ENCODER_BYTES + 0.4 * pairs_bytes) * (1 if faiss else 4 / 3))
    plan = plan_mining(len(texts), texts.data.nbytes / len(texts), 64, MiningSettings("m"), budget, faiss)
    argv = ["--mixture", str(tmp_path / "mixture.yaml"), "--model_name", str(tiny_model), "--relative_margin", "0.002",
            "--mining_memory_gb", str(budget / 1e9), "--output_base", str(tmp_path / "runs"), "--out",
            str(tmp_path / "mined")]  # fmt: skip
    caplog.set_level("INFO")
    assert _miner().main(argv) == 0
    stats = json.loads((tmp_path / "mined" / "local_mined.json").read_text())
    assert plan.chunks == stats["chunks"] == 3 and stats["pairs_per_chunk"] == plan.chunk_pairs
    assert "mining local: 3,180 pairs; mining holds ~" in caplog.text
    assert f"3 chunks of {plan.chunk_pairs:,} pairs, each pair's negatives from its own chunk" in caplog.text
    chunk_of = {
        source.train[int(row)]["positive"]: i
        for i, rows in enumerate(plan.chunk_rows([texts["anchor"]], 42))
        for row in rows
    }
    rows = [json.loads(line) for line in (tmp_path / "mined" / "local_mined.jsonl").open()]
    assert len(rows) == stats["rows"] > 0 and {chunk_of[r["positive"]] for r in rows} == {0, 1, 2}
    assert all(chunk_of[r["negative"]] == chunk_of[r["positive"]] for r in rows)
    mined = load_and_cache_datasets(build_dataset_configs_file(tmp_path / "mined" / "mixture.yaml"), tmp_path / "c2",
                                    max_eval=0)[0]  # fmt: skip
    assert mined.train.column_names == ["anchor", "positive", "negative"] and len(mined.train) == len(rows)
    assert f"negatives from within chunks of {plan.chunk_pairs} pairs" in mined.spec.mined


def test_mining_never_takes_a_positive_of_the_same_anchor_even_across_chunks(tiny_model, tmp_path, monkeypatch):
    """Anchors with three positives each, one shared with another anchor, mined in chunks: an anchor's pairs share
    a chunk, so none of its positives comes back as its negative (the output check finds none to drop); the check itself catches one."""
    from model_exploration import negatives
    from model_exploration.negatives import MiningSettings, known_pairs, mines_a_positive, plan_mining

    monkeypatch.setattr(negatives, "MIN_CHUNK_PAIRS", 100)  # chunks of a few hundred pairs, for a 900-pair source

    rng = random.Random(1)
    words = "cell membrane protein kinase signal receptor enzyme lipid gene tumour cortex neuron".split()
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for a in range(300):
            topic = " ".join(rng.choices(words, k=4))
            shared = f"review {a // 2}: " + " ".join(random.Random(a // 2).choices(words, k=20))
            for k in range(3):  # three positives per anchor, near each other (the likeliest false negatives), the
                # last one shared with the next anchor: split from its anchor, another anchor's pair brings it in
                positive = shared if k == 2 else f"{topic} study {a}.{k} " + " ".join(rng.choices(words, k=20))
                f.write(json.dumps({"q": f"claim {a}: {topic}", "p": positive}) + "\n")
    (tmp_path / "mixture.yaml").write_text(
        "sources:\n  - {name: multi, fetch: jsonl, data_files: pairs.jsonl, anchor: q, positive: p}\n"
    )
    source = load_and_cache_datasets(build_dataset_configs_file(tmp_path / "mixture.yaml"), tmp_path / "runs" / "cache",
                                     max_eval=0)[0]  # fmt: skip
    texts = source.train.select_columns(["anchor", "positive"])
    whole = plan_mining(len(texts), texts.data.nbytes / len(texts), 64, MiningSettings("m"), 10**12, False)
    per_source = whole.embeddings + whole.candidates + whole.texts
    budget = int((negatives.ENCODER_BYTES + 0.4 * per_source) * 4 / 3)  # exact search plans with 3/4: 3 chunks
    plan = plan_mining(len(texts), texts.data.nbytes / len(texts), 64, MiningSettings("m"), budget, False)
    assert plan.chunks >= 2
    chunk_of = {int(r): c for c, rows in enumerate(plan.chunk_rows([texts["anchor"]], 42)) for r in rows}
    by_anchor: dict[str, set[int]] = {}
    for i, anchor in enumerate(texts["anchor"]):
        by_anchor.setdefault(anchor, set()).add(chunk_of[i])
    assert all(len(chunks) == 1 for chunks in by_anchor.values())  # an anchor's pairs share one chunk
    argv = ["--mixture", str(tmp_path / "mixture.yaml"), "--model_name", str(tiny_model), "--relative_margin", "0",
            "--num_negatives", "2", "--max_datapoints_per_src_for_eval", "0", "--mining_memory_gb",
            str(budget / 1e9), "--output_base", str(tmp_path / "runs"), "--out", str(tmp_path / "mined")]  # fmt: skip
    assert _miner().main(argv) == 0
    stats = json.loads((tmp_path / "mined" / "multi_mined.json").read_text())
    assert stats["chunks"] == plan.chunks and stats["dropped_positive_as_negative"] == 0
    positives_of: dict[str, set[str]] = {}
    for row in texts:
        positives_of.setdefault(row["anchor"], set()).add(row["positive"])
    rows = [json.loads(line) for line in (tmp_path / "mined" / "multi_mined.jsonl").open()]
    negatives = [(r["anchor"], v) for r in rows for k, v in r.items() if k.startswith("negative")]
    assert rows and not any(n in positives_of[a] for a, n in negatives)  # brute force, no hashing
    known = known_pairs(texts)
    assert not any(mines_a_positive(r, known) for r in rows)
    planted = dict(rows[0], negative_2=next(iter(positives_of[rows[0]["anchor"]])))
    assert mines_a_positive(planted, known)  # the output check catches what it is there for
