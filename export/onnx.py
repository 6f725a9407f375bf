"""ONNX export with torch.onnx.export(dynamo=True), dynamic batch and sequence axes, lathe's
op lowerings, and validation against PyTorch on onnxruntime every time."""
from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import torch

from lathe.errors import BadInput


def _example_inputs(model_dir, batch: int = 2, seq: int = 16):
    """Sizes above 1 on the dynamic axes: torch.export would bake in a size of 0 or 1."""
    from lathe.text import Tokenizer

    tok = Tokenizer(model_dir)
    return tok(["lathe exports a model to onnx"] * batch, seq_len=seq)


def export_model(model, example: dict, out: Path, target: str = "onnxruntime", opset: int = 18):
    from torch.export import Dim

    from lathe.compress.checkpoint import atomic_file
    from lathe.export.lowering import translation_table

    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=512)
    names = list(example)
    dyn = {n: {0: batch, 1: seq} for n in names}
    with torch.inference_mode(False), torch.no_grad():
        # The exporter is chatty on stdout; lathe prints its own summary.
        with redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(
                model, (), kwargs=dict(example), dynamo=True, opset_version=opset,
                input_names=names, output_names=["last_hidden_state"], dynamic_shapes=dyn,
                custom_translation_table=translation_table(target), optimize=True,
                verbose=False)
    with atomic_file(Path(out)) as tmp:
        prog.save(str(tmp))
    return Path(out)


def export_onnx(src, out, target: str = "onnxruntime", opset: int = 18, validate: bool = True,
                batch: int = 2, seq: int = 16):
    """Export checkpoint `src` (HF or lathe compressed) to `out`; returns (path, report)."""
    import lathe
    from lathe.export.validate import validate_onnx
    from lathe.source import open_source, writable_parent

    if opset < 18:
        raise BadInput(f"opset {opset} is too old: lathe exports opset 18 or newer")
    source = open_source(src)
    out = writable_parent(out)
    model = lathe.load(source.path)
    example = _example_inputs(source.path, batch, seq)
    export_model(model, example, out, target, opset)
    report = validate_onnx(out, model, source.path, quantized=source.is_compressed) if validate else None
    return out, report
