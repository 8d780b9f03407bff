"""The unpadded BERT forward equals the stock padded one (outputs and gradients), saves as a normal model, and the
GradCache / cross-rank-gathered losses on it give the gradients of the plain loss on the whole batch."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from model_exploration import unpadded

TEXTS = [
    "x",
    "what causes coronary heart disease in young adults",
    "Amyloid beta accumulation precedes tau pathology in preclinical Alzheimer's disease. " * 6,
    "Vitamin D supplementation reduces fracture risk.",
    "A randomized trial of aspirin. " * 20,
    "short",
]


def _pair_batch(model, n_pairs=6):
    queries = [f"query {i}: " + TEXTS[i % len(TEXTS)] for i in range(n_pairs)]
    passages = [TEXTS[(i * 5 + 2) % len(TEXTS)] + f" passage {i}" * (i + 1) for i in range(n_pairs)]
    return [model.preprocess(queries), model.preprocess(passages)]


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


def test_embeddings_and_gradients_equal_the_padded_model(tiny_model):
    stock = SentenceTransformer(str(tiny_model), device="cpu")
    fast = SentenceTransformer(str(tiny_model), device="cpu")
    assert unpadded.enable_unpadded(fast) == 1
    assert unpadded.enable_unpadded(fast) == 0  # idempotent
    reference = stock.encode(TEXTS, batch_size=4, convert_to_tensor=True)
    got = fast.encode(TEXTS, batch_size=4, convert_to_tensor=True)
    assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()

    features = _pair_batch(stock)
    stock.eval(), fast.eval()  # no dropout: the two forwards must agree exactly, gradients included
    loss_ref, grads_ref = _grads(stock, MultipleNegativesRankingLoss(stock), features)
    loss_got, grads_got = _grads(fast, MultipleNegativesRankingLoss(fast), features)
    assert loss_got.item() == pytest.approx(loss_ref.item(), abs=1e-5)
    trained = {n for n in grads_ref if "pooler" not in n}  # the stock forward also runs the unused pooler
    assert trained and trained <= set(grads_got)
    for name in trained:
        assert torch.allclose(grads_got[name], grads_ref[name], atol=1e-5, rtol=1e-3), name


def test_saved_model_is_a_normal_sentence_transformer(tiny_model, tmp_path):
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


def test_unsupported_architectures_keep_the_stock_forward(tiny_model, tmp_path):
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, pad_token_id=0)  # fmt: skip
    RobertaModel(config).save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    model = SentenceTransformer(modules=[Transformer(str(tmp_path / "roberta")), Pooling(32, "mean")], device="cpu")
    before = model.encode(TEXTS[:3], convert_to_tensor=True)
    assert unpadded.enable_unpadded(model) == 0
    assert torch.equal(model.encode(TEXTS[:3], convert_to_tensor=True), before)


def test_gradcache_with_token_chunks_gives_the_plain_loss_gradients(tiny_model):
    model = SentenceTransformer(str(tiny_model), device="cpu")
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


def test_model_flops_equal_torch_flop_counter(tiny_model):
    """EncoderFlops' count (dense weights + attention, on real tokens) against torch's own FLOP counter on the
    unpadded forward, which computes exactly the model FLOPs (no padding, no pooler)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model_exploration import throughput

    model = SentenceTransformer(str(tiny_model), device="cpu")
    unpadded.enable_unpadded(model)
    features = model.preprocess(["one two three four five", "six seven eight nine ten"])  # equal lengths: one bucket
    lengths = features["attention_mask"].sum(1).double()
    # SDPA's math backend runs attention as matmuls, which the counter sees (fused CPU kernels it does not)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(features)
    expected = throughput.EncoderFlops.of(model).forward(lengths.sum().item(), lengths.square().sum().item())
    assert counter.get_total_flops() == expected
