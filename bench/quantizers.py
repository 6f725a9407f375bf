"""`lathe bench quantizers`: lathe's calibration against NVIDIA ModelOpt's, on quality, in one run.

For the int8, fp8 and int4-awq recipes, each model is compressed twice from the same
calibration batches, once per backend (lathe, modelopt: ModelOpt calibrates, lathe converts,
both outputs run on lathe's modules), and scored against its fp32 source:
  MiniLM (embedded encoder): min / mean cosine of mean-pooled sentence embeddings over all of
      lathe.text.eval_sentences();
  decoder LM (lathe/data/decoder-lm): held-out perplexity, quick settings (16 files, 8192 tokens).
Writes quantizers-cpu.{json,md} atomically. Ctrl-C writes what was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = ("int8", "fp8", "int4-awq")
BACKENDS = ("lathe", "modelopt")


def decoder_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "lathe" / "data" / "decoder-lm"


def _scorer(src: Path, kind: str):
    from lathe.compress.checkpoint import load
    from lathe import models, text

    if kind == "encoder":
        from lathe.bench.quality import cosine_stats, embeddings

        tok, sents = models.tokenizer(src), text.eval_sentences()
        ref = embeddings(lambda b, m=load(src): m(**b), tok, sents)
        return lambda m: cosine_stats(ref, embeddings(lambda b: m(**b), tok, sents))
    from lathe.bench.perplexity import heldout_texts, perplexity

    texts = heldout_texts(16)
    return lambda m: {"perplexity": perplexity(m, src, texts, max_tokens=8192)}


def run(models, recipes=RECIPES, backends=BACKENDS, n_calib: int = 64, log=print) -> dict:
    from lathe.compress.checkpoint import load
    from lathe.compress.pipeline import compress_checkpoint
    from lathe.bench.machine import describe
    from lathe.compress.pipeline import calibration_batches

    doc = {"kind": "quantizers", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": describe(),
           "config": {"recipes": list(recipes), "backends": list(backends), "calib_texts": n_calib},
           "versions": _versions(), "results": [], "interrupted": False}
    try:
        for label, src, kind in models:
            score = _scorer(src, kind)
            with torch.inference_mode():
                doc["results"].append({"model": label, "recipe": "fp32", "backend": "-",
                                       **score(load(src))})
            calib = calibration_batches(src, n=n_calib)
            for rec in recipes:
                for be in backends:
                    log(f"{label}: {rec} with {be} ...")
                    t0 = time.perf_counter()
                    try:
                        with tempfile.TemporaryDirectory() as tmp:
                            out = compress_checkpoint(src, rec, Path(tmp) / "out", calib, backend=be)
                            secs = time.perf_counter() - t0
                            with torch.inference_mode():
                                q = score(load(out))
                    except Exception as e:  # one failed cell must not lose the others
                        q, secs = {"error": f"{type(e).__name__}: {e}"}, time.perf_counter() - t0
                    doc["results"].append({"model": label, "recipe": rec, "backend": be,
                                           "compress_s": round(secs, 1), **q})
                    log(f"  {q}")
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    return doc


def _versions() -> dict:
    import lathe

    v = {"lathe": lathe.__version__, "torch": torch.__version__}
    try:
        from lathe.compress.modelopt_backend import modelopt_version
        v["modelopt"] = modelopt_version()
    except ImportError:
        v["modelopt"] = None
    return v


def markdown(doc: dict) -> str:
    lines = [f"# lathe vs ModelOpt calibration, CPU ({doc['created']})", "",
             f"versions: {doc['versions']}; calibration: {doc['config']['calib_texts']} stdlib "
             "docstrings, the same batches for both backends; both outputs run on lathe's modules.", "",
             "| model | recipe | backend | min cos | mean cos | perplexity | compress s |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        f = lambda k, fmt: format(r[k], fmt) if k in r else ""  # noqa: E731
        lines.append(f"| {r['model']} | {r['recipe']} | {r['backend']} | {f('min_cos', '.4f')} | "
                     f"{f('mean_cos', '.4f')} | {f('perplexity', '.3f')} | {r.get('compress_s', '')} |"
                     + (f" error: {r['error']}" if "error" in r else ""))
    lines += ["", *winners(doc)]
    return "\n".join(lines) + "\n"


def winners(doc: dict) -> list[str]:
    """One line per (model, recipe): which backend scored better (higher min cosine, lower ppl)."""
    out, rows = [], {}
    for r in doc["results"]:
        rows.setdefault((r["model"], r["recipe"]), {})[r["backend"]] = r
    for (model, rec), by in rows.items():
        if not all(b in by and "error" not in by[b] for b in BACKENDS):
            continue
        key = "min_cos" if "min_cos" in by["lathe"] else "perplexity"
        a, b = by["lathe"][key], by["modelopt"][key]
        lathe_wins = a > b if key == "min_cos" else a < b
        out.append(f"- {model} {rec}: {'lathe' if lathe_wins else 'ModelOpt'} wins on {key} "
                   f"({a:.4f} lathe vs {b:.4f} ModelOpt)")
    return out


def main(argv=None) -> int:
    from lathe.io import atomic_file
    from lathe.source import default_checkpoint

    p = argparse.ArgumentParser(prog="lathe bench quantizers", description=__doc__.splitlines()[0],
                                epilog="example:\n  lathe bench quantizers --out bench/results",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="folder for quantizers-cpu.{json,md}")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--models", default="minilm,decoder", help="minilm, decoder or both")
    p.add_argument("--calib-texts", type=int, default=64, help="calibration texts (both backends)")
    a = p.parse_args(argv)
    from lathe.compress.modelopt_backend import import_mtq
    import_mtq()  # fail now (BadInput, exit 2), not after the lathe half of the run
    known = {"minilm": ("MiniLM", default_checkpoint(), "encoder"),
             "decoder": ("decoder-lm", decoder_dir(), "decoder")}
    models = [known[m] for m in a.models.split(",") if m in known]
    doc = run(models, tuple(a.recipes.split(",")), BACKENDS, a.calib_texts)
    out = Path(a.out)
    with atomic_file(out / "quantizers-cpu.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    md = markdown(doc)
    with atomic_file(out / "quantizers-cpu.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 130 if doc["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
