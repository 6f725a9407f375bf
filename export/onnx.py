"""ONNX export with torch.onnx.export(dynamo=True), dynamic batch and sequence axes, lathe's
op lowerings, and validation against PyTorch on onnxruntime every time.

Targets: `onnxruntime` (dynamic per-token int8 through MatMulInteger, lathe's exact integer
math) and `tensorrt` (symmetric static QDQ, which TensorRT accepts; the activation scales are
calibrated here on lathe's calibration texts, see calibrate_act_scales)."""
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


def calibrate_act_scales(model, model_dir, texts=None, batch_size: int = 16,
                         max_act_error: float = 0.08, error_texts: int = 32) -> dict:
    """Static per-tensor activation scales for the tensorrt target: {"<module>.weight": scale}.

    Runs the lathe model on calibration text (lathe.text.calibration_texts unless `texts`)
    with a pre-hook on every QLinearW8A8 that records max |x * smooth| over the real
    (non-padding) tokens; scale = amax / 127 (symmetric, zero point 0).

    A per-tensor static scale cannot represent some activations: BERT's FFN down-projection
    inputs carry one channel ~8x larger than the rest on a few tokens, which per-token dynamic
    quantization absorbs and a per-tensor scale does not (MiniLM: 0.88 cosine with every
    module quantized). A second pass measures each module's relative output error
    ||(Q(x) - x) W^T|| / ||x W^T|| on the first `error_texts` texts; a module above
    `max_act_error` gets scale None: the lowering keeps its activations in floating point
    (weight-only int8 DQ, no activation Q/DQ). max_act_error=float("inf") quantizes all."""
    from lathe.compress.modules import QLinearW8A8
    from lathe.text import Tokenizer, batches, calibration_texts

    mods = {n: m for n, m in model.named_modules() if isinstance(m, QLinearW8A8)}
    if not mods:
        return {}
    texts = list(texts or calibration_texts())
    if not texts:
        raise BadInput("calibration needs at least one text")
    tok = Tokenizer(model_dir)
    amax = dict.fromkeys(mods, 0.0)
    err = {n: [0.0, 0.0] for n in mods}
    state = {}

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().float()
            if mod.smooth is not None:
                x = x * mod.smooth
            m = state.get("mask")
            if m is not None and x.dim() == 3 and tuple(m.shape) == tuple(x.shape[:2]):
                x = x[m.bool()]
            if not x.numel():
                return
            if state["pass"] == 0:
                amax[name] = max(amax[name], float(x.abs().max()))
                return
            s = amax[name] / 127.0 if amax[name] > 0 else 1.0
            xq = torch.clamp(torch.round(x / s), -128, 127) * s
            w = (mod.weight.float() * mod.weight_scale[:, None]).t()
            err[name][0] += float(((xq - x) @ w).pow(2).sum())
            err[name][1] += float((x @ w).pow(2).sum())
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        with torch.inference_mode():
            for p, subset in ((0, texts), (1, texts[:error_texts] if max_act_error != float("inf") else [])):
                state["pass"] = p
                for b in batches(tok, subset, batch_size):
                    state["mask"] = b["attention_mask"]
                    model(**b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, a in amax.items():
        e, ref = err[n]
        rel = (e / ref) ** 0.5 if ref > 0 else 0.0
        out[f"{n}.weight"] = None if rel > max_act_error else (a / 127.0 if a > 0 else 1.0)
    return out


def export_model(model, example: dict, out: Path, target: str = "onnxruntime", opset: int = 18,
                 act_scales: dict | None = None):
    """act_scales: static activation scales for target tensorrt (calibrate_act_scales)."""
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
                custom_translation_table=translation_table(target, opset, act_scales), optimize=True,
                verbose=False)
    with atomic_file(Path(out)) as tmp:
        prog.save(str(tmp))
    return Path(out)


def export_onnx(src, out, target: str = "onnxruntime", opset: int = 18, validate: bool = True,
                batch: int = 2, seq: int = 16, calib=None):
    """Export checkpoint `src` (HF or lathe compressed) to `out`; returns (path, report).

    target "tensorrt": int8 linears become symmetric static QDQ; their activation scales are
    calibrated on `calib` (a list of texts; default lathe.text.calibration_texts()). Modules
    compressed with per-token asymmetric activations are exported symmetric (TensorRT accepts
    zero point 0 only), so the graph is validated with the looser "int8-static" tolerance."""
    import lathe
    from lathe.export.lowering import TARGETS
    from lathe.export.validate import validate_onnx
    from lathe.source import open_source, writable_parent

    if opset < 18:
        raise BadInput(f"opset {opset} is too old: lathe exports opset 18 or newer")
    if target not in TARGETS:
        raise BadInput(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    source = open_source(src)
    out = writable_parent(out)
    model = lathe.load(source.path)
    example = _example_inputs(source.path, batch, seq)
    scales = calibrate_act_scales(model, source.path, calib) if target == "tensorrt" else None
    export_model(model, example, out, target, opset, scales)
    precision = None
    if source.is_compressed and target == "tensorrt":
        precision = "int8-static"
    report = (validate_onnx(out, model, source.path, quantized=source.is_compressed, precision=precision)
              if validate else None)
    return out, report
