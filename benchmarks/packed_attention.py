"""Which attention to run on packed (unpadded) tokens: forward + backward time of the candidates on the benchmark's
length mix, same inputs, one process. Backs the choice in model_exploration/unpadded.py.

    python benchmarks/packed_attention.py [--heads 4 --head_dim 64 --batch 64 --repeats 5]

Candidates: `batch-padded` pads every sequence to the batch's longest (what the stock model does), `per-sequence`
runs one SDPA call per sequence (no padding), `bucketed` is unpadded.py's fallback (sequences grouped by length,
padded to their group's longest), `nested` is SDPA on a jagged nested tensor, `varlen` (CUDA only) is
torch.nn.attention.varlen.varlen_attn. Prints ms per call and the ratio to `bucketed`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from model_exploration import unpadded


def lengths_mix(batch: int, seed: int, max_len: int = 512) -> list[int]:
    """Token lengths of a batch of passages: ~1.35 tokens per word, lognormal words as in train_throughput.py."""
    rng = np.random.default_rng(seed)
    words = np.clip(np.rint(rng.lognormal(np.log(160), 0.6, batch)), 20, 700)
    return [int(min(max_len, round(w * 1.35) + 2)) for w in words]


def batch_padded(q, k, v, lengths, starts):
    longest, n = max(lengths), len(lengths)
    mask = torch.zeros(n, longest, dtype=torch.bool, device=q.device)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    slots = mask.flatten().nonzero().squeeze(1)
    padded = [
        t.new_zeros(n * longest, *t.shape[1:]).index_copy(0, slots, t).view(n, longest, *t.shape[1:]).transpose(1, 2)
        for t in (q, k, v)
    ]
    out = F.scaled_dot_product_attention(*padded, attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2).reshape(-1, *q.shape[1:])[slots]


def per_sequence(q, k, v, lengths, starts):
    outs = []
    for start, length in zip(starts, lengths):
        qs, ks, vs = (t[start : start + length].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outs)


def nested(q, k, v, lengths, starts):
    offsets = torch.tensor(starts + [starts[-1] + lengths[-1]], device=q.device)
    nts = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*nts).transpose(1, 2).values()


def varlen(q, k, v, lengths, starts):
    cu = torch.tensor(starts + [starts[-1] + lengths[-1]], device=q.device, dtype=torch.int32)
    return unpadded._varlen_attention(q, k, v, cu, max(lengths))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = sorted(lengths_mix(args.batch, 0), reverse=True)  # packed longest first, as unpadded._pack does
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    tokens = sum(lengths)
    packed = unpadded.PackedBatch(lengths, torch.tensor(starts + [tokens], dtype=torch.int32))
    print(f"device {device}, {args.batch} sequences, {tokens} tokens (padded to the longest: "
          f"{args.batch * max(lengths)}), {args.heads} heads x {args.head_dim}")  # fmt: skip
    candidates = {
        "batch-padded": batch_padded,
        "per-sequence": per_sequence,
        "bucketed": lambda q, k, v, lengths, starts: unpadded._bucketed_attention(q, k, v, packed),
        "nested": nested,
    }
    if device.type == "cuda":
        candidates["varlen"] = varlen
    times, reference = {}, None
    for name, fn in candidates.items():
        generator = torch.Generator().manual_seed(0)  # the same q, k, v for every candidate
        q, k, v = (
            torch.randn(tokens, args.heads, args.head_dim, generator=generator).to(device, dtype).requires_grad_()
            for _ in range(3)
        )
        try:
            best = float("inf")
            for _ in range(args.repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = fn(q, k, v, lengths, starts)
                out.float().square().sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        except (RuntimeError, NotImplementedError) as exc:
            print(f"{name:14} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        reference = out.detach().float() if reference is None else reference
        error = (out.detach().float() - reference).abs().max().item()
        times[name] = best
        print(f"{name:14} {1000 * best:9.1f} ms (fwd+bwd)   max diff vs batch-padded {error:.1e}", flush=True)
    print(" ".join(f"{name}/bucketed={t / times['bucketed']:.2f}" for name, t in times.items()))


if __name__ == "__main__":
    main()
