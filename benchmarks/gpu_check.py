"""The checks of benchmarks/gpu_check.sh that are not train_throughput.py runs, and its closing summary.

    python benchmarks/gpu_check.py versions --out OUT           # one line: python, torch, CUDA, GPU, libraries
    python benchmarks/gpu_check.py sample --scratch S -- ARGS   # --stage sample run of INDUS-SDE's random RoBERTa
    python benchmarks/gpu_check.py probe --out OUT --scratch S  # varlen, equal (per architecture), syncs
    python benchmarks/gpu_check.py summary --out OUT --scratch S   # the table and the closing line

Every result is appended as one JSON line to OUT/gpu_check.jsonl the moment it exists (train_throughput.py's rows
land in the same file), so a step stopped at its time limit loses only what it had not measured yet. A failed check
is recorded with its error and the next one runs. With GPU_CHECK_REHEARSAL=1 the same checks run on CPU at tiny
shapes (gpu_check.sh passes them); CUDA-only checks are recorded as skipped there, never as passed.

  varlen   torch.nn.attention.varlen imports; varlen_attn runs forward and backward in bf16, with and without a
           sliding window
  equal    per architecture (BERT, INDUS-SDE's RoBERTa, ModernBERT), random init, stock vs unpadded forward under
           the training dtype: embedding cosine >= 0.999, MNRL loss and gradients within tolerance (bf16 on CUDA), and
           on CUDA the varlen kernel used (no fallback to bucketed SDPA)
  syncs    host-device synchronizations per training step of our trainer, counted by
           torch.cuda.set_sync_debug_mode("warn") over steps 3..7
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

from model_exploration.keys import REPO_ROOT

SPEC_PEAK_TFLOPS = {"H100": 989, "H200": 989}  # dense bf16, NVIDIA's data sheets (SXM)
REHEARSAL = os.environ.get("GPU_CHECK_REHEARSAL") == "1"
LOG_NAME = "gpu_check.jsonl"
# the shapes of the rehearsal: seconds on one CPU core, every code path of the GPU run
TINY = dict(hidden=64, layers=2, heads=2, intermediate=128)


def record(out: Path, kind: str, **fields) -> dict:
    """Append one result to OUT/gpu_check.jsonl at once and echo it."""
    entry = {"kind": kind, "rehearsal": REHEARSAL, **fields}
    with open(out / LOG_NAME, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    print(f"{kind}: {json.dumps(fields, default=str)}", flush=True)
    return entry


def read_log(out: Path) -> list[dict]:
    path = out / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def throughput_script():
    """benchmarks/train_throughput.py as a module (its data, presets and model builder)."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("train_throughput", REPO_ROOT / "benchmarks" / "train_throughput.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape(preset: str) -> dict:
    """The preset's model shape, or the rehearsal's tiny one."""
    bench = throughput_script()
    return {**bench.PRESETS[preset], **(TINY if REHEARSAL else {})}


