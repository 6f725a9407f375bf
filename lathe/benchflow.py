"""The standard encoder comparison that `lathe bench` and `lathe demo` run: torch fp32 (the
anchor), lathe (fp32 or compressed), onnxruntime fp32 and onnxruntime int8 (quantize_dynamic),
and lathe's own int8 ONNX on onnxruntime, each with its quality against torch fp32."""
from __future__ import annotations

from pathlib import Path

from lathe.errors import BadInput

ALL = ("torch", "compile", "lathe", "onnxruntime", "ort-int8", "lathe-onnx")
DEFAULT = ("torch", "lathe", "onnxruntime", "ort-int8", "lathe-onnx")


def run(target, workdir: Path, backends=DEFAULT, batches=(1, 8), seq: int = 128, min_runs: int = 100,
        min_seconds: float = 10.0, max_seconds: float | None = None, log=print) -> dict:
    from lathe.bench import backends as B
    from lathe.bench.encoder import run_grid
    from lathe.export.onnx import export_onnx
    from lathe.source import open_source
    from lathe.text import Tokenizer, eval_sentences

    unknown = [b for b in backends if b not in ALL]
    if unknown:
        raise BadInput(f"unknown backend {unknown[0]!r}; expected some of {', '.join(ALL)}")
    tgt = open_source(target)
    src = open_source(tgt.manifest["source"]["path"]) if tgt.is_compressed else tgt
    workdir.mkdir(parents=True, exist_ok=True)
    name = "lathe " + (tgt.manifest["recipe"]["name"] if tgt.is_compressed else "fp32")
    fp32_onnx = workdir / "model-fp32.onnx"
    made = []
    if "torch" in backends:
        made.append(B.torch_eager(src.path))
    if "compile" in backends:
        made.append(B.torch_compile(src.path))
    if "lathe" in backends:
        made.append(B.lathe_model(tgt.path, name))
    if "onnxruntime" in backends or "ort-int8" in backends:
        log(f"exporting {src.path.name} to ONNX (fp32) ...")
        _, v = export_onnx(src.path, fp32_onnx)
        log("  " + v.summary())
        if "onnxruntime" in backends:
            made.append(B.onnxruntime(fp32_onnx, "onnxruntime fp32"))
        if "ort-int8" in backends:
            q = B.ort_quantize_dynamic(fp32_onnx, workdir / "model-ort-int8.onnx")
            made.append(B.onnxruntime(q, "onnxruntime int8 (quantize_dynamic)"))
    if "lathe-onnx" in backends and tgt.is_compressed:
        log(f"exporting {tgt.path.name} to ONNX (lathe int8 lowering) ...")
        p, v = export_onnx(tgt.path, workdir / "model-lathe.onnx")
        log("  " + v.summary())
        made.append(B.onnxruntime(p, f"{name} ONNX on onnxruntime"))
    ref = "torch fp32" if "torch" in backends else None
    tok = Tokenizer(src.path)
    log(f"timing {len(made)} backends x batches {list(batches)} at seq {seq} ...")
    return run_grid(made, tok, eval_sentences(), batches, seq, min_runs, min_seconds, max_seconds,
                    reference=ref, config={"target": str(tgt.path), "source": str(src.path)})
