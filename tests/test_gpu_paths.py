"""What the GPU path relies on, checked where a CPU can check it: the varlen fallback's rules, one backward node for
QKV, gradient checkpointing on the unpadded loop, no host-device sync in the step path, bf16 only where native,
the encoder's padding, frozen pooler, GPU defaults, and gpu_check.sh refusing to run without a GPU."""

import subprocess
import sys

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from helpers import REPO_ROOT, build_tiny_model, subprocess_env
from model_exploration import cli, models, unpadded
from model_exploration.encoding import encode_fast
from model_exploration.training import PreemptionCallback, TokenCounter

TEXTS = ["a short query", "a somewhat longer passage about mitochondria and cell death " * 3, "x", "mid length text"]


@pytest.fixture(autouse=True)
def _fresh_probe():
    unpadded._varlen_usable.clear()
    yield
    unpadded._varlen_usable.clear()


def test_device_errors_surface_and_a_missing_kernel_falls_back_with_its_message(monkeypatch, caplog):
    device, dtype = torch.device("cpu"), torch.bfloat16

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(unpadded, "_varlen_attention", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        unpadded.varlen_usable(device, dtype)
    assert not unpadded._varlen_usable  # not mistaken for a missing kernel

    def no_kernel(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(unpadded, "_varlen_attention", no_kernel)
    assert unpadded.varlen_usable(device, dtype) is False
    assert "RuntimeError: no kernel image is available for execution on the device" in caplog.text


def test_the_probe_works_inside_no_grad_inference_and_checkpointed_forwards(monkeypatch):
    """The first forward can be GradCache's no-grad pass, an encoding under inference mode, or a checkpointed
    layer: a working kernel must still be found working there."""
    monkeypatch.setattr(unpadded, "_varlen_attention", lambda q, k, v, cu, n, window=None: q * k + v)  # differentiable
    device = torch.device("cpu")
    with torch.no_grad():
        assert unpadded.varlen_usable(device, torch.bfloat16)
    unpadded._varlen_usable.clear()
    with torch.inference_mode():
        assert unpadded.varlen_usable(device, torch.bfloat16)
    unpadded._varlen_usable.clear()
    x = torch.ones(2, requires_grad=True)
    torch.utils.checkpoint.checkpoint(
        lambda y: y * unpadded.varlen_usable(device, torch.float16), x, use_reentrant=False
    ).sum().backward()
    assert unpadded._varlen_usable == {("cpu:0", torch.float16, False): True}


def test_a_kernel_without_sliding_windows_still_serves_global_attention(monkeypatch, caplog):
    """torch builds whose varlen_attn lacks window_size: ModernBERT's global layers keep the kernel, its sliding
    layers fall back (probed apart)."""

    def no_window(q, k, v, cu, n, window=None):
        if window is not None:
            raise TypeError("varlen_attn() got an unexpected keyword argument 'window_size'")
        return q * k + v

    monkeypatch.setattr(unpadded, "_varlen_attention", no_window)
    device = torch.device("cpu")
    assert unpadded.varlen_usable(device, torch.bfloat16) is True
    assert unpadded.varlen_usable(device, torch.bfloat16, windowed=True) is False
    assert "varlen_attn with a sliding window unusable" in caplog.text and "window_size" in caplog.text


def test_a_kernel_that_fails_in_backward_is_not_used(monkeypatch):
    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q.clone()

        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError("varlen backward is not implemented for this dtype")

    monkeypatch.setattr(unpadded, "_varlen_attention", lambda q, k, v, cu, n, window=None: ForwardOnly.apply(q))
    assert unpadded.varlen_usable(torch.device("cpu"), torch.float16) is False


def _node_names(tensor) -> list[str]:
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_qkv_split_is_one_backward_node(tiny_model):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    layer = model[0].auto_model.encoder.layer[0]
    x = torch.randn(7, 64, requires_grad=True)
    batch = unpadded.PackedBatch([4, 3], torch.tensor([0, 4, 7], dtype=torch.int32))
    names = _node_names(unpadded._bert_layer(layer, x, batch, heads=2))
    assert "UnbindBackward0" in names and "SelectBackward0" not in names  # three selects zero-fill 3x the grad


@pytest.mark.parametrize("arch, layers", [("bert", 2), ("roberta", 2), ("modernbert", 3)])
def test_gradient_checkpointing_recomputes_layers_on_the_unpadded_path(arch, layers, tmp_path, monkeypatch):
    """Same gradients with and without recomputation, for each layer kind (ModernBERT's rotary tables are built
    before the layers: a tensor with a graph built inside a checkpointed layer and reused by the next would not be
    recomputed consistently). MPNet's HF model refuses checkpointing itself."""
    path = build_tiny_model(tmp_path, dropout=0.0, arch=arch, layers=layers)
    calls, grads = [], {}

    def counted_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unpadded, "checkpoint", counted_checkpoint)
    for recompute in (False, True):
        model = SentenceTransformer(str(path), device="cpu")
        unpadded.enable_unpadded(model)
        if recompute:  # what the trainer calls for --gradient_checkpointing
            inner = model[0].auto_model
            enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
            enable()
        model.train()
        features = [model.preprocess(TEXTS[:2]), model.preprocess(TEXTS[2:])]
        MultipleNegativesRankingLoss(model)([dict(f) for f in features], None).backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == layers * 2  # every layer, two columns, only when enabled
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6), name


