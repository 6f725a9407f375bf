"""The encoder scenario: a batch x sequence grid over several backends, quality beside speed.
A progress bar on stderr; Ctrl-C stops cleanly and keeps what was measured."""
from __future__ import annotations

import resource
import sys
import time

import torch

from lathe.bench.quality import cosine_stats, embeddings
from lathe.bench.report import SCHEMA_VERSION
from lathe.bench.stats import summarize, time_fn


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_grid(backends, tokenizer, sentences, batches=(1, 8), seq: int = 128, min_runs: int = 100,
             min_seconds: float = 10.0, max_seconds: float | None = None, reference: str | None = None,
             progress: bool = True, config: dict | None = None) -> dict:
    """Times every backend at every (batch, seq); quality is the min cosine of each backend's
    sentence embeddings against `reference` (a backend name, normally torch fp32)."""
    from tqdm import tqdm

    from lathe.bench.machine import describe

    doc = {"schema_version": SCHEMA_VERSION, "kind": "encoder", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": describe(), "config": (config or {}) | {"batches": list(batches), "seq": seq,
                                                              "min_runs": min_runs, "min_seconds": min_seconds},
           "interrupted": False, "results": [], "quality": {}}
    steps = len(backends) * len(batches) + (len(backends) if reference else 0)
    bar = tqdm(total=steps, desc="bench", file=sys.stderr, disable=not progress, leave=False)
    try:
        if reference:
            ref_b = next(b for b in backends if b.name == reference)
            ref = embeddings(ref_b.run, tokenizer, sentences)
            for b in backends:
                bar.set_postfix_str(f"quality {b.name}")
                e = ref if b is ref_b else embeddings(b.run, tokenizer, sentences)
                doc["quality"][b.name] = cosine_stats(ref, e)
                bar.update()
        for bt in batches:
            inputs = tokenizer((sentences * (bt // len(sentences) + 1))[:bt], seq_len=seq)
            for b in backends:
                bar.set_postfix_str(f"{b.name} b{bt}")
                ms = time_fn(lambda: b.run(inputs), min_runs=min_runs, min_seconds=min_seconds,
                             max_seconds=max_seconds)
                st = summarize(ms)
                doc["results"].append({"backend": b.name, "batch": bt, "seq": seq, **st,
                                       "throughput_per_s": bt * 1e3 / st["mean_ms"],
                                       "size_bytes": b.size_bytes, "peak_rss_mb": peak_rss_mb(),
                                       "threads": torch.get_num_threads()})
                bar.update()
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        bar.close()
    base = {(r["batch"], r["seq"]): r["p50_ms"] for r in doc["results"] if r["backend"] == reference}
    for r in doc["results"]:
        b = base.get((r["batch"], r["seq"]))
        r["speedup_vs_torch_fp32"] = b / r["p50_ms"] if b else None
    return doc
