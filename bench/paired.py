"""`lathe bench paired A B`: the latency ratio of model B to model A (lathe.load
directories, encoders) measured interleaved, A then B, pair after pair, so machine noise hits
both alike; prints the median per-pair ratio and its quartiles. For a shared, noisy machine,
where two separate timing runs can differ by 50%."""
from __future__ import annotations

import argparse
import json
import statistics


def paired(a_dir, b_dir, batch: int = 8, seq: int = 128, pairs: int = 40, warmup: int = 3) -> dict:
    import torch

    from lathe.compress.checkpoint import load
    from lathe import models, text
    from lathe.bench.timing import paired as alternate
    from lathe.source import open_source

    a, b = load(a_dir), load(b_dir)
    tok = models.tokenizer(open_source(a_dir).path)
    x = tok(text.eval_sentences()[:batch], seq_len=seq)

    fa, fb = (lambda: a(**x)), (lambda: b(**x))
    with torch.inference_mode():
        alternate(fa, fb, warmup)
        ta, tb = alternate(fa, fb, pairs)
    r = [y / x_ for x_, y in zip(ta, tb)]
    q = statistics.quantiles(r, n=4)
    return {"a": str(a_dir), "b": str(b_dir), "batch": batch, "seq": seq, "pairs": pairs,
            "a_p50_ms": 1e3 * statistics.median(ta), "b_p50_ms": 1e3 * statistics.median(tb),
            "ratio_median": statistics.median(r), "ratio_q25": q[0], "ratio_q75": q[2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lathe bench paired", description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = paired(args.a, args.b, args.batch, args.seq, args.pairs)
    print(f"B/A latency, b{args.batch} s{args.seq}: median {res['ratio_median']:.3f} "
          f"(quartiles {res['ratio_q25']:.3f}-{res['ratio_q75']:.3f}); "
          f"A {res['a_p50_ms']:.1f} ms, B {res['b_p50_ms']:.1f} ms")
    if args.json:
        from lathe.io import write_text

        write_text(args.json, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
