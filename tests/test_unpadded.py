"""The unpadded forwards (BERT, the RoBERTa family, MPNet, ModernBERT) equal the stock padded ones (outputs and
gradients, left and right padding, positions to the end of a 1,024-token input, sliding windows), save as a normal
model, and the GradCache / cross-rank-gathered losses on them give the gradients of the plain loss on the whole
batch; other architectures keep the stock forward with a warning."""

import json
import logging

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from helpers import build_tiny_model
from model_exploration import models, unpadded

ARCHS = ("bert", "roberta", "xlm-roberta", "camembert", "mpnet", "modernbert")

TEXTS = [
    "x",
    "what causes coronary heart disease in young adults",
    "Amyloid beta accumulation precedes tau pathology in preclinical Alzheimer's disease. " * 6,
    "Vitamin D supplementation reduces fracture risk.",
    "A randomized trial of aspirin. " * 20,
    "short",
]


def _pair_texts(n_pairs=6):
    queries = [f"query {i}: " + TEXTS[i % len(TEXTS)] for i in range(n_pairs)]
    passages = [TEXTS[(i * 5 + 2) % len(TEXTS)] + f" passage {i}" * (i + 1) for i in range(n_pairs)]
    return queries, passages


def _pair_batch(model, n_pairs=6):
    return [model.preprocess(texts) for texts in _pair_texts(n_pairs)]


def _grads(model, loss, features):
    model.zero_grad()
    value = loss([dict(f) for f in features], None)  # losses write outputs into the dicts
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_length_buckets_cover_every_sequence_once_with_bounded_waste():
    lengths = [512, 500, 480, 300, 290, 30, 29, 3, 1, 512]
    buckets = unpadded.length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        longest = max(lengths[i] for i in bucket)
        assert len(bucket) * longest**2 <= 1.125 * sum(lengths[i] ** 2 for i in bucket) or len(bucket) == 1
    assert len(buckets) < len(lengths)


@pytest.mark.parametrize("arch", ["bert", "roberta", "modernbert"])
def test_saved_model_is_a_normal_sentence_transformer(tiny_archs, arch, tmp_path):
    tiny_model = tiny_archs[arch]
    fast = SentenceTransformer(str(tiny_model), device="cpu")
    unpadded.enable_unpadded(fast)
    fast.save(str(tmp_path / "saved"))
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert "_stock_forward" not in reloaded[0].auto_model.__dict__
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == json.loads(
        (tiny_model / "config.json").read_text()
    )
    assert torch.allclose(
        reloaded.encode(TEXTS, convert_to_tensor=True), fast.encode(TEXTS, convert_to_tensor=True), atol=1e-5
    )


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    """One tiny dropout-free model per supported type (ModernBERT: 3 layers, window 16 (|i - j| <= 8), global
    attention every second layer, so both layer kinds and their two rotary bases run)."""
    out = {}
    for arch in ARCHS:
        extra = {"layers": 3} if arch == "modernbert" else {}
        out[arch] = build_tiny_model(tmp_path_factory.mktemp(arch), dropout=0.0, arch=arch, **extra)
    return out


def _stock_and_fast(path, padding_side="right", max_seq_length=None):
    """The reference is the stock forward on right-padded batches: stock BERT numbers positions from the batch's
    first column, so a left-padded text would read shifted positions there; the packed forwards give a text the
    same embedding whichever side is padded."""
    stock, fast = (SentenceTransformer(str(path), device="cpu") for _ in range(2))
    fast.tokenizer.padding_side = padding_side
    for model in (stock, fast):
        if max_seq_length:
            model.max_seq_length = max_seq_length
    assert unpadded.enable_unpadded(fast) == 1
    assert unpadded.enable_unpadded(fast) == 0  # idempotent
    stock.eval(), fast.eval()  # no dropout: the two forwards must agree exactly, gradients included
    return stock, fast


