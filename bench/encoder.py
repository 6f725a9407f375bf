"""The encoder scenario: a batch x sequence grid over several backends, quality beside speed.

Each backend is built, asked for the sentence embeddings of lathe's fixed set (quality), timed
at every (batch, seq), and dropped before the next one is built; with `isolate=True` each
backend does all of this in its own process (so peak RSS is its own). A progress bar goes to
stderr; Ctrl-C stops cleanly and keeps what was measured."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from lathe.bench.quality import cosine_stats, embeddings
from lathe.bench.report import SCHEMA_VERSION
from lathe.bench.stats import summarize, time_fn


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(spec, model_dir, batches, seq, min_runs, min_seconds, max_seconds, threads,
            on_step=None) -> tuple[list, torch.Tensor]:
    """Build one backend and measure it: (result rows, sentence embeddings)."""
    from lathe.bench.backends import make
    from lathe.models import tokenizer
    from lathe.text import eval_sentences

    torch.set_num_threads(threads)
    gpu = spec.device.startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    b = make(spec)
    tok = tokenizer(model_dir)
    sents = eval_sentences()
    emb = embeddings(b.run, tok, sents)
    rows = []
    for bt in batches:
        inputs = tok((sents * (bt // len(sents) + 1))[:bt], seq_len=seq)
        ms = time_fn(lambda: b.run(inputs), min_runs=min_runs, min_seconds=min_seconds,
                     max_seconds=max_seconds, sync=torch.cuda.synchronize if gpu else None)
        st = summarize(ms)
        rows.append({"backend": b.name, "batch": bt, "seq": seq, **st,
                     "throughput_per_s": bt * 1e3 / st["mean_ms"], "size_bytes": b.size_bytes,
                     "peak_rss_mb": peak_rss_mb(), "threads": threads, "device": spec.device,
                     "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
                     "times_ms": ms})
        if on_step:
            on_step(f"{b.name} b{bt}")
    return rows, emb


def _measure_isolated(spec, model_dir, batches, seq, min_runs, min_seconds, max_seconds, threads):
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="lathe-bench-") as d:
        job = {"spec": spec.to_dict(), "model_dir": str(model_dir), "batches": list(batches), "seq": seq,
               "min_runs": min_runs, "min_seconds": min_seconds, "max_seconds": max_seconds,
               "threads": threads, "out": d}
        r = subprocess.run([sys.executable, "-m", "lathe.bench.worker", json.dumps(job)],
                           capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"backend {spec.label} failed in its worker process: {last}")
        rows = json.loads(open(os.path.join(d, "rows.json")).read())
        emb = load_file(os.path.join(d, "emb.safetensors"))["emb"]
    return rows, emb


def run_grid(specs, model_dir, batches=(1, 8), seq: int = 128, min_runs: int = 100,
             min_seconds: float = 10.0, max_seconds: float | None = None, reference: str | None = None,
             isolate: bool = False, threads: int | None = None, progress: bool = True,
             config: dict | None = None) -> dict:
    """Times every backend at every (batch, seq); quality is the min cosine of each backend's
    sentence embeddings against the `reference` backend's (normally torch fp32)."""
    from tqdm import tqdm

    from lathe.bench.machine import describe

    threads = threads or torch.get_num_threads()
    doc = {"schema_version": SCHEMA_VERSION, "kind": "encoder", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": describe(), "config": (config or {}) | {
               "batches": list(batches), "seq": seq, "min_runs": min_runs, "min_seconds": min_seconds,
               "max_seconds": max_seconds, "isolate": isolate, "threads": threads},
           "interrupted": False, "results": [], "quality": {}}
    specs = sorted(specs, key=lambda s: s.label != reference)  # the reference goes first
    bar = tqdm(total=len(specs) * len(batches), desc="bench", file=sys.stderr, disable=not progress, leave=False)
    ref_emb = None
    try:
        for spec in specs:
            bar.set_postfix_str(spec.label)
            args = (spec, model_dir, batches, seq, min_runs, min_seconds, max_seconds, threads)
            if isolate:
                rows, emb = _measure_isolated(*args)
                bar.update(len(batches))
            else:
                rows, emb = measure(*args, on_step=lambda _: bar.update())
            doc["results"] += rows
            if spec.label == reference:
                ref_emb = emb
            if ref_emb is not None:
                doc["quality"][spec.label] = cosine_stats(ref_emb, emb)
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
