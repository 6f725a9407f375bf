"""Backends that run an encoder on a batch. A backend is described by a Spec (kind, path,
label) so it can be built in this process or in a worker process (isolation), and is then
called with the same input dict every time.

kinds: torch (Hugging Face transformers, eager fp32: the anchor), compile (lathe's model under
torch.compile/inductor), lathe (lathe.load: compressed models on lathe's kernels),
onnxruntime (an .onnx file; CPU EP, or CUDA/TensorRT EPs where present), tensorrt (an
.engine/.plan file, GPU only), torchao-int8 / torchao-int4 (transformers' model quantized by
torchao, lathe.bench.torchao_backend; optional)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lathe.errors import BadInput

KINDS = ("torch", "compile", "lathe", "onnxruntime", "tensorrt", "torchao-int8", "torchao-int4")


@dataclass
class Spec:
    kind: str
    path: str
    label: str
    device: str = "cpu"

    def to_dict(self):
        return asdict(self)


@dataclass
class Backend:
    name: str
    run: Callable[[dict], torch.Tensor]  # input dict -> last_hidden_state [B, S, H] (fp32)
    size_bytes: int = 0
    device: str = "cpu"
    notes: dict = field(default_factory=dict)


def size_on_disk(p) -> int:
    p = Path(p)
    if p.is_file():
        return p.stat().st_size + sum(f.stat().st_size for f in p.parent.glob(p.name + ".data"))
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def _to(b: dict, device: str) -> dict:
    return b if device == "cpu" else {k: v.to(device) for k, v in b.items()}


def make(spec: Spec) -> Backend:
    if spec.kind not in KINDS:
        raise BadInput(f"unknown backend kind {spec.kind!r}; expected one of {', '.join(KINDS)}")
    dev = spec.device
    if spec.kind == "torch":
        from lathe.models.generic import reference_model

        m = reference_model(spec.path).to(dev)  # transformers' own class for the checkpoint, fp32

        def run(b):
            with torch.inference_mode():
                out = m(**_to(b, dev))
                return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float().cpu()
    elif spec.kind in ("lathe", "compile"):
        from lathe.compress.checkpoint import load

        m = load(spec.path, dev)
        if spec.kind == "compile":
            m = torch.compile(m)

        def run(b):
            with torch.inference_mode():
                return m(**_to(b, dev)).float().cpu()
    elif spec.kind.startswith("torchao"):  # an anchor: torchao's quantize_ on transformers' model
        from lathe.bench.torchao_backend import quantized

        m, nbytes = quantized(spec.path, spec.kind)

        def run(b):
            with torch.inference_mode():
                return m(**b).float()
        return Backend(spec.label, run, nbytes, dev)
    elif spec.kind == "onnxruntime":
        from lathe.export.validate import ort_session

        sess = ort_session(spec.path)
        names = {i.name for i in sess.get_inputs()}

        def run(b):
            return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0])
    else:
        from lathe.export.tensorrt import TrtRunner

        r = TrtRunner(spec.path)

        def run(b):
            return r(**_to(b, "cuda"))[0].float().cpu()
    return Backend(spec.label, run, size_on_disk(spec.path), dev)


# onnxruntime's own int8 recipes, the anchors for int8 on CPU (lathe bench: ort-int8, ort-int8-pc).
ORT_INT8_RECIPES = {
    # quantize_dynamic's default: per-tensor u8/s8, and it also quantizes the embedding Gather
    "ort-int8": ("onnxruntime int8 (quantize_dynamic)", {}),
    # its better recipe on encoders: per-channel weights, MatMuls only (embeddings stay fp32)
    "ort-int8-pc": ("onnxruntime int8 per-channel (quantize_dynamic)",
                    {"per_channel": True, "op_types_to_quantize": ["MatMul"]}),
}


def ort_quantize_dynamic(fp32_onnx, out_path, recipe: str = "ort-int8") -> Path:
    """An fp32 graph quantized by onnxruntime's quantize_dynamic with one of ORT_INT8_RECIPES."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lathe.io import atomic_file

    if recipe not in ORT_INT8_RECIPES:
        raise BadInput(f"unknown onnxruntime int8 recipe {recipe!r}; expected one of {', '.join(ORT_INT8_RECIPES)}")
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" warning
    with atomic_file(Path(out_path)) as tmp:
        quantize_dynamic(str(fp32_onnx), str(tmp), weight_type=QuantType.QInt8, **ORT_INT8_RECIPES[recipe][1])
    return Path(out_path)