def test_the_step_path_does_not_read_device_values(monkeypatch):
    """TokenCounter and the SIGTERM check add no .item()/.tolist() per step (each is a host-device sync on a GPU);
    the counters are read once per logging step."""
    reads = []
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, _o=original, _m=method: reads.append(_m) or _o(self))
    counter, preemption = TokenCounter(), PreemptionCallback()
    masks = {"anchor_attention_mask": torch.ones(4, 9, dtype=torch.long), "positive_attention_mask": torch.ones(4, 30)}

    class State:
        global_step = 1

    for _ in range(5):
        counter.add(masks)
        preemption.on_step_end(None, State(), type("Control", (), {})())
    assert reads == []
    squares = 5 * (4 * 81 + 4 * 900)
    assert counter.read() == (20.0, 5 * (36 + 120), squares, squares, 5 * (36 + 120)) and reads == ["tolist"]


def test_the_unpadded_forward_syncs_once(tiny_model, monkeypatch):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    unpadded.enable_unpadded(model)
    reads = []
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, _o=original, _m=method: reads.append(_m) or _o(self))
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("nonzero syncs to size its output"))
    model(model.preprocess(TEXTS))
    assert reads == ["tolist"]


def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    cuda = torch.device("cuda")
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert models.bf16_native(cuda) is native
        assert models.compute_dtype(cuda) == (torch.bfloat16 if native else torch.float32)
    assert models.bf16_native(torch.device("cpu")) is False


def test_encoder_pads_with_numpy_not_the_tokenizer(tiny_model, monkeypatch):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    reference = encode_fast(model, TEXTS * 3, token_budget=128)
    monkeypatch.setattr(type(model.tokenizer), "pad", lambda *a, **k: pytest.fail("tokenizer.pad is GIL-bound"))
    assert torch.equal(encode_fast(model, TEXTS * 3, token_budget=128), reference)


def test_the_unused_pooler_is_frozen_so_ddp_needs_no_search(tiny_model):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    assert models.freeze_unused_pooler(model) == 2  # dense weight and bias
    MultipleNegativesRankingLoss(model)([model.preprocess(TEXTS[:2]), model.preprocess(TEXTS[2:])], None).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # every trainable parameter gets a gradient: find_unused_parameters=False is safe


def test_gpu_defaults_pretokenize_and_feed_workers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = cli.parse_args(["--stage", "sample"])
    assert args.pretokenize is True and args.dataloader_num_workers == 2
    args = cli.parse_args(["--stage", "sample", "--no_pretokenize", "--dataloader_num_workers", "0"])
    assert args.pretokenize is False and args.dataloader_num_workers == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cli.parse_args(["--stage", "sample"])
    assert args.pretokenize is False and args.dataloader_num_workers == 0


def test_gpu_check_refuses_to_run_without_a_gpu():
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**subprocess_env(), "PYTHON": sys.executable}, cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA GPU")


def test_the_probe_leaves_the_random_stream_alone(monkeypatch):
    """When the probe runs inside a first forward, GradCache and checkpointing replay that forward's dropout from
    the RNG state: the probe's random inputs must not advance it."""
    monkeypatch.setattr(unpadded, "_varlen_attention", lambda q, k, v, cu, n, window=None: q * k + v)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert unpadded.varlen_usable(torch.device("cpu"), torch.bfloat16)
    assert torch.equal(torch.rand(4), expected)
