"""The generic transformers path measured: (1) the family x recipe table on small random
checkpoints (tests/hf_tiny.py): cosine of logits / last hidden state against transformers'
fp32 forward, weights on disk, CPU latency against transformers fp32 (timed alternately);
(2) the cost of generality: MiniLM and lathe's decoder-lm through the generic path against
lathe's fast adapters, int8, same timing.

    .venv/bin/python scripts/bench_generic.py [--families qwen2,gpt2] [--reps 20] [--md FILE]

Run from outside the repository root (cd tests or /tmp): the root's kernels/ shadows a package
transformers imports."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def paired_ms(a, b, x, reps: int):
    """a and b timed alternately (a then b, then b then a), same inputs: (median ms of a, of b,
    median of the per-pair ratios b/a, its quartiles)."""
    ta, tb = [], []
    with torch.inference_mode():
        a(**x), b(**x)
        t0 = time.perf_counter()
        a(**x)
        inner = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))  # >= 20 ms a sample: a
        for i in range(reps):                                               # timeslice is not one
            for fn, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn(**x)
                acc.append((time.perf_counter() - t0) * 1e3 / inner)
    r = [y / x_ for x_, y in zip(ta, tb)]
    q = statistics.quantiles(r, n=4) if len(r) >= 4 else (min(r), 0, max(r))
    return statistics.median(ta), statistics.median(tb), statistics.median(r), (q[0], q[2])


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def families(names, reps, work: Path):
    import hf_tiny

    import lathe
    from lathe.models.generic import image_batches, reference_model
    from lathe.summary import weights_bytes

    (work / "int4-rtn-g32.yaml").write_text("name: int4-rtn-g32\nsteps:\n  - method: int4\n    algo: rtn\n"
                                            "    group_size: 32\n")
    import hf_tiny_cnn

    rows = []
    for fam in names:
        cnn = fam in hf_tiny_cnn.CNNS
        src = (hf_tiny_cnn if cnn else hf_tiny).write(fam, work / fam)
        ref = reference_model(src)
        if cnn:
            x = hf_tiny_cnn.images(src, 8, seed=5)
        elif fam == "vit":
            x = image_batches({"image_size": 32}, 8, 8, seed=5)[0]
        else:
            from lathe import text
            x = text.Tokenizer(src)(text.eval_sentences()[:8], seq_len=128)
        with torch.inference_mode():
            out = ref(**{k: v for k, v in x.items() if k != "token_type_ids" or fam in ("roberta",)})
        want = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        # CNNs: Conv2d is quantized by the int8 recipe only (the others exit 2 naming it)
        for rec in ("int8",) if cnn else ("int8", "int8-weight-only", work / "int4-rtn-g32.yaml"):
            name = Path(str(rec)).stem
            out_dir = lathe.compress_checkpoint(src, rec, work / f"{fam}-{name}")  # CLI's calibration
            q = lathe.load(out_dir)
            with torch.inference_mode():
                got = q(x["pixel_values"]) if fam == "resnet" else q(**x)
            fp32 = lathe.load(src)  # transformers' model (the generic path adds no op of its own)
            if cnn:  # transformers' model as the anchor (the ResNet family runs its own code)
                fp32 = lambda pixel_values, ref=ref: ref(pixel_values=pixel_values).logits  # noqa: E731
                q = (lambda m: lambda pixel_values: m(pixel_values))(q) if fam == "resnet" else q
            ms_ref, ms_q, ratio, iqr = paired_ms(fp32, q, x, reps)
            rows.append({"family": fam + (" (lathe family)" if fam == "resnet" else ""), "recipe": name,
                         "cos": cos(got, want), "size": weights_bytes(out_dir) / weights_bytes(src),
                         "ms_fp32": ms_ref, "ms": ms_q, "ratio": ratio, "iqr": iqr})
            print(rows[-1], flush=True)
    return rows


def generality(reps, work: Path):
    """int8 through the generic path (transformers' BertModel / LlamaForCausalLM, Linears
    swapped) against lathe's fast adapters (fused qkv, GELU epilogue, lathe's attention)."""
    import lathe
    from lathe import text
    from lathe.compress.config import Int8Config
    from lathe.compress.quantize import quantize
    from lathe.models.generic import load_source
    from lathe.compress.pipeline import calibration_batches
    from lathe.source import default_checkpoint, open_source

    out = []
    for label, path, shape in (("MiniLM", default_checkpoint(), (8, 128)),
                               ("decoder-lm", Path(lathe.__path__[0]) / "data" / "decoder-lm", (1, 128))):
        src = open_source(path)
        calib = calibration_batches(path)
        fast = lathe.load(lathe.compress_checkpoint(path, "int8", work / f"{label}-int8", calib=calib))
        gen = load_source(src)
        quantize(gen, Int8Config(), calib)
        x = text.Tokenizer(path)(text.eval_sentences()[:shape[0]], seq_len=shape[1])
        if label == "decoder-lm":
            x = {"input_ids": x["input_ids"], "attention_mask": torch.ones_like(x["input_ids"])}
        fp32 = load_source(src)
        with torch.inference_mode():
            r = fp32(**x)
            cf, cg = cos(fast(**x), r), cos(gen(**x), r)
        ms_fast, ms_gen, ratio, iqr = paired_ms(fast, gen, x, reps)
        out.append({"model": label, "shape": f"b{shape[0]} s{shape[1]}", "cos_fast": cf, "cos_generic": cg,
                    "ms_fast": ms_fast, "ms_generic": ms_gen, "ratio": ratio, "iqr": iqr})
        print(out[-1], flush=True)
    return out


def main():
    import hf_tiny

    ap = argparse.ArgumentParser()
    import hf_tiny_cnn

    ap.add_argument("--families", default=",".join(hf_tiny.FAMILIES + hf_tiny_cnn.CNNS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--md")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--skip-generality", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        rows = families(a.families.split(","), a.reps, Path(d))
        gen = [] if a.skip_generality else generality(a.reps, Path(d))
    lines = ["| family | recipe | cosine vs transformers fp32 | size vs fp32 | latency vs transformers fp32 "
             "(median of per-pair ratios, IQR) |", "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['recipe']} | {r['cos']:.5f} | {r['size']:.2f}x | {r['ratio']:.2f}x "
              f"({r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}) |" for r in rows]
    if gen:
        lines += ["", "| model | shape | cos fast adapter | cos generic | latency generic / fast adapter |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g['model']} | {g['shape']} | {g['cos_fast']:.5f} | {g['cos_generic']:.5f} | "
                  f"{g['ratio']:.2f}x (IQR {g['iqr'][0]:.2f}-{g['iqr'][1]:.2f}; medians {g['ms_generic']:.1f} / "
                  f"{g['ms_fast']:.1f} ms) |" for g in gen]
    text = "\n".join(lines)
    print(text)
    if a.md:
        from lathe.io import write_text
        write_text(a.md, text + "\n")  # temp file renamed into place


if __name__ == "__main__":
    main()
