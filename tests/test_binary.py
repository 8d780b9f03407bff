import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from helpers import PYTHON, subprocess_env
from model_exploration.binary import BinaryAwareMNRLoss, BinarySurrogate, SurrogateStepCallback, beta_at


def test_beta_schedule_is_geometric_then_flat():
    assert beta_at(0, 1.0, 16.0, 100) == pytest.approx(1.0)
    assert beta_at(50, 1.0, 16.0, 100) == pytest.approx(4.0)
    assert beta_at(100, 1.0, 16.0, 100) == pytest.approx(16.0)
    assert beta_at(1000, 1.0, 16.0, 100) == pytest.approx(16.0)


@pytest.mark.parametrize("mode", ["ste", "clipped_ste", "tanh", "annealed_tanh"])
def test_surrogate_is_exact_sign_at_inference_and_bits_match_ubinary(mode):
    x = torch.randn(4, 32)
    surrogate = BinarySurrogate(mode).eval()
    out = surrogate(x)
    assert torch.equal(out, torch.where(x > 0, 1.0, -1.0))
    from sentence_transformers.util import quantize_embeddings

    bits = np.unpackbits(quantize_embeddings(x.numpy(), "ubinary"), axis=-1)
    assert np.array_equal(bits.astype(np.int64) * 2 - 1, out.numpy())


def test_surrogate_gradients():
    x = torch.tensor([[0.5, -3.0, 2.0, -0.1]], requires_grad=True)
    BinarySurrogate("ste").train()(x).sum().backward()
    ste_grad = x.grad.clone()
    x.grad = None
    BinarySurrogate("clipped_ste").train()(x).sum().backward()
    # the RMS scaling makes the gradient dense; clipping zeroes the paths through |x/rms| > 1
    assert ste_grad.abs().sum() > 0 and not torch.equal(ste_grad, x.grad)
    annealed = BinarySurrogate("annealed_tanh", beta_start=1.0, beta_end=50.0, anneal_steps=10).train()
    early = annealed(x.detach())
    annealed.step = 10
    late = annealed(x.detach())
    assert (late.abs() > early.abs()).all() and late.abs().min() > 0.99  # approaches sign as beta grows


def test_callback_follows_global_step():
    surrogate = BinarySurrogate("annealed_tanh", anneal_steps=10)

    class State:
        global_step = 7

    SurrogateStepCallback(surrogate).on_step_begin(None, State(), None)
    assert surrogate.step == 7 and surrogate.beta == pytest.approx(beta_at(7, 1.0, 20.0, 10))


def test_binary_aware_loss_trains_and_the_model_saves_as_a_plain_sentence_transformer(tiny_model, tmp_path):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    loss_fn = BinaryAwareMNRLoss(model, BinarySurrogate("annealed_tanh", anneal_steps=5), float_weight=0.5)
    features = [
        model.preprocess([f"query {i}" for i in range(4)]),
        model.preprocess([f"passage {i} text" for i in range(4)]),
    ]
    model.train()
    loss = loss_fn(features, None)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters())
    model.save(str(tmp_path / "eqat"))
    script = (
        "from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(tmp_path / 'eqat')!r}, device='cpu')\n"
        "bits = m.encode(['a query'], precision='ubinary')\n"
        "print(bits.dtype, bits.shape)\n"
    )
    # a fresh interpreter without our folder on sys.path
    out = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "uint8 (1, 8)"


def _texts(n=120):
    return [f"protein {i} binds receptor {i % 7} in cell line {i % 5} under stress {i % 3}" for i in range(n)]


@pytest.mark.parametrize("center, rotation", [("mean", "itq"), ("learned", "random"), ("none", "itq")])
def test_calibration_layer_saves_reloads_and_encode_gives_the_trained_bits(tiny_model, tmp_path, center, rotation):
    """The calibration layer is sentence-transformers' Dense: the reloaded folder needs no code of ours, and its
    encode(precision="ubinary") is the sign of the embeddings the binary loss trained on."""
    from model_exploration.binary import add_calibration

    model = SentenceTransformer(str(tiny_model), device="cpu")
    layer, tracker = add_calibration(model, _texts(), center, rotation, seed=3)
    assert (tracker is not None) == (center == "mean")
    assert layer.linear.bias.requires_grad == (center == "learned") and not layer.linear.weight.requires_grad
    rotation_matrix = layer.linear.weight.T
    assert torch.allclose(rotation_matrix @ rotation_matrix.T, torch.eye(rotation_matrix.shape[0]), atol=1e-5)
    # what the loss trains on: the model's forward (BinaryAwareMNRLoss embeds the columns the same way)
    model.eval()
    trained = model(model.preprocess(_texts(20)))["sentence_embedding"].detach()
    model.save(str(tmp_path / "saved"))
    script = (
        "import sys, numpy as np\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(tmp_path / 'saved')!r}, device='cpu')\n"
        f"np.save(sys.argv[1], m.encode({_texts(20)!r}, precision='ubinary'))\n"
        "print([type(x).__name__ for x in m])\n"
    )
    out = subprocess.run([PYTHON, "-c", script, str(tmp_path / "bits.npy")], capture_output=True, text=True,
                         env=subprocess_env(), cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['Transformer', 'Pooling', 'Dense']"
    assert np.array_equal(np.load(tmp_path / "bits.npy"), np.packbits((trained > 0).numpy(), axis=-1))


def test_centering_balances_bits_and_itq_lowers_quantization_error():
    from model_exploration.binary import itq_rotation, random_rotation

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=generator) @ torch.randn(16, 16, generator=generator) + 3.0  # skewed
    assert ((x > 0).float().mean(0) - 0.5).abs().max() > 0.3  # uncentered: some bits are nearly constant
    v = x - x.mean(0)
    assert ((v > 0).float().mean(0) - 0.5).abs().max() < 0.1

    def quantization_error(r):
        projected = v @ r
        return (torch.where(projected > 0, 1.0, -1.0) - projected / projected.abs().mean()).square().sum()

    assert quantization_error(itq_rotation(v, seed=1)) < quantization_error(random_rotation(16, seed=1))


