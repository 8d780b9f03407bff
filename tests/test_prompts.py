"""Prompts (docs/prompts.md): tokenized into the pre-tokenized pairs, pooled as sentence-transformers pools them
(include_prompt) on the stock and the unpadded forward and through GradCache, applied by the in-training evaluator
and compare.py as a plain sentence-transformers evaluation with encode_query / encode_document applies them, saved
with the final model, used by mining, shown by the dry run; bad input is one line."""

import json

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from helpers import REPO_ROOT, build_tiny_model
from model_exploration import compare, data, evaluation, pretokenize, prompts, st_trainer_ddp_hf, unpadded
from model_exploration.benchmarks import load_beir_folder, validation_benchmark
from model_exploration.encoding import encode_fast
from model_exploration.errors import UserError
from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss
from model_exploration.sources import SourceSpec, build_dataset_configs_file, mixture_prompt_defaults
from model_exploration.training import MixtureTrainer

SAVED = {"query": "query: ", "document": "passage: "}
METRICS = ("mrr@1", "mrr@10", "ndcg@1", "ndcg@5", "ndcg@10", "recall@10", "map@100")
TEXTS = ["x", "what causes coronary heart disease", "Amyloid beta precedes tau pathology. " * 8, "Vitamin D"]


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """A tiny model with saved E5-style prompts (no dropout: training-mode forwards are deterministic)."""
    return build_tiny_model(tmp_path_factory.mktemp("prompted"), dropout=0.0, prompts=SAVED)


@pytest.fixture(scope="module")
def excluding(tmp_path_factory):
    """The same with Pooling(include_prompt=False): its embeddings pool only the tokens after the prompt."""
    return build_tiny_model(tmp_path_factory.mktemp("excluding"), dropout=0.0, prompts=SAVED, include_prompt=False)


def _source(tmp_path, n=6):
    rows = [
        {"anchor": f"short query {i}", "positive": "a longer passage about mitochondria " * (i + 1)} for i in range(n)
    ]
    spec = SourceSpec(name="s", hub="x", anchor="anchor", positive="positive")
    return data.SourceData(spec, Dataset.from_list(rows), Dataset.from_list(rows[:1]), 0, tmp_path), rows


def _collated(model, tmp_path, columns):
    """The pre-tokenized batch of a source whose columns have `columns` prompts, as the trainer collates it (its
    `dataset_name` column names the source), and the stock collator's batch of the same texts."""
    source, rows = _source(tmp_path)
    tokens, _ = pretokenize.pretokenize_source(source, model.tokenizer, model.max_seq_length, prompts=columns)
    trainer_prompts = prompts.trainer_prompts({"s": columns})
    fast = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer,
                                            prompts=trainer_prompts)([r | {"dataset_name": "s"} for r in tokens])  # fmt: skip
    slow = SentenceTransformerDataCollator(preprocess_fn=model.preprocess, prompts=trainer_prompts)(
        [r | {"dataset_name": "s"} for r in rows]
    )
    return fast, slow, tokens


def test_pretokenized_pairs_start_with_the_prompt_and_a_changed_prompt_rebuilds_the_cache(prompted, tmp_path):
    model = SentenceTransformer(str(prompted), device="cpu")
    columns = prompts.source_prompts(SourceSpec(name="s", hub="x", anchor="a", positive="p"), prompts.Prompts(**SAVED))
    assert columns == {"anchor": "query: ", "positive": "passage: "}
    fast, slow, tokens = _collated(model, tmp_path, columns)
    for key in ("anchor_input_ids", "anchor_attention_mask", "positive_input_ids", "positive_attention_mask",
                "anchor_prompt_length", "positive_prompt_length"):  # fmt: skip
        assert torch.equal(torch.as_tensor(fast[key]), torch.as_tensor(slow[key])), key
    for column, prompt in columns.items():
        ids = model.tokenizer(prompt)["input_ids"][:-1]  # [CLS] and the prompt's tokens, without [SEP]
        assert fast[f"{column}_prompt_length"] == len(ids)
        assert all(row[: len(ids)] == ids for row in tokens[column]), column
    # another prompt: another cache folder, other ids; the first prompt again: its folder, not a third
    changed = {"anchor": "search_query: ", "positive": "passage: "}
    again, _ = pretokenize.pretokenize_source(_source(tmp_path)[0], model.tokenizer, model.max_seq_length,
                                              prompts=changed)  # fmt: skip
    assert again["anchor"] != tokens["anchor"] and again["positive"] == tokens["positive"]
    pretokenize.pretokenize_source(_source(tmp_path)[0], model.tokenizer, model.max_seq_length, prompts=columns)
    assert len(list(tmp_path.glob("tokens-*"))) == 2
    # the texts' cache does not depend on prompts: they are applied when tokenizing or encoding
    spec = SourceSpec(name="s", hub="x", anchor="anchor", positive="positive")
    assert SourceSpec(**vars(spec) | {"query_prompt": "q: ", "prompts": (("positive", "p: "),)}).fingerprint() == (
        spec.fingerprint()
    )


