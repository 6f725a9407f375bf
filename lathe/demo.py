"""`lathe demo`: the main job on the embedded default checkpoint (all-MiniLM-L6-v2):
compress to int8 W8A8, export original and compressed to ONNX (validated on onnxruntime),
benchmark torch fp32 / lathe int8 / onnxruntime fp32 / onnxruntime's two int8 recipes / lathe's
int8 ONNX at batch 1 and 8,
seq 128, and report speed and quality side by side."""
from __future__ import annotations

import time
from pathlib import Path


def run(out_dir="lathe-demo-out", min_runs: int = 20, min_seconds: float = 3.0, log=print) -> dict:
    import torch

    import lathe
    from lathe import benchflow
    from lathe.bench.report import table, write_all
    from lathe.io import check_report_dir
    from lathe.source import default_checkpoint

    t0 = time.perf_counter()
    out = check_report_dir(Path(out_dir))  # never onto a file or another tool's report
    out.mkdir(parents=True, exist_ok=True)
    src = default_checkpoint()
    log(f"lathe demo: {src} -> {out.resolve()}  ({torch.get_num_threads()} threads)")
    log("compressing to int8 W8A8 (SmoothQuant, per-token activations) ...")
    q = lathe.compress_checkpoint(src, "int8", out / "minilm-int8")
    log(f"  wrote {q}")
    doc = benchflow.run(q, out, batches=(1, 8), seq=128, min_runs=min_runs,
                        min_seconds=min_seconds, max_seconds=30.0, log=log)
    paths = write_all(doc, out)
    log("")
    log(table(doc))
    log("")
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return doc
