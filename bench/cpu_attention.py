"""lathe's fused CPU attention against torch.nn.functional.scaled_dot_product_attention.

    python -m lathe.bench.cpu_attention [--reps N] [--threads T] [--quick]

Both run in the same process on the same inputs, interleaved call by call (the machine may be
shared and its clock drifts), and each time reported is the median of the repeated calls.
speedup = SDPA time / lathe time (> 1: lathe is faster), from the medians; the ratio of the
fastest calls is printed too (on a shared machine it is the steadier one). SDPA gets the same
masks: is_causal for square causal shapes, a boolean attn_mask [B, 1, 1, Sk] for key padding.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from lathe.bench.timing import paired, seconds
from lathe.kernels import cpu
from lathe.kernels.cpu_attention import attention

# name, B, H, Sq, Sk, D, causal, padded
SHAPES = [
    ("S=128", 1, 12, 128, 128, 64, False, False),
    ("S=128 causal", 1, 12, 128, 128, 64, True, False),
    ("S=512", 1, 12, 512, 512, 64, False, False),
    ("S=512 causal", 1, 12, 512, 512, 64, True, False),
    ("S=2048", 1, 12, 2048, 2048, 64, False, False),
    ("S=2048 causal", 1, 12, 2048, 2048, 64, True, False),
    ("decode q=1 kv=4096", 1, 12, 1, 4096, 64, False, False),
    ("MiniLM B=8 S=128 +mask", 8, 12, 128, 128, 64, False, True),
]


def _inputs(B, H, Sq, Sk, D, padded, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, H, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, H, Sk, D, generator=g).to(dtype)
    mask = None
    if padded:  # sentence lengths spread over [Sk/4, Sk], as in a batch of real sentences
        lengths = torch.linspace(Sk // 4, Sk, B).round().long()
        mask = torch.arange(Sk)[None, :] < lengths[:, None]
    return q, k, v, mask


def _time_pair(f_lathe, f_sdpa, reps: int, budget_s: float):
    for _ in range(2):  # warm-up (allocator, caches, thread pool)
        f_lathe()
        f_sdpa()
    one = seconds(f_lathe) + seconds(f_sdpa)
    n = max(5, min(reps, int(budget_s / max(one, 1e-6))))
    tl, ts = paired(f_lathe, f_sdpa, n)
    return statistics.median(tl), statistics.median(ts), min(tl), min(ts), n


def run(reps: int = 30, budget_s: float = 3.0, dtypes=(torch.float32, torch.bfloat16), shapes=SHAPES):
    rows = []
    for dtype in dtypes:
        for name, B, H, Sq, Sk, D, causal, padded in shapes:
            q, k, v, mask = _inputs(B, H, Sq, Sk, D, padded, dtype)
            attn_mask = mask[:, None, None, :] if mask is not None else None

            def f_lathe():
                return attention(q, k, v, mask, causal)

            def f_sdpa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

            with torch.no_grad():
                tl, ts, ml, ms, n = _time_pair(f_lathe, f_sdpa, reps, budget_s)
            rows.append((name, str(dtype).replace("torch.", ""), tl * 1e3, ts * 1e3, ts / tl, ms / ml, n))
    return rows


def format_table(rows) -> str:
    head = (f"{'shape':<24} {'dtype':<9} {'lathe ms':>9} {'SDPA ms':>9} {'speedup':>8} "
            f"{'(of mins)':>9} {'n':>4}")
    lines = [head, "-" * len(head)]
    for name, dt, tl, ts, ratio, ratio_min, n in rows:
        lines.append(f"{name:<24} {dt:<9} {tl:9.3f} {ts:9.3f} {ratio:7.2f}x {ratio_min:8.2f}x {n:4d}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30, help="most timed calls per shape and side")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per shape, about")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (both sides)")
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, budget = (5, 0.3) if args.quick else (args.reps, args.budget)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, lathe ISA {cpu.active_isa()}")
    print("speedup = SDPA time / lathe time: of the medians of interleaved calls (times shown),"
          " and of the fastest calls")
    print(format_table(run(reps, budget)))


if __name__ == "__main__":
    main()
