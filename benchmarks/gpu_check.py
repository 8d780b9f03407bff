"""The GPU check of the fast path, in the order a failure is most informative (run by gpu_check.sh):

  versions   torch / CUDA / GPU / transformers / sentence-transformers / datasets
  varlen     CUDA present; torch.nn.attention.varlen imports; varlen_attn runs forward and backward in bf16
  equal      a random BERT-base, stock vs unpadded forward on CUDA under bf16 autocast: embedding cosine >= 0.999,
             MNRL loss and gradients within bf16 tolerance, and the varlen kernel used (no fallback)
  syncs      host-device synchronizations per training step of our trainer, counted by
             torch.cuda.set_sync_debug_mode("warn") over steps 3..7
  summary    reads train_throughput.py's JSON and the 30-step --stage sample run, prints the closing line

    python benchmarks/gpu_check.py probe --out DIR     # versions, varlen, equal, syncs -> DIR/probe.json
    python benchmarks/gpu_check.py summary --out DIR   # -> gpu_check: speedup_train=... syncs_per_step=...

Without a GPU it exits with status 2 and one line, instead of printing CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from model_exploration.keys import REPO_ROOT

SPEC_PEAK_TFLOPS = {"H100": 989, "H200": 989}  # dense bf16, NVIDIA's data sheets (SXM)


def throughput_script():
    """benchmarks/train_throughput.py as a module (its data and tokenizer helpers)."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("train_throughput", REPO_ROOT / "benchmarks" / "train_throughput.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_bert_base(folder: Path, max_len: int = 512) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(throughput_script().tokenizer_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size)).save_pretrained(folder / "raw")
    tokenizer.save_pretrained(folder / "raw")
    model = SentenceTransformer(
        modules=[Transformer(str(folder / "raw"), max_seq_length=max_len), Pooling(768, "mean")]
    )
    model.save(str(folder / "model"))
    return folder / "model"


def texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Queries ~14 words, passages lognormal around 160 words, from SciFact's vocabulary (the benchmark's mix)."""
    bench = throughput_script()
    data = bench.synthetic_pairs(n, seed, bench.corpus_words())
    return data["anchor"], data["positive"]


def check_versions() -> dict:
    import datasets
    import sentence_transformers
    import transformers

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "datasets": datasets.__version__,
    }


def check_varlen() -> dict:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401 - the import itself is the check

    from model_exploration import unpadded

    usable = unpadded.varlen_usable(torch.device("cuda"), torch.bfloat16)
    if not usable:
        raise SystemExit("gpu_check: varlen_attn is not usable on this GPU in bf16 (see the warning above)")
    return {"varlen_usable": usable}


def counted(fn, calls: dict, key: str):
    def wrapper(*args):
        calls[key] += 1
        return fn(*args)

    return wrapper


def check_equal(model_dir: Path) -> dict:
    """Stock vs unpadded BERT-base on CUDA under bf16 autocast, eval mode (no dropout): same embeddings, loss and
    gradients within bf16 tolerance, and the varlen kernel used for every attention call."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from model_exploration import unpadded

    queries, passages = texts(64)
    results = {}
    for name in ("stock", "unpadded"):
        model = SentenceTransformer(str(model_dir), device="cuda")
        calls = {"varlen": 0, "bucketed": 0}
        if name == "unpadded":
            unpadded.enable_unpadded(model)
            for kernel, attr in (("varlen", "_varlen_attention"), ("bucketed", "_bucketed_attention")):
                setattr(unpadded, attr, counted(getattr(unpadded, attr), calls, kernel))
        model.eval()
        features = [model.preprocess(queries), model.preprocess(passages)]
        features = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            embeddings = model(dict(features[1]))["sentence_embedding"].float().detach()
            model.zero_grad()
            loss = MultipleNegativesRankingLoss(model)([dict(f) for f in features], None)
        loss.backward()
        grads = torch.cat(
            [p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None and "pooler" not in n]
        )
        results[name] = {"embeddings": embeddings, "loss": loss.item(), "grads": grads, "calls": calls}
    stock, fast = results["stock"], results["unpadded"]
    cosine = torch.nn.functional.cosine_similarity(stock["embeddings"], fast["embeddings"]).min().item()
    loss_rel = abs(stock["loss"] - fast["loss"]) / abs(stock["loss"])
    grad_rel = ((stock["grads"] - fast["grads"]).norm() / stock["grads"].norm()).item()
    report = {"min_cosine": cosine, "loss_rel_err": loss_rel, "grad_rel_err": grad_rel, **fast["calls"]}
    failures = [
        f"min cosine {cosine:.5f} < 0.999" if cosine < 0.999 else "",
        f"loss relative error {loss_rel:.2e} > 2e-2" if loss_rel > 2e-2 else "",
        f"gradient relative error {grad_rel:.2e} > 5e-2" if grad_rel > 5e-2 else "",
        "the bucketed fallback ran" if fast["calls"]["bucketed"] else "",
        "varlen_attn never ran" if not fast["calls"]["varlen"] else "",
    ]
    if any(failures):
        raise SystemExit(f"gpu_check: unpadded != stock on CUDA: {'; '.join(f for f in failures if f)} ({report})")
    return report


