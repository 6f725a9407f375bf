"""ONNX export of a model on lathe's generic transformers path (lathe.models.generic): the
transformers forward traced by torch.export with lathe's op lowerings, no KV cache (a decoder
exports its logits for a whole sequence; lathe's own Llama adapter exports the cached form).
Validated on onnxruntime against the PyTorch model: text models by lathe.export.validate,
vision models on synthetic images here."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from lathe.errors import BadInput


def example_inputs(model, source, batch: int = 2, seq: int = 16) -> dict:
    """Inputs the transformers forward takes, sizes above 1 on the dynamic axes."""
    from lathe.models.generic import _base, image_batches, takes_pixels

    if takes_pixels(source.config):
        return image_batches(source.config, batch, batch, seed=3)[0]
    from lathe.export.onnx import _example_inputs

    params = set(inspect.signature(_base(model).forward).parameters)
    return {k: v for k, v in _example_inputs(source.path, batch, seq).items() if k in params}


class Traced(torch.nn.Module):
    """The adapted model behind an explicit signature (torch.export maps dynamic shapes by
    parameter name; the adapter's forward takes **kwargs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  pixel_values=pixel_values)
        return self.model(**{k: v for k, v in kw.items() if v is not None})


def export_generic(model, source, out: Path, target: str, opset: int, validate: bool, int8_mode: str,
                   accuracy_level: int, external_data, slim: bool):
    from torch.export import Dim

    from lathe.export.onnx import REFERENCE_OPS, export_model, precision_of
    from lathe.export.validate import validate_onnx
    from lathe.models.generic import takes_pixels

    if target != "onnxruntime":
        raise BadInput(f"the generic transformers path exports for onnxruntime only (got target {target!r})")
    example = example_inputs(model, source)
    pixels = takes_pixels(source.config)
    batch = Dim("batch", min=1, max=4096)
    if pixels:
        dynamic = {"pixel_values": {0: batch}}
    else:
        seq = Dim("seq", min=2, max=256)
        dynamic = {n: {0: batch, 1: seq} for n in example}
    names = ("logits",) if model.is_decoder else ("last_hidden_state",)
    try:
        export_model(Traced(model), example, out, target, opset, None, int8_mode, None, accuracy_level,
                     external_data, dynamic=dynamic, output_names=names)
    except Exception as e:  # torch.export cannot trace some transformers code paths
        raise BadInput(f"ONNX export of {type(model).__mro__[2].__name__} failed in torch.export: "
                       f"{str(e).splitlines()[0][:300]}") from None
    if slim:
        from lathe.export.save import slim as slim_file
        slim_file(out)
    precision = precision_of(model, target, int8_mode, accuracy_level) if source.is_compressed else "fp32"
    if not validate:
        return out, None
    if pixels:
        return out, validate_images(out, model, source, precision)
    return out, validate_onnx(out, model, source.path, quantized=source.is_compressed, precision=precision,
                              reference_ops=REFERENCE_OPS)


def validate_images(path, model, source, precision: str):
    """onnxruntime against PyTorch on synthetic images, lathe.export.validate's tolerances."""
    from lathe.export.validate import TOLERANCE, Validation, ValidationFailed, ort_session
    from lathe.models.generic import image_batches

    sess = ort_session(path)
    max_abs = max_rel = 0.0
    min_cos = 1.0
    shapes = []
    for b in image_batches(source.config, 8, 3, seed=4)[:2]:
        with torch.inference_mode():
            ref = model(**b).float()
        got = torch.from_numpy(sess.run(None, {"pixel_values": b["pixel_values"].numpy()})[0])
        max_abs = max(max_abs, float((got - ref).abs().max()))
        max_rel = max(max_rel, float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)))
        pool = (lambda t: t.mean(1)) if ref.dim() == 3 else (lambda t: t.flatten(1))  # ViT tokens, or logits
        min_cos = min(min_cos, float(torch.nn.functional.cosine_similarity(pool(got), pool(ref)).min()))
        shapes.append(list(b["pixel_values"].shape))
    tol = TOLERANCE[precision]
    v = Validation(str(path), precision, max_abs, max_rel, min_cos, shapes,
                   min_cos >= tol["min_cos"] and max_rel <= tol["max_rel"])
    if not v.passed:
        raise ValidationFailed(v.summary())
    return v