def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(out: Path) -> None:
    """One line with what the check runs on: read from package metadata (nothing heavy is imported but torch)."""
    import torch

    fields = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"}  # fmt: skip
    for package in ("transformers", "sentence-transformers", "tokenizers", "pyarrow", "datasets", "huggingface-hub"):
        fields[package] = version_of(package) or "absent"
    print("versions: " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
    with open(out / LOG_NAME, "a") as f:
        f.write(json.dumps({"kind": "versions", "rehearsal": REHEARSAL, **fields}) + "\n")


def build(scratch: Path, arch: str, preset: str) -> Path:
    """A random-init model of `arch` at the preset's shape (tiny in rehearsal), under scratch/<arch>-<preset>."""
    bench = throughput_script()
    folder = scratch / f"{arch}-{preset}"
    if not (folder / "model" / "modules.json").exists():
        bench.build_model(folder, shape(preset), arch, bench.PRESETS[preset]["max_len"], seed=0)
    return folder / "model"


def texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Queries ~14 words, passages lognormal around 160 words, from SciFact's vocabulary (the benchmark's mix)."""
    bench = throughput_script()
    data = bench.synthetic_pairs(n, seed, bench.corpus_words())
    return data["anchor"], data["positive"]


def check_varlen() -> dict:
    import torch
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401 - the import itself is part of the check

    from model_exploration import unpadded

    usable = {f"windowed={w}": unpadded.varlen_usable(torch.device("cuda"), torch.bfloat16, w) for w in (False, True)}
    if not all(usable.values()):
        raise RuntimeError(f"varlen_attn not usable in bf16 ({usable}; see the warning in probe.log)")
    return usable


def counted(fn, calls: dict, key: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)

    return wrapper


def check_equal(model_dir: Path, max_len: int) -> dict:
    """Stock vs unpadded forward under the training dtype, eval mode (no dropout): same embeddings, loss and
    gradients within tolerance, and on CUDA the varlen kernel used for every attention call."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from model_exploration import unpadded
    from model_exploration.models import bf16_native, device

    dev = device()
    queries, passages = texts(16 if REHEARSAL else 64)
    results = {}
    for name in ("stock", "unpadded"):
        model = SentenceTransformer(str(model_dir), device=str(dev))
        model.max_seq_length = max_len
        calls = {"varlen": 0, "bucketed": 0}
        if name == "unpadded":
            unpadded.enable_unpadded(model)
            for kernel, attr in (("varlen", "_varlen_attention"), ("bucketed", "_bucketed_attention")):
                setattr(unpadded, attr, counted(getattr(unpadded, attr), calls, kernel))
        model.eval()
        features = [model.preprocess(queries), model.preprocess(passages)]
        features = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16_native(dev)):
            embeddings = model(dict(features[1]))["sentence_embedding"].float().detach()
            model.zero_grad()
            loss = MultipleNegativesRankingLoss(model)([dict(f) for f in features], None)
        loss.backward()
        grads = torch.cat(
            [p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None and "pooler" not in n]
        )
        results[name] = {"embeddings": embeddings, "loss": loss.item(), "grads": grads, "calls": calls}
        for attr in ("_varlen_attention", "_bucketed_attention"):  # undo the counting wrappers
            if hasattr(getattr(unpadded, attr), "__wrapped__"):
                setattr(unpadded, attr, getattr(unpadded, attr).__wrapped__)
    stock, fast = results["stock"], results["unpadded"]
    cosine = torch.nn.functional.cosine_similarity(stock["embeddings"], fast["embeddings"]).min().item()
    loss_rel = abs(stock["loss"] - fast["loss"]) / abs(stock["loss"])
    grad_rel = ((stock["grads"] - fast["grads"]).norm() / stock["grads"].norm()).item()
    report = {"min_cosine": cosine, "loss_rel_err": loss_rel, "grad_rel_err": grad_rel, **fast["calls"]}
    cuda = dev.type == "cuda"
    failures = [
        f"min cosine {cosine:.5f} < 0.999" if cosine < 0.999 else "",
        f"loss relative error {loss_rel:.2e} > 2e-2" if loss_rel > 2e-2 else "",
        f"gradient relative error {grad_rel:.2e} > 5e-2" if grad_rel > 5e-2 else "",
        "the bucketed fallback ran" if cuda and fast["calls"]["bucketed"] else "",
        "varlen_attn never ran" if cuda and not fast["calls"]["varlen"] else "",
    ]
    if any(failures):
        raise RuntimeError(f"unpadded != stock: {'; '.join(f for f in failures if f)} ({report})")
    return report


