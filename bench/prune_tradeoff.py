"""`lathe bench pruned ORIGINAL PRUNED [PRUNED ...]`: the quality / latency
trade-off of pruned encoders (MiniLM-style sentence embedders) against their original.

For each pruned directory: the minimum and mean cosine of mean-pooled sentence embeddings
against the original over lathe's 300 evaluation sentences, the batch-8 seq-128 latency
ratio pruned / original measured interleaved (lathe.bench.paired, so machine noise hits both
alike), the size on disk, and whether it meets issue #8's target (latency <= 0.67x with
minimum cosine >= 0.97). Writes a markdown table and JSON."""
from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

LATENCY_TARGET, COSINE_TARGET = 0.67, 0.97


def _recipe(path) -> str:
    from lathe.source import open_source

    man = open_source(path).manifest or {}
    steps = man.get("recipe", {}).get("steps", [])
    out = []
    for s in steps:
        s = dict(s)
        m = s.pop("method", "?")
        keep = {k: v for k, v in s.items() if k in ("heads", "ffn", "drop_layers", "steps", "algo") and v}
        out.append(m + ("(" + ", ".join(f"{k} {v}" for k, v in keep.items()) + ")" if keep else ""))
    return " + ".join(out) or "?"


def tradeoff(original, pruned: list, pairs: int = 30) -> dict:
    import torch

    from lathe.compress.checkpoint import load
    from lathe import models, text
    from lathe.bench.paired import paired
    from lathe.bench.quality import cosine_stats, embeddings
    from lathe.source import weights_bytes

    tok = models.tokenizer(original)
    sents = text.eval_sentences()
    with torch.inference_mode():
        orig = load(original)
        ref = embeddings(lambda b: orig(**b), tok, sents)
    del orig
    rows = []
    for d in pruned:
        with torch.inference_mode():
            m = load(d)
            cos = cosine_stats(ref, embeddings(lambda b: m(**b), tok, sents))
        lat = paired(original, d, pairs=pairs)
        row = {"dir": str(d), "recipe": _recipe(d), "min_cos": cos["min_cos"], "mean_cos": cos["mean_cos"],
               "latency_ratio": lat["ratio_median"], "latency_q25": lat["ratio_q25"],
               "latency_q75": lat["ratio_q75"], "size_ratio": weights_bytes(d) / weights_bytes(original)}
        row["meets_target"] = row["latency_ratio"] <= LATENCY_TARGET and row["min_cos"] >= COSINE_TARGET
        rows.append(row)
        print(f"{row['recipe']}: latency {row['latency_ratio']:.3f}x, min cos {row['min_cos']:.4f}", flush=True)
    rows.sort(key=lambda r: r["latency_ratio"])
    return {"original": str(original), "n_sentences": len(sents), "batch": 8, "seq": 128,
            "pairs": pairs, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"# Pruned MiniLM: quality against latency\n",
             f"Latency: pruned / original at batch {res['batch']}, seq {res['seq']}, median of "
             f"{res['pairs']} interleaved pairs (quartiles). Quality: cosine of mean-pooled embeddings "
             f"against the original over {res['n_sentences']} sentences. Target (#8): latency <= "
             f"{LATENCY_TARGET}x with min cosine >= {COSINE_TARGET}.\n",
             "| recipe | latency vs original | min cos | mean cos | size | meets target |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['recipe']} | {r['latency_ratio']:.3f} ({r['latency_q25']:.2f}-{r['latency_q75']:.2f}) "
                     f"| {r['min_cos']:.4f} | {r['mean_cos']:.4f} | {r['size_ratio']:.2f}x | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lathe bench pruned", description=__doc__.split("\n")[0])
    ap.add_argument("original")
    ap.add_argument("pruned", nargs="+")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    from lathe.io import atomic_file
    from lathe.source import open_source

    from lathe.errors import BadInput

    for d in [args.original, *args.pruned]:
        try:
            open_source(d)
        except BadInput as e:  # as lathe.cli prints every bad input: stderr, one line, exit 2
            print(f"lathe: error: {e}", file=sys.stderr)
            return 2
    res = tradeoff(args.original, args.pruned, args.pairs)
    md = markdown(res)
    print(md)
    for path, body in ((args.json, json.dumps(res, indent=2)), (args.md, md)):
        if path:
            with atomic_file(Path(path)) as t:
                t.write_text(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