def test_include_prompt_false_pools_only_the_text_on_both_forward_paths_and_through_gradcache(excluding, tmp_path):
    stock = SentenceTransformer(str(excluding), device="cpu")
    fast = SentenceTransformer(str(excluding), device="cpu")
    unpadded.enable_unpadded(fast)
    length = prompts.prompt_length(stock.preprocess, "query: ")
    tokens = stock.encode_query(TEXTS, output_value="token_embeddings")
    text_only = torch.stack([t[length:].mean(0) for t in tokens])
    assert not torch.allclose(text_only, torch.stack([t.mean(0) for t in tokens]), atol=1e-3)
    for model in (stock, fast):
        assert torch.allclose(model.encode_query(TEXTS, convert_to_tensor=True), text_only, atol=1e-5)
    assert torch.allclose(encode_fast(fast, TEXTS, token_budget=64, prompt="query: "), text_only, atol=1e-5)

    # training: the pre-tokenized batch carries prompt_length into the forward and through GradCache's chunks
    batch, _, _ = _collated(stock, tmp_path, {"anchor": "query: ", "positive": "passage: "})
    features = [
        {k.split("_", 1)[1]: v for k, v in batch.items() if k.startswith(f"{c}_")} for c in ("anchor", "positive")
    ]
    _, rows = _source(tmp_path)
    for model in (stock, fast):
        model.train()
        embedded = model(dict(features[0]))["sentence_embedding"]
        assert torch.allclose(embedded, stock.encode_query([r["anchor"] for r in rows], convert_to_tensor=True),
                              atol=1e-5)  # fmt: skip
    grads = []
    for loss in (GatheredMNRLoss(fast), GatheredCachedMNRLoss(fast, mini_batch_size=2)):
        fast.zero_grad()
        value = loss([dict(f) for f in features], None)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in fast.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_binary_calibration_embeds_each_text_with_its_prompt(excluding):
    from model_exploration.binary import calibration_texts, pooled_embeddings

    model = SentenceTransformer(str(excluding), device="cpu")
    train = Dataset.from_list([{"anchor": f"claim {i}", "positive": f"abstract {i} " * (i + 1)} for i in range(4)])
    texts, text_prompts = calibration_texts([train], 4, seed=0, prompts=[{"anchor": "q: ", "positive": "p: "}])
    assert text_prompts == ["q: "] * 4 + ["p: "] * 4 and texts[:4] == train["anchor"]
    expected = torch.cat([model.encode(texts[:4], prompt="q: ", convert_to_tensor=True),
                          model.encode(texts[4:], prompt="p: ", convert_to_tensor=True)])  # fmt: skip
    assert torch.allclose(pooled_embeddings(model, texts, batch_size=3, prompts=text_prompts), expected, atol=1e-5)


def _st_rows(model, bench, query_prompt=None, corpus_prompt=None) -> dict:
    """A plain sentence-transformers evaluation (encode_query / encode_document; prompts None: the model's own)."""
    qs = bench.query_sets[0]
    scores = InformationRetrievalEvaluator(
        queries=dict(zip(qs.query_ids, qs.query_texts)), corpus=dict(zip(bench.corpus_ids, bench.corpus_texts)),
        relevant_docs={q: set(docs) for q, docs in qs.relevant.items()}, mrr_at_k=[1, 10], ndcg_at_k=[1, 5, 10],
        precision_recall_at_k=[10], map_at_k=[100], accuracy_at_k=[1], batch_size=32, name="st",
        query_prompt=query_prompt, corpus_prompt=corpus_prompt,
    )(model)  # fmt: skip
    return {m: scores[f"st_cosine_{m}"] for m in METRICS}


def _assert_rows_equal(ours: dict, theirs: dict, abs_tol: float = 1e-4):
    for metric in METRICS:
        assert ours[metric] == pytest.approx(theirs[metric], abs=abs_tol), metric