def check_syncs(model_dir: Path, work: Path, steps: tuple[int, int] = (3, 8)) -> dict:
    """Synchronizing CUDA calls per optimizer step of our trainer (pre-tokenized pairs, pinned memory, batch 32),
    counted by torch's sync debug mode over steps [first, last)."""
    from datasets import DatasetDict
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
    from datasets import Dataset

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


def probe(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"versions": check_versions()}
    print("versions:", json.dumps(report["versions"]), flush=True)
    report["varlen"] = check_varlen()
    print("varlen: ok", flush=True)
    model_dir = random_bert_base(out)  # kept: the sample-stage run of gpu_check.sh trains it
    report["equal"] = check_equal(model_dir)
    print("equal:", json.dumps(report["equal"]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        report["syncs"] = check_syncs(model_dir, Path(work))
    print("syncs:", json.dumps(report["syncs"]), flush=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))


def summary(out: Path) -> None:
    probe_report = json.loads((out / "probe.json").read_text())
    bench = json.loads((out / "throughput.json").read_text())
    states = sorted((out / "sample_run").glob("*/checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    state = json.loads(states[-1].read_text())  # this invocation's run (OUT may hold older ones)
    logged = [h for h in state["log_history"] if "mfu" in h][-1]
    mfu, tflops = logged["mfu"], logged["model_tflops_per_device"]
    gpu = probe_report["versions"]["gpu"]
    spec = next((peak for name, peak in SPEC_PEAK_TFLOPS.items() if name in gpu), None)
    ratios = bench["ratios"]
    print("\n| path | pairs/s (passages/s) | MFU (measured peak) | peak GB |\n|---|---|---|---|")
    for label, row in bench["rows"].items():
        rate = row.get("pairs_per_s", row.get("passages_per_s"))
        mfu_cell = f"{row['mfu']:.1%}" if row.get("mfu") is not None else ""
        peak = f"{row['peak_gb']:.1f}" if row.get("peak_gb") is not None else ""
        print(f"| {label} | {rate:.1f} | {mfu_cell} | {peak} |")
    spec_mfu = f", {tflops / spec:.1%} of the {spec} TFLOP/s spec peak" if spec else ""
    print(f"\n{gpu}, {time.strftime('%Y-%m-%d')}; sample-stage run: {tflops} model TFLOP/s, MFU {mfu:.1%} of the "
          f"measured peak{spec_mfu}; equal: {json.dumps(probe_report['equal'])}")  # fmt: skip
    print(f"gpu_check: speedup_train={ratios['mnrl']:.2f} speedup_cached={ratios['cached']:.2f} "
          f"speedup_encode={ratios['encode']:.2f} mfu={mfu:.3f} syncs_per_step={probe_report['syncs']['syncs_per_step']:.1f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["probe", "summary"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU node",
              file=sys.stderr)  # fmt: skip
        return 2
    probe(args.out) if args.step == "probe" else summary(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
