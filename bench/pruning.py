"""`python -m lathe.bench.pruning`: the decoder LM's 2:4 row of issue #8. Held-out perplexity of
the fp32 model, of 2:4 sparsity (SparseGPT and magnitude), and of the same 2:4 models after
distillation from the fp32 teacher (the mask is kept), so the table shows how much of the
gap distillation recovers. Writes bench/results/pruning-decoder-cpu.{md,json} atomically."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _recipe(tmp: Path, name: str, algo: str, distill_steps: int) -> str:
    steps = [f"  - method: prune\n    algo: {algo}\n    pattern: \"2:4\"\n    skip: [\"lm_head\"]\n"]
    if distill_steps:
        steps.append(f"  - method: distill\n    steps: {distill_steps}\n    batch_size: 8\n"
                     f"    seq_len: 128\n    lr: 0.0005\n    warmup: 10\n    save_every: 0\n")
    p = tmp / f"{name}.yaml"
    p.write_text(f"name: {name}\nsteps:\n" + "".join(steps))
    return str(p)


def run(distill_steps: int = 300, n_files: int = 32, log=print) -> dict:
    import lathe
    from lathe.bench.perplexity import heldout_perplexity
    from lathe.compress.checkpoint import load
    from lathe.compress.pipeline import compress_checkpoint

    src = Path(lathe.__file__).parent / "data" / "decoder-lm"

    def ppl(path):
        return heldout_perplexity(load(path), src, n_files=n_files, max_tokens=16384)["perplexity"]

    rows = [{"model": "fp32", "perplexity": ppl(src)}]
    log(f"fp32: {rows[0]['perplexity']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for algo in ("sparsegpt", "magnitude"):
            for steps in (0, distill_steps):
                name = f"2of4-{algo}" + (f"+distill{steps}" if steps else "")
                t0 = time.time()
                out = compress_checkpoint(src, _recipe(tmp, name, algo, steps), tmp / name)
                rows.append({"model": name, "perplexity": ppl(out), "compress_s": round(time.time() - t0, 1)})
                log(f"{name}: {rows[-1]['perplexity']:.3f} ({rows[-1]['compress_s']} s)")
    base = rows[0]["perplexity"]
    for r in rows:
        r["delta_pct"] = round(100 * (r["perplexity"] / base - 1), 2)
    for algo in ("sparsegpt", "magnitude"):
        before = next(r for r in rows if r["model"] == f"2of4-{algo}")["perplexity"]
        after = next(r for r in rows if r["model"].startswith(f"2of4-{algo}+"))["perplexity"]
        rec = (before - after) / (before - base) if before > base else None
        for r in rows:
            if r["model"].startswith(f"2of4-{algo}+"):
                r["gap_recovered_pct"] = None if rec is None else round(100 * rec, 1)
    return {"distill_steps": distill_steps, "heldout_files": n_files, "rows": rows}


def to_md(res: dict) -> str:
    lines = [f"# decoder LM, 2:4 sparsity, before and after distillation ({res['distill_steps']} steps)",
             "", f"Held-out perplexity, {res['heldout_files']} held-out stdlib files, 16384 scored tokens.", "",
             "| model | perplexity | vs fp32 | gap recovered by distillation |", "|---|---|---|---|"]
    for r in res["rows"]:
        g = r.get("gap_recovered_pct")
        lines.append(f"| {r['model']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | "
                     f"{'' if g is None else f'{g:.1f}%'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from lathe.bench.machine import describe
    from lathe.io import atomic_file

    ap = argparse.ArgumentParser(prog="python -m lathe.bench.pruning", description=__doc__.split("\n")[0])
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    res = run(a.distill_steps)
    res["machine"] = describe()
    out = Path(a.out)
    with atomic_file(out / "pruning-decoder-cpu.json") as t:
        t.write_text(json.dumps(res, indent=2))
    with atomic_file(out / "pruning-decoder-cpu.md") as t:
        t.write_text(to_md(res))
    print(to_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