def test_mean_centering_follows_the_training_batches(tiny_model_no_dropout):
    from model_exploration.binary import add_calibration, pooled_embeddings

    model = SentenceTransformer(str(tiny_model_no_dropout), device="cpu")
    layer, tracker = add_calibration(model, _texts(40), "mean", "random", seed=0)
    rotation = layer.linear.weight.T
    other = [f"an unrelated sentence about galaxies number {i}" for i in range(32)]
    target = pooled_embeddings(model, other).mean(0)
    model.train()
    for _ in range(600):  # momentum 0.01: 0.99^600 of the start is left
        with torch.no_grad():
            model(model.preprocess(other))
    mu = -layer.linear.bias.detach() @ rotation.T
    assert torch.allclose(mu, target, atol=0.01 * target.abs().max())
    model.eval()
    before = layer.linear.bias.clone()
    model(model.preprocess(other))
    assert torch.equal(layer.linear.bias, before)  # inference never moves it


def test_asymmetric_loss_keeps_queries_float_and_binarizes_documents(tiny_model_no_dropout):
    """With asymmetric=True the loss is MNRL of float queries against sign-surrogate documents: the same value as
    computing it by hand, and different from the symmetric binary loss."""
    model = SentenceTransformer(str(tiny_model_no_dropout), device="cpu")
    model.eval()  # no dropout: the same embeddings on every call
    texts = [[f"query {i} about cells" for i in range(4)], [f"passage {i} on tissue and cells" for i in range(4)]]
    features = [model.preprocess(t) for t in texts]
    surrogate = BinarySurrogate("tanh")
    asym = BinaryAwareMNRLoss(model, surrogate, asymmetric=True)
    sym = BinaryAwareMNRLoss(model, surrogate)
    got = asym([dict(f) for f in features], None)
    queries, docs = (model(dict(f))["sentence_embedding"] for f in features)
    surrogate.train(False)
    expected = asym.compute_loss_from_embeddings([queries, surrogate(docs)], None)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(sym([dict(f) for f in features], None).item() - got.item()) > 1e-4
    assert asym.get_config_dict()["asymmetric"] is True


def test_matryoshka_around_the_binary_aware_loss_trains_the_bits_of_every_truncation(tiny_model_no_dropout):
    """The 1-bit recipe's Matryoshka form (--bat with --matryoshka_dims, on mined triplets: mined_eqat_mrl) is the
    binary-aware loss of each truncated embedding, weighted: sign surrogate of the first DIM dimensions, plus the
    float loss of the same truncation; one forward for all dimensions."""
    from sentence_transformers.sentence_transformer.losses.matryoshka import shrink

    from model_exploration.st_trainer_ddp_hf import build_loss

    model = SentenceTransformer(str(tiny_model_no_dropout), device="cpu")
    model.train()  # no dropout: the same embeddings on every call, and the surrogate in its training form
    full = model.get_embedding_dimension()
    args = SimpleNamespace(gather_across_devices=False, mini_batch_size=None, matryoshka_dims=[full // 2, full // 4],
                           matryoshka_weights=None, bat_float_weight=0.5, bat_asymmetric=False)  # fmt: skip
    surrogate = BinarySurrogate("tanh")
    loss_fn = build_loss(args, model, surrogate)
    texts = [[f"query {i} about cells" for i in range(4)], [f"passage {i} on tissue and cells" for i in range(4)],
             [f"unrelated note {i} on rocks" for i in range(4)]]  # fmt: skip
    features = [model.preprocess(t) for t in texts]
    got = loss_fn([dict(f) for f in features], None)
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    embeddings = [model(dict(f))["sentence_embedding"].detach() for f in features]
    single = BinaryAwareMNRLoss(model, surrogate, float_weight=0.5)
    expected = 0.0
    for dim, weight in zip([full, full // 2, full // 4], [2.0, 1.0, 1.0]):
        cut = [shrink(e, dim) for e in embeddings]
        expected += weight * (
            single.compute_loss_from_embeddings([surrogate(e) for e in cut], None)
            + 0.5 * single.compute_loss_from_embeddings(cut, None)
        )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