def test_in_training_evaluation_equals_sentence_transformers_with_the_models_prompts(prompted, small_beir):
    model = SentenceTransformer(str(prompted), device="cpu")
    bench = load_beir_folder(small_beir)
    with_prompts = evaluation.RetrievalEvaluator([bench]).compute_rows(model)[bench.name]
    _assert_rows_equal(with_prompts, _st_rows(model, bench))
    without = evaluation.RetrievalEvaluator([bench], query_prompt="", corpus_prompt="").compute_rows(model)
    _assert_rows_equal(without[bench.name], _st_rows(model, bench, "", ""))
    assert with_prompts["ndcg@10"] != without[bench.name]["ndcg@10"]  # the prompts were applied
    # a source's validation set: its own prompts, whatever the model's
    qs = bench.query_sets[0]
    positives = [bench.corpus_texts[bench.corpus_ids.index(next(iter(qs.relevant[q])))] for q in qs.query_ids]
    val = validation_benchmark("val/s", qs.query_texts, positives, prompts=("q: ", "p: "))
    ours = evaluation.RetrievalEvaluator([val]).compute_rows(model)["val/s"]
    _assert_rows_equal(ours, _st_rows(model, val, "q: ", "p: "))


def test_compare_uses_each_models_own_prompts_unless_told_and_records_them(prompted, small_beir, tmp_path):
    model = SentenceTransformer(str(prompted), device="cpu")
    bench = load_beir_folder(small_beir)
    common = ["--models", str(prompted), "--benchmarks", f"beir:{small_beir}", "--no_charts"]
    own = compare.run([*common, "--output_dir", str(tmp_path / "own")])[str(prompted)][bench.name]
    _assert_rows_equal(own, _st_rows(model, bench))
    assert (own["query_prompt"], own["document_prompt"]) == ("query: ", "passage: ")
    assert "[query 'query: ', document 'passage: ']" in (tmp_path / "own" / "results.md").read_text()
    none = compare.run([*common, "--output_dir", str(tmp_path / "none"), "--query_prompt", "", "--document_prompt", ""])
    _assert_rows_equal(none[str(prompted)][bench.name], _st_rows(model, bench, "", ""))
    symmetric = compare.run([*common, "--output_dir", str(tmp_path / "own"), "--query_prompt_name", "document",
                             "--document_prompt", "query"])[str(prompted)][bench.name]  # fmt: skip
    _assert_rows_equal(symmetric, _st_rows(model, bench, "passage: ", "passage: "))  # redone, not the cached rows
    with pytest.raises(UserError, match=r"^--query_prompt_name: --models .* has no prompt named 'nope'; its prompts"):
        compare.run([*common, "--output_dir", str(tmp_path / "bad"), "--query_prompt_name", "nope"])


def test_a_run_trains_with_its_prompts_and_its_saved_model_reproduces_its_scores(
    tiny_model, small_beir, tmp_path, monkeypatch
):
    """--query_prompt / --document_prompt on a model without prompts, pre-tokenized, GradCache: the training
    batches hold the prompts, final/ saves them, and a plain sentence-transformers evaluation of final/ (through
    encode_query / encode_document) gives the run's benchmark rows."""
    seen = []
    compute_loss = MixtureTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append({k: v for k, v in inputs.items() if k.startswith("anchor_")})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(MixtureTrainer, "compute_loss", spy)
    argv = ["--stage", "sample", "--model_name", str(tiny_model), "--output_base", str(tmp_path), "--run_name", "p",
            "--nrows", "32", "--max_steps", "2", "--batch_size", "8", "--gradient_accumulation_steps", "1",
            "--eval_benchmarks", f"beir:{small_beir}", "--wb_mode", "disabled", "--pretokenize",
            "--mini_batch_size", "4", "--query_prompt", "query: ", "--document_prompt", "passage: "]  # fmt: skip
    assert st_trainer_ddp_hf.main(argv) == 0
    final = SentenceTransformer(str(tmp_path / "p" / "final"), device="cpu")
    prompt_ids = final.tokenizer("query: ")["input_ids"][:-1]
    assert seen and all(b["anchor_prompt_length"] == len(prompt_ids) for b in seen)
    assert all(row[: len(prompt_ids)].tolist() == prompt_ids for b in seen for row in b["anchor_input_ids"])
    assert final.prompts["query"] == "query: " and final.prompts["document"] == "passage: "
    rows = json.loads((tmp_path / "p" / "results.json").read_text())["beir:scifact_small"]
    _assert_rows_equal(rows, _st_rows(final, load_beir_folder(small_beir)))
    card = (tmp_path / "p" / "final" / "README.md").read_text()
    assert "### Prompts" in card and "`'query: '`" in card and "`'passage: '`" in card


