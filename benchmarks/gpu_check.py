"""The checks of benchmarks/gpu_check.sh that are not train_throughput.py runs, and its closing summary.

    python benchmarks/gpu_check.py install --wheels W --site S  # the wheels into S, with pip or without it
    python benchmarks/gpu_check.py versions --out OUT           # one line: python, torch, CUDA, GPU, libraries
    python benchmarks/gpu_check.py sample --scratch S -- ARGS   # --stage sample run of INDUS-SDE's random RoBERTa
    python benchmarks/gpu_check.py probe --out OUT --scratch S  # attention values, equal (per architecture), syncs
    python benchmarks/gpu_check.py summary --out OUT --scratch S   # the table and the closing line

Every result is appended as one JSON line to OUT/gpu_check.jsonl the moment it exists (train_throughput.py's rows
land in the same file), so a step stopped at its time limit loses only what it had not measured yet. A failed check
is recorded with its error and the next one runs. With GPU_CHECK_REHEARSAL=1 the same checks run on CPU at tiny
shapes (gpu_check.sh passes them); CUDA-only checks are recorded as skipped there, never as passed.

  attention  the attention kernels' values (model_exploration/attention_check.py): varlen_attn (CUDA) and the
             bucketed SDPA path against a dense fp32 reference, bf16, peaked softmax, lengths 300/129/65/64/1, with
             and without a 64-token window, outputs and gradients; on CUDA varlen_attn must be usable
  equal      per architecture (BERT, INDUS-SDE's RoBERTa at 1,024, ModernBERT, MPNet), a model whose attention
             matters through the stock and the unpadded forward in the training dtype: token states, MNRL loss and
             gradients against the stock fp32 forward, at most a few times the stock forward's own error; on CUDA
             the varlen kernel used (no fallback to bucketed SDPA)
  syncs      host-device synchronizations per optimizer step of our trainer (pre-tokenized pairs, host lengths,
             pinned memory), counted by torch.cuda.set_sync_debug_mode("warn") over steps 3..7, per architecture
             and for GradCache; the goal is at most one
A speed-up is reported only when the equality it depends on held in this run (training: `equal` of its
architecture; encoding: the rows' own agreement), else it is marked invalid.
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

# dense (not sparse) bf16 tensor-core TFLOP/s from NVIDIA's data sheets; the first name the GPU's name contains wins
SPEC_PEAK_TFLOPS = (("H200 NVL", 835), ("H200", 989), ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989),
                    ("A100", 312), ("L40S", 362))  # fmt: skip
SYNC_GOAL = 1  # host-device syncs per optimizer step
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


def install(wheels: Path, site: Path, unpack: bool = False) -> str:
    """The wheels of `wheels` into `site`, without their dependencies (the image's torch and transformers stay): with
    pip where the image has it, else (or with `unpack`) by unpacking them, which is all pip does for these
    pure-Python wheels (a wheel's *.data/purelib and platlib land in the site root, as pip puts them). Returns how."""
    import importlib.util
    import shutil
    import subprocess
    import zipfile

    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise FileNotFoundError(f"no .whl files in {wheels}")
    site.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is not None and not unpack:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *map(str, files)], check=True)  # fmt: skip
        return "pip"
    for wheel in files:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for data in site.glob("*.data"):
        for scheme in ("purelib", "platlib"):
            for item in (data / scheme).glob("*"):
                if item.is_dir():
                    shutil.copytree(item, site / item.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(item, site / item.name)
        shutil.rmtree(data)
    return "unpacked"


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
    """The bundled pairs' queries and passages (train_throughput.py's real-text mix)."""
    data = throughput_script().mix_pairs("real", n, seed)
    return data["anchor"], data["positive"]


def check_attention() -> dict:
    """The attention kernels against the dense reference in bf16 (attention_check.check_kernels); on CUDA
    varlen_attn must be among them, with and without a window."""
    import torch

    from model_exploration import attention_check

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = attention_check.check_kernels(device, torch.bfloat16)
    failures = report.pop("failures")
    if device.type == "cuda":
        failures += [f"varlen_attn unusable{' with a window' if w else ''} (see probe.log)"
                     for w in (None, 64) if f"varlen window={w}" not in report]  # fmt: skip
    if failures:
        raise RuntimeError("; ".join(failures))
    return {"errors": report}


def counted(fn, calls: dict, key: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)

    return wrapper


def check_equal(model_dir: Path, max_len: int) -> dict:
    """attention_check.check_model in the training dtype (bf16; also in the CPU rehearsal), with the model's
    longest input among the lengths; on CUDA the varlen kernel must serve every attention call."""
    import torch
    from sentence_transformers import SentenceTransformer

    from model_exploration import attention_check, unpadded
    from model_exploration.models import device

    dev = device()
    model = SentenceTransformer(str(model_dir), device=str(dev))
    model.max_seq_length = max_len
    calls = {"varlen": 0, "bucketed": 0}
    originals = {attr: getattr(unpadded, attr) for attr in ("_varlen_attention", "_bucketed_attention")}
    for kernel, attr in (("varlen", "_varlen_attention"), ("bucketed", "_bucketed_attention")):
        setattr(unpadded, attr, counted(originals[attr], calls, kernel))
    try:
        lengths = (max_len, *attention_check.KERNEL_LENGTHS)
        report = attention_check.check_model(model, torch.bfloat16, lengths)
    finally:
        for attr, fn in originals.items():
            setattr(unpadded, attr, fn)
    failures = report.pop("failures")
    cuda = dev.type == "cuda"
    arch = model[0].auto_model.config.model_type
    if cuda and arch != "mpnet":  # MPNet's score bias always takes the bucketed path (varlen_attn takes no bias)
        failures += ["the bucketed fallback ran" if calls["bucketed"] else "", "" if calls["varlen"] else
                     "varlen_attn never ran"]  # fmt: skip
    failures = [f for f in failures if f]
    if failures:
        raise RuntimeError(f"unpadded != stock: {'; '.join(failures)} ({report})")
    return report | calls


def check_syncs(model_dir: Path, work: Path, cached: bool = False, steps: tuple[int, int] = (3, 8)) -> dict:
    """Synchronizing CUDA calls per optimizer step of our trainer (pre-tokenized pairs with host lengths, pinned
    memory, batch 32; GradCache in chunks of 8 with `cached`), counted by torch's sync debug mode over steps
    [first, last)."""
    import torch
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from model_exploration import pretokenize, unpadded
    from model_exploration.losses import GatheredCachedMNRLoss, GatheredMNRLoss
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
    loss = GatheredCachedMNRLoss(model, mini_batch_size=8) if cached else GatheredMNRLoss(model)
    trainer = MixtureTrainer(
        model=model, args=args, train_dataset=DatasetDict({"pairs": tokens}), loss=loss,
        source_weights={"pairs": 1.0}, callbacks=[SyncCounter()],
        data_collator=pretokenize.PretokenizedCollator(preprocess_fn=model.preprocess, tokenizer=model.tokenizer,
                                                       host_lengths=True),
    )  # fmt: skip
    trainer.train()
    per_step = sum(syncs) / len(syncs)
    return {"syncs_per_step": per_step, "syncs_by_step": syncs, "goal_met": per_step <= SYNC_GOAL}


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


# the architectures the workflow trains, at the shape of their base models: (arch, preset)
EQUALITY_MODELS = (("bert", "bert-base"), ("roberta", "indus-sde"), ("modernbert", "bert-base"), ("mpnet", "bert-base"))


def probe(out: Path, scratch: Path) -> int:
    """The value checks, before any timing: attention kernels, then stock == unpadded per architecture, then the
    syncs of a training step per architecture and for GradCache (CUDA only)."""
    import torch

    cuda = torch.cuda.is_available()
    ok = attempt(out, "attention", check_attention)
    for arch, preset in EQUALITY_MODELS:
        max_len = 128 if REHEARSAL else throughput_script().PRESETS[preset]["max_len"]
        ok &= attempt(out, "equal", lambda a=arch, p=preset, m=max_len: check_equal(build(scratch, a, p), m),
                      arch=arch, preset=preset)  # fmt: skip
    for arch, preset, cached in [(a, p, False) for a, p in EQUALITY_MODELS] + [("bert", "bert-base", True)]:
        if not cuda:
            record(out, "syncs", arch=arch, cached=cached, ok=None,
                   skipped="no CUDA (CPU rehearsal): host-device syncs exist on CUDA only")  # fmt: skip
            continue
        ok &= attempt(out, "syncs", lambda a=arch, p=preset, c=cached: check_syncs(build(scratch, a, p), scratch, c),
                      arch=arch, cached=cached)  # fmt: skip
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


def spec_peak_tflops(gpu: str) -> float | None:
    return next((peak for name, peak in SPEC_PEAK_TFLOPS if name in gpu), None)


HEADLINE = {"bert-base": "", "indus-sde": "indus_"}  # figure name prefix per preset


def speedup_figures(log: list[dict]) -> list[str]:
    """speedup_<kind>_<mix>=X per measured ratio (train_throughput.py's `ratios` lines), each valid only if the
    equality it rests on held in this run: `equal` of its architecture for training, the encoders' agreement for
    encoding."""
    equal_ok = {e["arch"] for e in log if e["kind"] == "equal" and e.get("ok")}
    figures = []
    for entry in (e for e in log if e["kind"] == "ratios" and e["preset"] in HEADLINE):
        prefix = HEADLINE[entry["preset"]]
        for key, ratio in entry["ratios"].items():
            if key not in ("train", "model", "cached", "encode"):
                continue
            name = f"{prefix}speedup_{key}_{entry['mix']}"
            if key == "encode" and not entry.get("encode_agree", False):
                figures.append(f"{name}=invalid(encode disagrees: min cosine {entry.get('min_cosine')})")
            elif key != "encode" and entry["arch"] not in equal_ok:
                figures.append(f"{name}=invalid(equal/{entry['arch']} did not pass)")
            else:
                figures.append(f"{name}={ratio['median']:.2f}")
    return figures


def summary(out: Path, scratch: Path) -> int:
    """The measured table and the closing line (what failed, what was skipped, each valid speed-up)."""
    log = read_log(out)
    version = next((e for e in log if e["kind"] == "versions"), {})
    gpu = version.get("gpu", "?")
    spec = spec_peak_tflops(gpu)
    rows = [e for e in log if e["kind"] == "row"]
    sample = sample_run_mfu(scratch)
    if sample:
        record(out, "sample_run", **{k: sample[k] for k in ("pairs_per_s", "tokens_per_s", "mfu",
                                                            "model_tflops_per_device") if k in sample})  # fmt: skip
    print("\n| preset | arch | mix | path | pairs/s (passages/s) [IQR] | padding | MFU (measured peak) | "
          "MFU (spec peak) | peak GB | batch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kind = "pairs" if "pairs_per_s" in row else "passages"
        iqr = f" [{row[f'{kind}_per_s_p25']:.1f}-{row[f'{kind}_per_s_p75']:.1f}]" if f"{kind}_per_s_p25" in row else ""
        tflops = row.get("model_tflops_per_device")
        spec_mfu = f"{tflops / spec:.1%}" if tflops and spec and not REHEARSAL else ""
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else ""
        padding = f"{row['padding_share']:.0%}" if row.get("padding_share") is not None else ""
        peak = f"{row['peak_gb']:.1f}" if row.get("peak_gb") is not None else ""
        print(f"| {row['preset']} | {row['arch']} | {row.get('mix', '')} | {row['path']} | "
              f"{row[f'{kind}_per_s']:.1f}{iqr} | {padding} | {mfu} | {spec_mfu} | {peak} | {row.get('batch_size', '')} |")  # fmt: skip
    figures = speedup_figures(log)
    ours_bert = next((r for r in rows if (r["preset"], r["arch"], r["path"]) == ("bert-base", "bert", "ours mnrl")), {})
    if ours_bert.get("model_tflops_per_device") and spec and not REHEARSAL:
        figures.append(f"mfu_spec={ours_bert['model_tflops_per_device'] / spec:.3f}")
    if sample:
        figures.append(f"sample_mfu={sample['mfu']:.3f}")
    syncs = [e for e in log if e["kind"] == "syncs" and e.get("ok")]
    if syncs:
        per_arch = ",".join(
            f"{e['arch']}{'-cached' if e.get('cached') else ''}:{e['syncs_per_step']:.1f}" for e in syncs
        )
        figures.append(f"syncs_per_step={per_arch}")
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
    parser.add_argument("step", choices=["install", "versions", "probe", "sample", "summary"])
    parser.add_argument("--out", type=Path, help="the small-files folder ($OUT)")
    parser.add_argument("--scratch", type=Path, help="models and runs (never in --out)")
    parser.add_argument("--wheels", type=Path, help="install: the folder of wheels")
    parser.add_argument("--site", type=Path, help="install: where they go (put on PYTHONPATH)")
    parser.add_argument("--unpack", action="store_true", help="install: unpack even where pip exists")
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)  # after "--": the entry script's flags (sample)
    if args.step == "install":
        print(f"installed {len(list(args.wheels.glob('*.whl')))} wheels into {args.site} "
              f"({install(args.wheels, args.site, args.unpack)})")  # fmt: skip
        return 0
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