def check_syncs(model_dir: Path, work: Path, steps: tuple[int, int] = (3, 8)) -> dict:
    """Synchronizing CUDA calls per optimizer step of our trainer (pre-tokenized pairs, pinned memory, batch 32),
    counted by torch's sync debug mode over steps [first, last)."""
    import torch
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from model_exploration import pretokenize, unpadded
    from model_exploration.losses import GatheredMNRLoss
    from model_exploration.models import freeze_unused_pooler
    from model_exploration.training import MixtureTrainer

    model = SentenceTransformer(str(model_dir), device="cuda")
    model.max_seq_length = 256
    unpadded.enable_unpadded(model)
    freeze_unused_pooler(model)
    queries, passages = texts(32 * (steps[1] + 2), seed=1)
    pairs = Dataset.from_dict({"anchor": queries, "positive": passages})
    tokens = pretokenize.tokenize_columns(pairs, model.tokenizer, model.max_seq_length)
    first, last = steps
    syncs: list[int] = []

    class SyncCounter(TrainerCallback):
        def __init__(self):
            self.caught = None

        def on_step_begin(self, args, state, control, **kwargs):
            if first <= state.global_step < last:
                self.caught = warnings.catch_warnings(record=True)
                self.records = self.caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if self.caught is not None:
                torch.cuda.set_sync_debug_mode(0)
                syncs.append(sum("synchroniz" in str(w.message) for w in self.records))
                self.caught.__exit__(None, None, None)
                self.caught = None

    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "syncs"), per_device_train_batch_size=32, max_steps=last + 1, learning_rate=1e-5,
        warmup_steps=0, bf16=True, report_to="none", save_strategy="no", logging_steps=10**9, disable_tqdm=True,
        logging_nan_inf_filter=False, accelerator_config={"non_blocking": True}, dataloader_num_workers=2,
    )  # fmt: skip
    trainer = MixtureTrainer(
        model=model, args=args, train_dataset=DatasetDict({"pairs": tokens}), loss=GatheredMNRLoss(model),
        source_weights={"pairs": 1.0}, callbacks=[SyncCounter()],
        data_collator=pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer),
    )  # fmt: skip
    trainer.train()
    return {"syncs_per_step": sum(syncs) / len(syncs), "syncs_by_step": syncs}


def attempt(out: Path, kind: str, fn, *args, **fields) -> bool:
    """Run one check, record its result or its error, and let the next one run."""
    started = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failed check is a result: recorded, and the others still run
        traceback.print_exc()
        message = str(exc).splitlines()[0][:400] if str(exc) else ""
        record(out, kind, **fields, ok=False, error=f"{type(exc).__name__}: {message}")
        return False
    record(out, kind, **fields, ok=True, seconds=round(time.perf_counter() - started, 1), **result)
    return True


def probe(out: Path, scratch: Path) -> int:
    import torch

    cuda = torch.cuda.is_available()
    ok = True
    if cuda:
        ok &= attempt(out, "varlen", check_varlen)
    else:
        record(out, "varlen", ok=None, skipped="no CUDA (CPU rehearsal): varlen_attn is a CUDA kernel")
    # INDUS-SDE's RoBERTa at its 1,024 tokens, BERT-base at 512, ModernBERT-base's layout (windows of 128)
    for arch, preset in (("bert", "bert-base"), ("roberta", "indus-sde"), ("modernbert", "bert-base")):
        max_len = 64 if REHEARSAL else throughput_script().PRESETS[preset]["max_len"]
        ok &= attempt(out, "equal", lambda a=arch, p=preset, m=max_len: check_equal(build(scratch, a, p), m),
                      arch=arch, preset=preset)  # fmt: skip
    if cuda:
        ok &= attempt(out, "syncs", lambda: check_syncs(build(scratch, "bert", "bert-base"), scratch))
    else:
        record(out, "syncs", ok=None, skipped="no CUDA (CPU rehearsal): host-device syncs exist on CUDA only")
    return 0 if ok else 1


def sample(scratch: Path, extra: list[str]) -> int:
    """The entry script's --stage sample run (the bundled pairs, no benchmark) on a random RoBERTa of INDUS-SDE's
    shape: the trainer's own logged pairs/s and MFU."""
    from model_exploration import st_trainer_ddp_hf

    model = build(scratch, "roberta", "indus-sde")
    return st_trainer_ddp_hf.main(["--stage", "sample", "--model_name", str(model), "--output_base",
                                   str(scratch / "sample_run"), "--gradient_accumulation_steps", "1",
                                   "--max_datapoints_per_src_for_eval", "0", "--eval_benchmarks", "--wb_mode",
                                   "disabled", *extra])  # fmt: skip


