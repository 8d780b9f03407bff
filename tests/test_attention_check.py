"""The attention value checks the GPU check runs before any timing (model_exploration/attention_check.py) pass on
the real kernels and models, and fail on each attention error planted into them: a wrong window (off by 2x, off by
one, ignored), a wrong softmax scale, swapped rotary bases, MPNet's position bias dropped."""

import copy

import pytest
import torch
from sentence_transformers import SentenceTransformer

from helpers import build_tiny_model
from model_exploration import attention_check, unpadded

LENGTHS = (96, 40, 17, 16, 1)  # test models: window 16 (|i - j| <= 8), max length 128
bucketed = unpadded._bucketed_attention
KERNEL_PLANTS = {
    "scale x1.41": lambda q, k, v, batch, w: bucketed(q * 1.41, k, v, batch, w),
    "window x2": lambda q, k, v, batch, w: bucketed(q, k, v, batch, None if w is None else 2 * w),
    "window + 1": lambda q, k, v, batch, w: bucketed(q, k, v, batch, None if w is None else w + 1),
    "window ignored": lambda q, k, v, batch, w: bucketed(q, k, v, batch, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bucketed_kernel_matches_the_dense_reference(dtype):
    report = attention_check.check_kernels("cpu", dtype)
    assert report["failures"] == []
    assert set(report) == {"bucketed window=None", "bucketed window=64", "failures"}  # no varlen on a CPU
    assert all(0 < e < attention_check.KERNEL_TOLERANCE[dtype] for key in report if key != "failures"
               for e in report[key].values())  # fmt: skip


@pytest.mark.parametrize("plant", sorted(KERNEL_PLANTS))
def test_a_planted_kernel_error_fails_the_kernel_check(plant):
    report = attention_check.check_kernels("cpu", torch.bfloat16, kernels={"planted": KERNEL_PLANTS[plant]})
    windowed_only = plant.startswith("window")
    assert report["failures"]
    assert all("window=64" in f for f in report["failures"]) == windowed_only


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        arch: SentenceTransformer(
            str(build_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, dropout=0.0)), device="cpu"
        )
        for arch in ("bert", "roberta", "modernbert", "mpnet")
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["bert", "roberta", "modernbert", "mpnet"])
def test_the_unpadded_forwards_pass_the_model_check(models, arch, dtype):
    report = attention_check.check_model(models[arch], dtype, LENGTHS)
    assert report["failures"] == [], report


def test_the_check_makes_attention_matter(models):
    """What the old check compared (embeddings of the random init) barely moves when ModernBERT's sliding layers
    attend globally; the sharpened model's token states move by far more than bf16 noise."""
    model = models["modernbert"]
    features = attention_check.model_batch(model, LENGTHS)
    moved = {}
    for name, prepare in (("random init", lambda m: None), ("sharpened", attention_check.make_attention_matter)):
        states = []
        for window in (model[0].auto_model.config.sliding_window, 10_000):
            fast = copy.deepcopy(model)
            prepare(fast)
            unpadded.enable_unpadded(fast)
            fast[0].auto_model.config.sliding_window = window
            with torch.no_grad():
                states.append(fast.eval()(dict(features))["token_embeddings"][features["attention_mask"].bool()])
        moved[name] = attention_check.relative_error(states[1], states[0])
    assert moved["random init"] < 1e-2 < moved["sharpened"]


def _swap_rotary_bases(monkeypatch):
    """ModernBERT's unpadded forward with each layer type given the other type's rotary base."""
    forward = unpadded.FORWARDS["modernbert"]
    other = {"full_attention": "sliding_attention", "sliding_attention": "full_attention"}

    def swapped(self, *args, **kwargs):
        original = self.rotary_emb.forward
        self.rotary_emb.forward = lambda x, positions, layer_type=None: original(x, positions, other[layer_type])
        try:
            return forward(self, *args, **kwargs)
        finally:
            del self.rotary_emb.forward

    monkeypatch.setitem(unpadded.FORWARDS, "modernbert", swapped)


def _wrap_attention(monkeypatch, change):
    """The unpadded path's attention called with (q, k, v, window) changed by `change`."""
    attention = unpadded.packed_attention

    def planted(q, k, v, batch, window=None):
        q, k, v, window = change(q, k, v, window)
        return attention(q, k, v, batch, window)

    monkeypatch.setattr(unpadded, "packed_attention", planted)


MODEL_PLANTS = {
    ("bert", "scale x1.41"): lambda mp: _wrap_attention(mp, lambda q, k, v, w: (q * 1.41, k, v, w)),
    ("roberta", "scale x1.41"): lambda mp: _wrap_attention(mp, lambda q, k, v, w: (q * 1.41, k, v, w)),
    ("modernbert", "scale x1.41"): lambda mp: _wrap_attention(mp, lambda q, k, v, w: (q * 1.41, k, v, w)),
    ("modernbert", "sliding layers global"): lambda mp: _wrap_attention(mp, lambda q, k, v, w: (q, k, v, None)),
    ("modernbert", "window x2"): lambda mp: _wrap_attention(
        mp, lambda q, k, v, w: (q, k, v, None if w is None else 2 * w)
    ),
    ("modernbert", "window + 1"): lambda mp: _wrap_attention(
        mp, lambda q, k, v, w: (q, k, v, None if w is None else w + 1)
    ),
    ("modernbert", "rotary bases swapped"): _swap_rotary_bases,
    ("mpnet", "position bias dropped"): lambda mp: mp.setattr(
        unpadded, "_mpnet_position_bias", lambda encoder, n, device: torch.zeros(encoder.n_heads, n, n, device=device)
    ),
    ("mpnet", "scale x1.41"): lambda mp: _wrap_attention(mp, lambda q, k, v, w: (q * 1.41, k, v, w)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch, plant", sorted(MODEL_PLANTS))
def test_a_planted_attention_error_fails_the_model_check(models, arch, plant, dtype, monkeypatch):
    MODEL_PLANTS[arch, plant](monkeypatch)
    report = attention_check.check_model(models[arch], dtype, LENGTHS)
    assert any(f.startswith("states:") for f in report["failures"]), report
