"""The table `lathe compress` prints when it is done: recipe, size on disk (source vs output),
quality against fp32 and latency through lathe.load against fp32, all measured in this run.

Quick by design (a summary, not a benchmark): encoders are scored by the minimum cosine of
mean-pooled sentence embeddings over the first `n_sentences` of lathe's evaluation set;
decoders by held-out perplexity with bench/decoder.py's quick settings (16 files, 8192 tokens).
Latency is the median of a handful of forward passes at batch 8, seq 128 (encoder) or batch
1, seq 128 (decoder prefill), fp32 and compressed timed alternately in the same run.
"""
from __future__ import annotations

import math

import torch

from lathe.bench.timing import median_ms as _median_ms
from lathe.errors import BadInput
from lathe.source import weights_bytes  # noqa: F401  (re-exported: tests and bench read it here)


def _encoder_quality(ref, test, tok, n_sentences: int) -> dict:
    from lathe import text
    from lathe.bench.quality import cosine_stats, embeddings

    sents = text.eval_sentences()[:n_sentences]
    e = [embeddings(lambda b, m=m: m(**b), tok, sents) for m in (ref, test)]
    if not bool(torch.isfinite(e[0]).all()):
        raise BadInput("the fp32 reference gives non-finite embeddings: it cannot be compared against")
    s = cosine_stats(*e)
    return {"metric": "min cosine", "fp32": 1.0, "value": s["min_cos"], "mean_cos": s["mean_cos"],
            "n": s["n_sentences"]}


def _pooled(y: torch.Tensor) -> torch.Tensor:
    return y.mean(1) if y.dim() == 3 else y.flatten(1)  # ViT's tokens, or one vector an image


def _image_quality(ref, test, batches) -> dict:
    from lathe.bench.quality import cosine_stats

    e = [torch.cat([_pooled(m(**b).float()) for b in batches]) for m in (ref, test)]
    s = cosine_stats(*e)
    return {"metric": "min cosine", "fp32": 1.0, "value": s["min_cos"], "mean_cos": s["mean_cos"],
            "n": s["n_sentences"]}


def _decoder_quality(ref, test, src_path) -> dict:
    from lathe.bench.perplexity import heldout_texts, perplexity

    texts = heldout_texts(16)
    p0, p1 = (perplexity(m, src_path, texts, max_tokens=8192) for m in (ref, test))
    if not math.isfinite(p0):  # the reference must be sound, or every ratio against it lies
        raise BadInput(f"the fp32 reference {src_path} gives perplexity {p0}: it cannot be compared against")
    return {"metric": "perplexity", "fp32": p0, "value": p1, "ratio": p1 / p0}


def summarize(src, out, reps: int = 3, n_sentences: int = 64) -> dict:
    """Measure the row of the table for compressed directory `out` made from `src`."""
    from lathe import models, text
    from lathe.compress.checkpoint import load
    from lathe.models.base import adapter_of
    from lathe.vision import benchable
    from lathe.source import open_source, recorded_source

    comp = open_source(out)
    source = open_source(src)
    if source.is_compressed:  # a chained run (pruned -> int8): compare with the original model
        source = recorded_source(source)
    ref, test = load(source.path), load(comp.path)
    row = {"recipe": (comp.manifest or {}).get("recipe", {}).get("name", "?"),
           "backend": (comp.manifest or {}).get("report", {}).get("backend", "lathe"),
           "size_src": weights_bytes(source.path), "size_out": weights_bytes(comp.path)}
    row["size_ratio"] = row["size_out"] / row["size_src"]
    from lathe.models.generic import image_batches, takes_pixels

    with torch.inference_mode():
        if benchable(source):  # image classifiers (CNNs): top-1 agreement on lathe's image set
            from lathe import images, vision
            x = images.image_set(32, vision.image_size(source))
            q = vision.quality(vision.logits(ref, x), vision.logits(test, x))
            row["quality"] = {"metric": "top-1 agreement", "value": q["top1_agreement"],
                              "mean_cos": q["cosine_mean"], "n": q["images"]}
            inputs = {"pixel_values": x[:8]}
            row["shape"] = f"b8 {vision.image_size(source)}px"
        elif takes_pixels(source.config):  # vision: embeddings of synthetic images (no image data offline)
            row["quality"] = _image_quality(ref, test, image_batches(source.config, n_sentences))
            inputs = image_batches(source.config, 8, 8, seed=1)[0]
            row["shape"] = "b8 images"
        elif adapter_of(ref).is_decoder:
            row["quality"] = _decoder_quality(ref, test, source.path)
            tok = models.tokenizer(source.path)
            x = tok(text.eval_sentences()[:1], seq_len=128)
            inputs = {"input_ids": x["input_ids"], "attention_mask": torch.ones_like(x["input_ids"])}
            row["shape"] = "b1 s128 prefill"
        else:
            tok = models.tokenizer(source.path)
            row["quality"] = _encoder_quality(ref, test, tok, n_sentences)
            inputs = tok(text.eval_sentences()[:8], seq_len=128)
            row["shape"] = "b8 s128"
        row["ms_fp32"] = _median_ms(lambda: ref(**inputs), reps)
        row["ms_out"] = _median_ms(lambda: test(**inputs), reps)
    row["speedup"] = row["ms_fp32"] / row["ms_out"]
    return row


def table(row: dict) -> str:
    q = row["quality"]
    qual = (f"min cos {q['value']:.4f} (mean {q['mean_cos']:.4f}, {q['n']} sent.)" if q["metric"] == "min cosine"
            else f"top-1 agree {q['value']:.3f} (cos {q['mean_cos']:.4f}, {q['n']} img)" if q["metric"] == "top-1 agreement"
            else f"ppl {q['value']:.3f} vs {q['fp32']:.3f} ({100 * (q['ratio'] - 1):+.2f}%)")
    mb = 1 << 20
    head = f"{'recipe':16} {'backend':9} {'size MiB (src -> out)':>24} {'quality vs fp32':42} {'latency ms (fp32 -> out)':>26}"
    line = (f"{row['recipe']:16} {row['backend']:9} "
            f"{row['size_src'] / mb:8.1f} -> {row['size_out'] / mb:6.1f} ({row['size_ratio']:.2f}x) "
            f"{qual:42} {row['ms_fp32']:8.1f} -> {row['ms_out']:6.1f} ({row['speedup']:.2f}x) {row['shape']}")
    return head + "\n" + line