def sample_run_mfu(scratch: Path) -> dict | None:
    """The last logged throughput of the 30-step --stage sample run (its trainer state in scratch)."""
    states = sorted((scratch / "sample_run").glob("*/checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    logged = [h for h in json.loads(states[-1].read_text())["log_history"] if "mfu" in h]
    return logged[-1] if logged else None


def summary(out: Path, scratch: Path) -> int:
    """The measured table and the closing line (what failed, what was skipped, each speed-up that exists)."""
    log = read_log(out)
    version = next((e for e in log if e["kind"] == "versions"), {})
    gpu = version.get("gpu", "?")
    spec = next((peak for name, peak in SPEC_PEAK_TFLOPS.items() if name in gpu), None)
    rows = [e for e in log if e["kind"] == "row"]
    sample = sample_run_mfu(scratch)
    if sample:
        record(out, "sample_run", **{k: sample[k] for k in ("pairs_per_s", "tokens_per_s", "mfu",
                                                            "model_tflops_per_device") if k in sample})  # fmt: skip
    print("\n| preset | arch | path | pairs/s (passages/s) | MFU (measured peak) | MFU (spec peak) | peak GB |")
    print("|---|---|---|---|---|---|---|")
    rate: dict[tuple, float] = {}
    for row in rows:
        value = row.get("pairs_per_s", row.get("passages_per_s"))
        rate[(row["preset"], row["arch"], row["path"])] = value
        tflops = row.get("model_tflops_per_device")
        spec_mfu = f"{tflops * 1e12 / (spec * 1e12):.1%}" if tflops and spec and not REHEARSAL else ""
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else ""
        peak = f"{row['peak_gb']:.1f}" if row.get("peak_gb") is not None else ""
        print(f"| {row['preset']} | {row['arch']} | {row['path']} | {value:.1f} | {mfu} | {spec_mfu} | {peak} |")
    figures = []
    for name, preset, arch, ours, plain in (
        ("speedup_train", "bert-base", "bert", "ours mnrl", "plain mnrl"),
        ("speedup_model", "bert-base", "bert", "ours mnrl", "plain mnrl pretok"),
        ("speedup_encode", "bert-base", "bert", "ours encode", "plain encode"),
        ("speedup_cached", "bert-base", "bert", "ours cached", "plain cached"),
        ("indus_speedup_train", "indus-sde", "roberta", "ours mnrl", "plain mnrl"),
    ):
        if (preset, arch, ours) in rate and (preset, arch, plain) in rate:
            figures.append(f"{name}={rate[(preset, arch, ours)] / rate[(preset, arch, plain)]:.2f}")
    ours_bert = next((r for r in rows if (r["preset"], r["arch"], r["path"]) == ("bert-base", "bert", "ours mnrl")), {})
    if ours_bert.get("model_tflops_per_device") and spec and not REHEARSAL:
        figures.append(f"mfu_spec={ours_bert['model_tflops_per_device'] / spec:.3f}")
    if sample:
        figures.append(f"sample_mfu={sample['mfu']:.3f}")
    syncs = next((e for e in log if e["kind"] == "syncs" and e.get("ok")), None)
    if syncs:
        figures.append(f"syncs_per_step={syncs['syncs_per_step']:.1f}")
    failed = [f"{e['kind']}{'/' + e['arch'] if 'arch' in e else ''}" for e in log if e.get("ok") is False]
    failed += [f"step {e['name']} (exit {e['rc']})" for e in log if e["kind"] == "step" and e["rc"] != 0]
    skipped = [f"step {e['name']}" for e in log if e["kind"] == "step" and e.get("skipped")]
    head = "gpu_check (CPU rehearsal: no GPU figure)" if REHEARSAL else f"gpu_check {gpu} {time.strftime('%Y-%m-%d')}"
    closing = f"{head}: {' '.join(figures) or 'no figure measured'}; failed: {', '.join(failed) or 'none'}"
    if skipped:
        closing += f"; skipped (deadline): {', '.join(skipped)}"
    record(out, "closing", line=closing)
    print(closing)
    return 3 if failed or skipped else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["versions", "probe", "sample", "summary"])
    parser.add_argument("--out", type=Path, help="the small-files folder ($OUT)")
    parser.add_argument("--scratch", type=Path, help="models and runs (never in --out)")
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)  # after "--": the entry script's flags (sample)
    if args.step == "versions":
        versions(args.out)
        return 0
    if args.step == "sample":
        return sample(args.scratch, extra)
    if args.step == "probe":
        return probe(args.out, args.scratch)
    return summary(args.out, args.scratch)


if __name__ == "__main__":
    sys.exit(main())