def test_mining_embeds_with_the_sources_prompts_and_the_mixture_keeps_them(tiny_model, tmp_path, monkeypatch):
    import importlib.util

    import sentence_transformers.util

    calls = []
    mine = sentence_transformers.util.mine_hard_negatives

    def spy(*args, **kwargs):
        calls.append((kwargs["query_prompt"], kwargs["corpus_prompt"]))
        return mine(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers.util, "mine_hard_negatives", spy)
    spec = importlib.util.spec_from_file_location("mine", REPO_ROOT / "data_prep" / "mine_hard_negatives.py")
    miner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(miner)
    mixture = tmp_path / "mixture.yaml"
    sample = REPO_ROOT / "data" / "sample"
    mixture.write_text(
        "document_prompt: 'passage: '\nsources:\n"
        f"  - {{name: a, fetch: jsonl, data_files: {sample / 'scifact_train_pairs.jsonl'}, anchor: claim, "
        "positive: abstract}\n"
        f"  - {{name: b, fetch: jsonl, data_files: {sample / 'scitldr_train_pairs.jsonl'}, anchor: tldr, "
        "positive: abstract, query_prompt: 'tldr: ', document_prompt: query}\n"
    )
    argv = ["--mixture", str(mixture), "--model_name", str(tiny_model), "--nrows", "60", "--relative_margin", "0.002",
            "--output_base", str(tmp_path / "runs"), "--out", str(tmp_path / "mined"), "--query_prompt", "query: "]  # fmt: skip
    assert miner.main(argv) == 0
    assert calls == [("query: ", "passage: "), ("tldr: ", "tldr: ")]
    assert mixture_prompt_defaults("sample", tmp_path / "mined" / "mixture.yaml") == ("query: ", "passage: ")
    specs = {s.name: s for s in build_dataset_configs_file(tmp_path / "mined" / "mixture.yaml")}
    assert (specs["b_mined"].query_prompt, specs["b_mined"].document_prompt) == ("tldr: ", "query")
    assert "prompts 'tldr: ' / 'tldr: '" in specs["b_mined"].mined


def test_the_dry_run_shows_each_sources_prompts(tmp_path, capsys):
    """A source's own prompt beats the mixture's default, which the flags may restate but not contradict;
    `document_prompt: query` gives documents the query prompt; `prompts` sets single columns."""
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(
        "query_prompt: 'query: '\ndocument_prompt: 'passage: '\nsources:\n"
        "  - {name: qa, fetch: jsonl, data_files: x.jsonl, anchor: q, positive: p}\n"
        "  - {name: dup, fetch: jsonl, data_files: x.jsonl, anchor: q, positive: p, document_prompt: query}\n"
        "  - {name: tri, fetch: jsonl, data_files: x.jsonl, anchor: q, positive: p, negative: n,"
        " prompts: {negative: 'other: '}}\n"
    )
    argv = ["--mixture", str(mixture), "--output_base", str(tmp_path), "--dry_run", "--query_prompt", "query: "]
    assert st_trainer_ddp_hf.main(argv) == 0
    out = capsys.readouterr().out
    assert "prompts: anchor 'query: ' | positive 'passage: '" in out
    assert "prompts: anchor, positive 'query: '" in out
    assert "prompts: anchor 'query: ' | positive 'passage: ' | negative 'other: '" in out
    assert "prompts: query 'query: ', document 'passage: ' (--query_prompt / the mixture file)" in out


@pytest.mark.parametrize(
    "header, source, flags, expected",
    [
        (
            "",
            "",
            ["--prompts_from_model", "nope"],
            "--prompts_from_model: the model {model} has no prompt named 'nope'",
        ),
        (
            "query_prompt: 'a: '\n",
            "",
            ["--query_prompt", "b: "],
            "--query_prompt gives the query prompt 'b: ', the mixture's query_prompt is 'a: '; set it in one place",
        ),  # fmt: skip
        ("", "", ["--prompts_from_model", "--query_prompt", "q: "], "--prompts_from_model takes both prompts from the"),
        (
            "",
            ", prompts: {negative: 'n: '}",
            [],
            "source 'qa' has a prompt for column(s) ['negative'], which it does "
            "not have (its columns: anchor, positive)",
        ),  # fmt: skip
    ],
)
def test_bad_prompt_input_is_one_clear_line(prompted, header, source, flags, expected, tmp_path, capsys):
    (tmp_path / "mixture.yaml").write_text(
        f"{header}sources:\n  - {{name: qa, fetch: jsonl, data_files: x.jsonl, anchor: q, positive: p{source}}}\n"
    )
    argv = ["--mixture", str(tmp_path / "mixture.yaml"), "--model_name", str(prompted), "--output_base",
            str(tmp_path), "--dry_run", *flags]  # fmt: skip
    try:
        code = st_trainer_ddp_hf.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert expected.format(model=prompted) in err.strip().splitlines()[-1]