def _assert_same(stock, fast, texts, atol=1e-5):
    """Embeddings (min cosine >= 0.99999), MNRL loss and every trained parameter's gradient of the two models on the
    same (queries, passages)."""
    stock_features, fast_features = ([model.preprocess(t) for t in texts] for model in (stock, fast))
    reference = stock(dict(stock_features[1]))["sentence_embedding"].detach()
    got = fast(dict(fast_features[1]))["sentence_embedding"].detach()
    assert torch.nn.functional.cosine_similarity(got, reference).min() >= 0.99999
    assert torch.allclose(got, reference, atol=atol), (got - reference).abs().max()
    loss_ref, grads_ref = _grads(stock, MultipleNegativesRankingLoss(stock), stock_features)
    loss_got, grads_got = _grads(fast, MultipleNegativesRankingLoss(fast), fast_features)
    assert loss_got.item() == pytest.approx(loss_ref.item(), abs=1e-5)
    trained = {n for n in grads_ref if "pooler" not in n}  # the stock forward also runs the unused pooler
    assert trained and trained <= set(grads_got)
    for name in trained:
        assert torch.allclose(grads_got[name], grads_ref[name], atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_supported_type_equals_its_stock_forward(tiny_archs, arch, padding_side):
    stock, fast = _stock_and_fast(tiny_archs[arch], padding_side)
    texts = _pair_texts()
    lengths = fast.preprocess(texts[1])["attention_mask"].sum(1)
    assert lengths.max() > 3 * lengths.min()  # mixed lengths: padding in every batch
    if arch == "modernbert":
        assert lengths.max() > 2 * stock[0].auto_model.config.sliding_window + 1  # longer than the window
    _assert_same(stock, fast, texts)


def test_roberta_positions_to_the_end_of_a_1024_token_input(tmp_path):
    """INDUS-SDE's shape: 1,026 positions, pad id 1, so token 1,023 reads row 1,025, the table's last."""
    path = build_tiny_model(tmp_path, dropout=0.0, arch="roberta", positions=1026)
    stock, fast = _stock_and_fast(path, "left", max_seq_length=1024)
    long = " ".join(f"protein{i} binds receptor{i % 7}" for i in range(600))
    texts = [["what binds the receptor", "a short query"], [long, "x y"]]
    assert fast.preprocess(texts[1])["attention_mask"].sum(1).tolist()[0] == 1024
    _assert_same(stock, fast, texts)


def test_modernbert_sliding_window_is_exact_not_ignored(tiny_archs):
    """The equality above would hold by chance if the window made no difference: widening it changes the output."""
    stock, fast = _stock_and_fast(tiny_archs["modernbert"])
    features = stock.preprocess([TEXTS[2]])
    reference = stock(dict(features))["sentence_embedding"].detach()
    fast[0].auto_model.config.sliding_window = 10_000
    widened = fast(dict(features))["sentence_embedding"].detach()
    assert (widened - reference).abs().max() > 1e-4


def test_usable_length_of_a_514_position_roberta_is_512(tmp_path, caplog):
    """Base INDUS, XLM-R, multilingual-e5: 514 positions minus padding_idx + 1. --model_max_len 1024 is capped with
    a warning, and a text longer than that encodes (no IndexError past the position table)."""
    model = SentenceTransformer(str(build_tiny_model(tmp_path, arch="xlm-roberta", positions=514)), device="cpu")
    with caplog.at_level(logging.WARNING, logger="model_exploration.models"):
        assert models.set_max_len(model, 1024) == 512
    assert "--model_max_len 1024 exceeds the 512 tokens this model can embed" in caplog.text
    unpadded.enable_unpadded(model)
    long = " ".join(f"token{i}" for i in range(2000))
    assert model.encode([long]).shape == (1, 64)
    bert = SentenceTransformer(str(build_tiny_model(tmp_path / "bert")), device="cpu")
    assert models.set_max_len(bert, 1024) == 512  # BERT's positions start at 0: all 512 rows usable


def test_unsupported_architectures_keep_the_stock_forward_with_a_warning(tmp_path, caplog):
    """DistilBERT's config has no is_decoder (read unguarded, it raised AttributeError): the stock forward stays,
    and the warning names the type."""
    model = SentenceTransformer(str(build_tiny_model(tmp_path, arch="distilbert")), device="cpu")
    before = model.encode(TEXTS[:3], convert_to_tensor=True)
    with caplog.at_level(logging.WARNING, logger="model_exploration.unpadded"):
        assert unpadded.enable_unpadded(model) == 0
    assert "model type 'distilbert' has no unpadded forward" in caplog.text and "padding" in caplog.text
    assert torch.equal(model.encode(TEXTS[:3], convert_to_tensor=True), before)


@pytest.mark.parametrize("arch", ["bert", "roberta", "modernbert"])
def test_gradcache_with_token_chunks_gives_the_plain_loss_gradients(tiny_archs, arch):
    model = SentenceTransformer(str(tiny_archs[arch]), device="cpu")
    unpadded.enable_unpadded(model)
    model.eval()
    features = _pair_batch(model, n_pairs=8)
    loss_ref, grads_ref = _grads(model, MultipleNegativesRankingLoss(model), features)
    for cached in (
        CachedMultipleNegativesRankingLoss(model, mini_batch_size=3),
        CachedMultipleNegativesRankingLoss(model, mini_batch_size=8, mini_batch_num_tokens=40),
    ):
        loss_got, grads_got = _grads(model, cached, features)
        assert loss_got.item() == pytest.approx(loss_ref.item(), abs=1e-5)
        for name, grad in grads_ref.items():
            assert torch.allclose(grads_got[name], grad, atol=1e-6, rtol=1e-3), name


@pytest.mark.parametrize("arch", ARCHS)
def test_model_flops_equal_torch_flop_counter(tiny_archs, arch):
    """EncoderFlops' count (dense weights + attention, on real tokens) against torch's own FLOP counter on the
    unpadded forward, which computes exactly the model FLOPs (no padding, no pooler; sequences within ModernBERT's
    window, where windowed attention is full attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model_exploration import throughput

    model = SentenceTransformer(str(tiny_archs[arch]), device="cpu")
    unpadded.enable_unpadded(model)
    features = model.preprocess(["protein binds", "protein binds"])  # equal lengths: one bucket
    lengths = features["attention_mask"].sum(1)
    assert lengths[0] == lengths[1] <= 9
    # SDPA's math backend runs attention as matmuls, which the counter sees (fused CPU kernels it does not)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(features)
    assert counter.get_total_flops() == throughput.EncoderFlops.of(model).forward_of(lengths)


def test_windowed_attention_pairs_match_a_brute_force_count(tiny_archs):
    from model_exploration import throughput

    for window in (1, 8, 64):
        lengths = torch.tensor([1, 2, window, window + 1, window + 2, 3 * window + 5])
        brute = sum(sum(abs(i - j) <= window for i in range(n) for j in range(n)) for n in lengths.tolist())
        assert throughput.windowed_pairs(lengths, window).item() == brute
    flops = throughput.EncoderFlops.of(SentenceTransformer(str(tiny_archs["modernbert"]), device="cpu"))
    assert (flops.layers, flops.windowed_layers, flops.window) == (3, 1, 8)  # global, sliding, global


@pytest.mark.parametrize("arch, expected_log", [
    ("xlm-roberta", "--model_max_len 1024 exceeds the 512 tokens this model can embed"),
    ("distilbert", "unpadded forward off: model type 'distilbert' has no unpadded forward"),
])  # fmt: skip
def test_training_runs_at_model_max_len_1024_on_either_path(arch, expected_log, tmp_path, caplog, capsys):
    """A 514-position RoBERTa-family model at --model_max_len 1024 trains (capped at 512, no IndexError), and an
    unsupported type trains on the stock forward; the dry run says which path each takes."""
    from model_exploration import st_trainer_ddp_hf

    path = build_tiny_model(tmp_path / "m", arch=arch, positions=514)
    common = ["--stage", "sample", "--model_name", str(path), "--wb_mode", "disabled"]
    assert st_trainer_ddp_hf.main([*common, "--dry_run"]) == 0
    plan = capsys.readouterr().out
    if arch == "distilbert":
        assert "stock (padded) forward: model type 'distilbert' has no unpadded forward" in plan
    else:
        assert "unpadded forward (xlm-roberta, positions from row 2; at most 512 tokens)" in plan
    with caplog.at_level(logging.INFO):
        code = st_trainer_ddp_hf.main([*common, "--output_base", str(tmp_path / "runs"), "--run_name", "r",
                                       "--nrows", "24", "--max_steps", "2", "--batch_size", "4",
                                       "--gradient_accumulation_steps", "1", "--model_max_len", "1024",
                                       "--eval_benchmarks", "--max_datapoints_per_src_for_eval", "0"])  # fmt: skip
    assert code == 0 and (tmp_path / "runs" / "r" / "final" / "model.safetensors").exists()
    assert expected_log in caplog.text
    assert ("unpadded forward on" in caplog.text) is (arch != "distilbert")
