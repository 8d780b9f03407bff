"""What the GPU path relies on, checked where a CPU can check it: the varlen fallback's rules, one backward node for
QKV, gradient checkpointing on the unpadded loop, no host-device sync in the step path, bf16 only where native,
the encoder's padding, frozen pooler, GPU defaults, and gpu_check.sh refusing to run without a GPU."""

import os
import traceback
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch.overrides import TorchFunctionMode

from helpers import build_tiny_model
from model_exploration import cli, models, unpadded
from model_exploration.encoding import encode_fast
from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss
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


def test_accelerator_errors_are_sorted_by_what_they_mean(monkeypatch, caplog):
    """torch.AcceleratorError is raised for a missing kernel image as for a device fault: a missing kernel falls
    back (with a warning), out of memory is a resource error (retry smaller), anything else the device raises
    surfaces."""
    accelerator_error = torch.AcceleratorError
    cases = {
        "CUDA error: no kernel image is available for execution on the device": "missing_kernel",
        "CUDA error: invalid device function": "missing_kernel",
        "CUDA error: out of memory": "resource",
        "CUDA error: an illegal memory access was encountered": "device",
        "CUDA error: device-side assert triggered": "device",
    }
    for message, kind in cases.items():
        assert unpadded.device_error_kind(accelerator_error(message)) == kind, message
    assert unpadded.device_error_kind(TypeError("unexpected keyword argument 'window_size'")) == "other"
    device, dtype = torch.device("cpu"), torch.bfloat16
    for message, usable in (("CUDA error: no kernel image is available for execution on the device", False),
                            ("CUDA error: an illegal memory access was encountered", None)):  # fmt: skip
        unpadded._varlen_usable.clear()
        monkeypatch.setattr(
            unpadded, "_varlen_attention", lambda *a, m=message: (_ for _ in ()).throw(accelerator_error(m))
        )
        if usable is None:
            with pytest.raises(accelerator_error):
                unpadded.varlen_usable(device, dtype)
        else:
            assert unpadded.varlen_usable(device, dtype) is usable
            assert "AcceleratorError: CUDA error: no kernel image" in caplog.text


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


class HostReads(TorchFunctionMode):
    """Records what would stall the host on a GPU: reading device values (.item(), .tolist(), bool(), a nonzero
    whose output size depends on the data, .cpu()), tensors created on the host (a factory without `device`) and
    copies to a named device; each entry names our code's line that asked for it."""

    SYNCS = {"tolist", "item", "__bool__", "nonzero", "cpu", "numpy", "__int__", "__float__", "__index__"}
    FACTORIES = {"arange", "tensor", "zeros", "ones", "full", "empty", "as_tensor"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_device = name == "to" and any(isinstance(a, (str, torch.device)) for a in args[1:])
        if name in self.SYNCS or (name in self.FACTORIES and "device" not in kwargs) or to_device:
            caller = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}torch{os.sep}" not in f.filename][-1]
            self.calls.append(f"{name} at {Path(caller.filename).name}:{caller.lineno}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", ["bert", "roberta", "modernbert", "mpnet"])
@pytest.mark.parametrize("cached", [False, True], ids=["mnrl", "gradcache"])
def test_a_step_reads_nothing_back_from_the_device_given_host_lengths(arch, cached, tmp_path):
    """MNRL and GradCache, forward and backward, on a batch with mixed-length buckets: with the lengths our
    collators count on the host, nothing is read back from the device and nothing is built on the host (masks,
    slots, MPNet's position bias); without them, one read per forward (and sentence-transformers' GradCache adds
    its own per chunk, which our chunking replaces when the lengths are there)."""
    model = SentenceTransformer(str(build_tiny_model(tmp_path, arch=arch, dropout=0.0)), device="cpu")
    unpadded.enable_unpadded(model)
    loss = GatheredCachedMNRLoss(model, mini_batch_size=3) if cached else GatheredMNRLoss(model)
    queries = [f"query number {i} about things" + " more" * (i % 3) for i in range(8)]
    passages = ["passage text " * (10 + i % 4) for i in range(8)]
    for host in (True, False):
        features = [model.preprocess(queries), model.preprocess(passages)]
        if host:
            for f in features:
                f[unpadded.HOST_LENGTHS] = f["attention_mask"].sum(1).tolist()
        with HostReads() as reads:
            loss([dict(f) for f in features], None).backward()
        ours = [c for c in reads.calls if c.split(" at ")[1].startswith(("unpadded.py", "losses.py"))]
        if host:
            assert reads.calls == []
        else:  # the lengths' read in _pack, once per forward (GradCache: per chunk), and nothing else of ours
            assert (
                len(ours) >= (6 if cached else 2) and len(set(ours)) == 1 and ours[0].startswith("tolist at unpadded")
            )


def test_the_trainer_hands_the_collators_host_lengths_to_the_forward(tmp_path, monkeypatch):
    """Pre-tokenized pairs through the real trainer (collation, device placement, sentence-transformers' feature
    routing): every forward gets the collator's lengths."""
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformerTrainingArguments

    from model_exploration import pretokenize
    from model_exploration.training import MixtureTrainer

    model = SentenceTransformer(str(build_tiny_model(tmp_path, arch="roberta")), device="cpu")
    unpadded.enable_unpadded(model)
    given = []
    pack = unpadded._pack
    monkeypatch.setattr(unpadded, "_pack", lambda ids, mask, host=None: given.append(host) or pack(ids, mask, host))
    pairs = Dataset.from_dict({"anchor": [t[:20] for t in TEXTS * 4], "positive": TEXTS * 4})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    collator = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer,
                                                host_lengths=unpadded.is_enabled(model))  # fmt: skip
    MixtureTrainer(model=model, args=args, loss=GatheredMNRLoss(model), data_collator=collator,
                   train_dataset=DatasetDict({"pairs": pretokenize.tokenize_columns(pairs, model.tokenizer, 128)}),
                   source_weights={"pairs": 1.0}).train()  # fmt: skip
    assert len(given) == 4 and all(isinstance(lengths, list) and len(lengths) == 4 for lengths in given)


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


def test_the_probe_leaves_the_random_stream_alone(monkeypatch):
    """When the probe runs inside a first forward, GradCache and checkpointing replay that forward's dropout from
    the RNG state: the probe's random inputs must not advance it."""
    monkeypatch.setattr(unpadded, "_varlen_attention", lambda q, k, v, cu, n, window=None: q * k + v)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert unpadded.varlen_usable(torch.device("cpu"), torch.bfloat16)
    assert torch.equal(torch.rand(4), expected)
