"""Backends that run an encoder on a batch: each is prepared once (model load, session build,
quantization) and then called with the same input dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Backend:
    name: str
    run: Callable[[dict], torch.Tensor]  # input dict -> last_hidden_state [B, S, H] (fp32)
    size_bytes: int = 0
    notes: dict = field(default_factory=dict)


def _dir_size(p) -> int:
    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*.safetensors")) + sum(f.stat().st_size for f in p.rglob("*.onnx*"))


def torch_eager(model_dir) -> Backend:
    """The anchor: Hugging Face transformers' own model, fp32, eager."""
    from transformers import BertModel

    m = BertModel.from_pretrained(str(model_dir)).eval()

    def run(b):
        with torch.inference_mode():
            return m(**b).last_hidden_state
    return Backend("torch fp32", run, _dir_size(model_dir))


def torch_compile(model_dir) -> Backend:
    import lathe

    m = torch.compile(lathe.load(model_dir))

    def run(b):
        with torch.inference_mode():
            return m(**b)
    return Backend("torch.compile fp32", run, _dir_size(model_dir))


def lathe_model(path, label: str | None = None) -> Backend:
    import lathe

    m = lathe.load(path)

    def run(b):
        with torch.inference_mode():
            return m(**b)
    return Backend(label or f"lathe {Path(path).name}", run, _dir_size(path))


def onnxruntime(onnx_path, label: str) -> Backend:
    from lathe.export.validate import ort_session

    sess = ort_session(onnx_path)
    names = {i.name for i in sess.get_inputs()}

    def run(b):
        return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0])
    return Backend(label, run, _dir_size(onnx_path))


def ort_quantize_dynamic(fp32_onnx, out_path) -> Path:
    """The anchor for int8 on CPU: onnxruntime's own quantize_dynamic (per-tensor u8/s8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lathe.compress.checkpoint import atomic_file

    with atomic_file(Path(out_path)) as tmp:
        quantize_dynamic(str(fp32_onnx), str(tmp), weight_type=QuantType.QInt8)
    return Path(out_path)
