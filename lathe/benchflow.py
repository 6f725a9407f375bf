"""The comparison that `lathe bench` and `lathe demo` run. For a model directory (original or
lathe compressed): torch fp32 (the anchor), lathe, onnxruntime fp32, onnxruntime's two int8
recipes (quantize_dynamic default, and per-channel on MatMuls only, its better one on
encoders) and lathe's own ONNX on onnxruntime, each with its quality against torch fp32. For
an .onnx or .engine file: that file alone (quality needs a model directory)."""
from __future__ import annotations

from pathlib import Path

from lathe.errors import BadInput

ALL = ("torch", "compile", "lathe", "lathe-fp32", "onnxruntime", "ort-int8", "ort-int8-pc", "lathe-onnx",
       "lathe-onnx-fast", "lathe-onnx-hybrid", "lathe-onnx-exact")
ANCHORS = ("torchao-int8", "torchao-int4")  # other tools, optional packages (lathe.bench.torchao_backend)
DEFAULT = ("torch", "lathe", "onnxruntime", "ort-int8", "ort-int8-pc", "lathe-onnx")
REFERENCE = "torch fp32"


def check_onnx_file(path: Path):
    """Parses the graph (not its external data): an empty or corrupt file is a BadInput."""
    if path.stat().st_size == 0:
        raise BadInput(f"{path} is empty: not an ONNX model")
    import onnx
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 protobuf's DecodeError and friends: the file is bad
        raise BadInput(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
    if not m.graph.node and not m.graph.output:
        raise BadInput(f"{path} is not a valid ONNX model (no graph)")


def _file_target(target: Path, model_dir) -> list:
    from lathe.bench.backends import Spec

    if target.suffix == ".onnx":
        check_onnx_file(target)
        return [Spec("onnxruntime", str(target), f"onnxruntime {target.name}")]
    if target.suffix in (".engine", ".plan"):
        from lathe.export.tensorrt import require_tensorrt
        require_tensorrt()  # BadInput naming the missing package, before any work
        if target.stat().st_size == 0:
            raise BadInput(f"{target} is empty: not a TensorRT engine")
        return [Spec("tensorrt", str(target), f"tensorrt {target.name}", "cuda")]
    raise BadInput(f"{target}: expected a model directory, an .onnx file or an .engine/.plan file")


def run(target, workdir: Path, backends=DEFAULT, batches=(1, 8), seq: int = 128, min_runs: int = 100,
        min_seconds: float = 10.0, max_seconds: float | None = None, isolate: bool = False,
        threads: int | None = None, model_dir=None, device: str = "cpu", log=print) -> dict:
    from lathe.bench.backends import ORT_INT8_RECIPES, Spec, ort_quantize_dynamic
    from lathe.bench.encoder import run_grid
    from lathe.export.onnx import export_onnx
    from lathe.source import default_checkpoint, open_source, recorded_source

    unknown = [b for b in backends if b not in ALL + ANCHORS]
    if unknown:
        raise BadInput(f"unknown backend {unknown[0]!r}; expected some of {', '.join(ALL + ANCHORS)}")
    target = Path(target)
    if not target.exists():
        raise BadInput(f"no such file or directory: {target}")
    if target.is_file():
        tok_dir = open_source(model_dir or default_checkpoint()).path
        specs = _file_target(target, model_dir)
        return run_grid(specs, tok_dir, batches, seq, min_runs, min_seconds, max_seconds, None, isolate,
                        threads, config={"target": str(target)})
    tgt = open_source(target)
    src = recorded_source(tgt) if tgt.is_compressed else tgt
    workdir.mkdir(parents=True, exist_ok=True)
    name = "lathe " + (tgt.manifest["recipe"]["name"] if tgt.is_compressed else "fp32")
    specs = []
    if "torch" in backends:
        specs.append(Spec("torch", str(src.path), REFERENCE, device))
    if "compile" in backends:
        specs.append(Spec("compile", str(tgt.path), f"torch.compile {name}", device))
    if "lathe-fp32" in backends and tgt.is_compressed:  # the uncompressed model on lathe's kernels
        specs.append(Spec("lathe", str(src.path), "lathe fp32 (uncompressed)", device))
    if "lathe" in backends:
        specs.append(Spec("lathe", str(tgt.path), name, device))
    skipped = _torchao_specs(backends, src, specs, device, log)
    recipes = [r for r in ORT_INT8_RECIPES if r in backends]
    if "onnxruntime" in backends or recipes:
        fp32_onnx = workdir / "model-fp32.onnx"
        log(f"exporting {src.path.name} to ONNX (fp32) ...")
        _, v = export_onnx(src.path, fp32_onnx)
        log("  " + v.summary())
        if "onnxruntime" in backends:
            specs.append(Spec("onnxruntime", str(fp32_onnx), "onnxruntime fp32"))
        for r in recipes:
            q = ort_quantize_dynamic(fp32_onnx, workdir / f"model-{r}.onnx", r)
            specs.append(Spec("onnxruntime", str(q), ORT_INT8_RECIPES[r][0]))
    if "lathe-onnx" in backends and tgt.is_compressed:
        log(f"exporting {tgt.path.name} to ONNX (lathe lowering) ...")
        p, v = export_onnx(tgt.path, workdir / "model-lathe.onnx")
        log("  " + v.summary())
        specs.append(Spec("onnxruntime", str(p), f"{name} ONNX on onnxruntime"))
    for mode in ("fast", "hybrid", "exact"):  # the other int8 lowerings (lathe.export.lowerings.w8a8)
        if f"lathe-onnx-{mode}" in backends and tgt.is_compressed:
            log(f"exporting {tgt.path.name} to ONNX ({mode} int8 lowering) ...")
            p, v = export_onnx(tgt.path, workdir / f"model-lathe-{mode}.onnx", int8_mode=mode)
            log("  " + v.summary())
            specs.append(Spec("onnxruntime", str(p), f"{name} ONNX {mode} on onnxruntime"))
    log(f"timing {len(specs)} backends x batches {list(batches)} at seq {seq}"
        + (" (each in its own process)" if isolate else "") + " ...")
    doc = run_grid(specs, src.path, batches, seq, min_runs, min_seconds, max_seconds,
                   REFERENCE if "torch" in backends else None, isolate, threads,
                   config={"target": str(tgt.path), "source": str(src.path)})
    if skipped:
        doc["skipped"] = skipped
    return doc


def _torchao_specs(backends, src, specs, device, log) -> dict:
    """torchao anchors (optional): a Spec each; {backend: why} for one without a kernel here."""
    from lathe.bench.backends import Spec

    skipped = {}
    for kind in ("torchao-int8", "torchao-int4"):
        if kind not in backends:
            continue
        from lathe.bench import torchao_backend as tao

        if device != "cpu":
            raise BadInput(f"{kind} is a CPU anchor here (lathe bench --device cuda compares torch fp16)")
        try:
            tao.check(kind)  # BadInput without torchao
        except tao.Unavailable as e:
            skipped[kind] = str(e)
            log(f"{kind}: skipped: {e}")
            continue
        specs.append(Spec(kind, str(src.path), f"{tao.KINDS[kind]} {tao.version()}", device))
    return skipped
