"""Passages/s of our evaluation encoder (encoding.encode_fast) against SentenceTransformer.encode, same texts,
same model, one process. Default: all-MiniLM-L6-v2 (offline package) on the bundled SciFact corpus, CPU.

    python benchmarks/encode_throughput.py [--model PATH_OR_ID] [--limit N] [--max_seq_length L]

Prints one line per path and `speedup_encode=X` (ours / SentenceTransformer.encode) and the largest embedding
difference between the two.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "model_exploration"))

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from cli import offline_minilm_path  # noqa: E402
from encoding import encode_fast  # noqa: E402


def scifact_passages(limit: int) -> list[str]:
    with gzip.open(REPO / "data" / "scifact" / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in f]
    return [(d["title"] + " " + d["text"]).strip() for d in docs][:limit]


def timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: offline all-MiniLM-L6-v2")
    p.add_argument("--limit", type=int, default=1024, help="passages to encode")
    p.add_argument("--max_seq_length", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32, help="SentenceTransformer.encode batch size")
    p.add_argument("--token_budget", type=int, default=16384)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if device == "cuda" else {}
    model = SentenceTransformer(args.model or offline_minilm_path(), device=device, **kwargs)
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    texts = scifact_passages(args.limit)
    encode_fast(model, texts[:64], args.token_budget)  # warm-up (allocator, kernels)
    reference, t_st = timed(
        lambda: model.encode(texts, batch_size=args.batch_size, convert_to_tensor=True).float().cpu()
    )
    ours, t_ours = timed(lambda: encode_fast(model, texts, args.token_budget))
    print(
        f"device={device} model={Path(args.model or 'all-MiniLM-L6-v2').name} passages={len(texts)} max_len={model.max_seq_length}"
    )
    print(f"SentenceTransformer.encode(batch_size={args.batch_size}): {len(texts) / t_st:8.1f} passages/s")
    print(f"encode_fast(token_budget={args.token_budget}):        {len(texts) / t_ours:8.1f} passages/s")
    print(f"max_abs_diff={float((ours - reference).abs().max()):.2e}")
    print(f"speedup_encode={t_st / t_ours:.2f}")


if __name__ == "__main__":
    main()
