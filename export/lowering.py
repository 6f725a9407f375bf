"""ONNX lowerings of the lathe ops, one per (op, target), used as the dynamo exporter's
custom_translation_table. Export never special-cases a model: every lathe module reaches the
graph through its op, and the op's lowering emits standard ONNX that runtimes execute.

- attention: MatMul/Softmax/MatMul with an additive key-padding mask (opset 18).
- attention, opset >= 23: the standard ONNX `Attention` op. onnxruntime 1.32 runs it on CPU
  (checked: MiniLM validates at cosine 1.0); its attn_mask must be [B, 1, Sq, Sk] there (no
  broadcast over Sq), so the key-padding mask is expanded; rows with no real key give zeros, as
  lathe's kernel does. Only recent TensorRT 10.x parsers import it: opset 18 stays the default.
- linear_w8a8, target onnxruntime: per-token dynamic quantization written out in standard ops
  (ReduceMin/Max -> scale, zero point -> Round/Clip -> u8), MatMulInteger(u8, s8), the
  zero-point correction with the weight's column sums, and the fp32 epilogue. The integer
  math is the kernel's, so onnxruntime reproduces lathe's int8 model, not an approximation.
- linear_w8a8, target tensorrt: explicit quantization (QDQ) that TensorRT accepts: symmetric
  int8 QuantizeLinear/DequantizeLinear with zero point 0, per-channel (axis 0) on the weight and
  per-tensor on the activation with a STATIC scale calibrated by the exporter (see
  lathe.export.onnx.calibrate_act_scales). This is a different quantization from lathe's
  kernel (static per-tensor symmetric instead of per-token dynamic, and modules compressed
  with asymmetric activations are exported symmetric), so it is validated against PyTorch with
  a looser tolerance (lathe.export.validate.TOLERANCE["int8-static"]). Modules whose
  activations a per-tensor scale cannot represent (calibration measures it; in MiniLM the FFN
  down-projections of layers 0-3) keep float activations: weight-only DQ -> MatMul.
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript import ir

FLOAT, INT32, UINT8 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.UINT8


def _c(v, dtype=torch.float32):
    return op.Constant(value=ir.tensor(torch.tensor(v, dtype=dtype)))


def attention(q, k, v, key_padding_mask=None, causal: bool = False, scale: float | None = None):
    if scale is None:
        raise ValueError("lathe ONNX export needs an explicit attention scale")
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _c(scale))
    if key_padding_mask is not None:
        m = op.Unsqueeze(op.Cast(key_padding_mask, to=FLOAT), _c([1, 2], torch.int64))
        # 0 where the key is real, -1e30 where it is padding (finite: no NaN from -inf - -inf)
        s = op.Add(s, op.Mul(op.Sub(_c(1.0), m), _c(-1e30)))
    if causal:
        raise NotImplementedError("causal lowering is not implemented yet")
    return op.MatMul(op.Softmax(s, axis=-1), v)


def _gelu(y):
    return op.Mul(op.Mul(y, _c(0.5)), op.Add(_c(1.0), op.Erf(op.Mul(y, _c(0.7071067811865476)))))


def _epilogue(y, bias, act: str):
    """The kernel epilogue after dequantization: bias, then the fused activation."""
    if bias is not None:
        y = op.Add(y, bias)
    if act == "gelu":
        return _gelu(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    return y


def linear_w8a8_ort(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                    asym: bool = False, w_packed=None, colsum=None):
    if smooth is not None:
        x = op.Mul(x, smooth)
    axes = _c([-1], torch.int64)
    zero = _c(0.0)
    if asym:
        lo = op.Min(op.ReduceMin(x, axes, keepdims=1), zero)
        hi = op.Max(op.ReduceMax(x, axes, keepdims=1), zero)
        rng = op.Sub(hi, lo)
        s = op.Where(op.Greater(rng, zero), op.Div(rng, _c(255.0)), _c(1.0))
        zp = op.Clip(op.Round(op.Div(op.Neg(lo), s)), zero, _c(255.0))
        q = op.Clip(op.Add(op.Round(op.Mul(x, op.Reciprocal(s))), zp), zero, _c(255.0))
    else:
        amax = op.ReduceMax(op.Abs(x), axes, keepdims=1)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, _c(127.0)), _c(1.0))
        zp = _c(128.0)
        q = op.Add(op.Clip(op.Round(op.Mul(x, op.Reciprocal(s))), _c(-127.0), _c(127.0)), zp)
    acc = op.MatMulInteger(op.Cast(q, to=UINT8), op.Transpose(w_q, perm=[1, 0]))
    wsum = op.ReduceSum(op.Cast(w_q, to=INT32), _c([1], torch.int64), keepdims=0)
    acc = op.Sub(acc, op.Mul(op.Cast(zp, to=INT32), wsum))
    return _epilogue(op.Mul(op.Mul(op.Cast(acc, to=FLOAT), s), w_scale), bias, act)


def attention_opset23(q, k, v, key_padding_mask=None, causal: bool = False, scale: float | None = None):
    """The standard ONNX Attention op (opset 23). q/k/v are 4-D [B, H, S, D], so no head
    attributes are needed. The bool mask (True = attend) is expanded to [B, 1, Sq, Sk]."""
    from onnxscript import opset23 as op23

    if scale is None:
        raise ValueError("lathe ONNX export needs an explicit attention scale")
    if causal:
        raise NotImplementedError("causal lowering is not implemented yet")
    mask = None
    if key_padding_mask is not None:
        m = op.Unsqueeze(op.Cast(key_padding_mask, to=ir.DataType.BOOL), _c([1, 2], torch.int64))
        qs, ks = op.Shape(q), op.Shape(k)
        shape = op.Concat(op.Slice(qs, _c([0], torch.int64), _c([1], torch.int64)), _c([1], torch.int64),
                          op.Slice(qs, _c([2], torch.int64), _c([3], torch.int64)),
                          op.Slice(ks, _c([2], torch.int64), _c([3], torch.int64)), axis=0)
        mask = op.Expand(m, shape)
    out = op23.Attention(q, k, v, mask, scale=float(scale))
    return out[0] if isinstance(out, (tuple, list)) else out


# Activation-scale keys: the exporter names a module's weight buffer `b_<fqn with _ for .>`
# while tracing and `<fqn>` in the saved graph; the table answers to every form.
def _scale_table(act_scales: dict | None) -> dict:
    table = {}
    for k, v in (act_scales or {}).items():
        v = None if v is None else float(v)
        flat = k.replace(".", "_")
        for key in (k, flat, "b_" + flat, "p_" + flat):
            table[key] = v
    return table


def make_linear_w8a8_qdq(act_scales: dict | None):
    """The TensorRT lowering of linear_w8a8, closing over the static per-tensor activation
    scales {weight buffer name: scale} (lathe.export.onnx.calibrate_act_scales makes them).
    A scale of None keeps that module's activations in floating point (weight-only DQ)."""
    table = _scale_table(act_scales)

    def linear_w8a8_qdq(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                        asym: bool = False, w_packed=None, colsum=None):
        # asym is ignored on purpose: TensorRT accepts only zero point 0, so per-token
        # asymmetric modules are exported with a symmetric static activation scale.
        key = str(w_q.name)
        if key not in table:
            raise ValueError(f"no static activation scale for {w_q.name}: the tensorrt target needs "
                             "calibrated scales (lathe.export.onnx.export_onnx computes them)")
        if smooth is not None:
            x = op.Mul(x, smooth)
        if table[key] is None:  # calibration found static per-tensor int8 too lossy here
            xdq = x
        else:
            s_x = _c(table[key])
            zp = _c(0, torch.int8)
            xdq = op.DequantizeLinear(op.QuantizeLinear(x, s_x, zp), s_x, zp)
        wdq = op.DequantizeLinear(w_q, w_scale, axis=0)  # int8 weight: zero point 0 by default
        return _epilogue(op.MatMul(xdq, op.Transpose(wdq, perm=[1, 0])), bias, act)

    return linear_w8a8_qdq


TARGETS = ("onnxruntime", "tensorrt")


def translation_table(target: str = "onnxruntime", opset: int = 18, act_scales: dict | None = None) -> dict:
    """target onnxruntime: dynamic per-token int8 (MatMulInteger); target tensorrt: symmetric
    static QDQ with `act_scales` (see make_linear_w8a8_qdq). opset >= 23 lowers attention to
    the standard Attention op."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    linear = linear_w8a8_ort if target == "onnxruntime" else make_linear_w8a8_qdq(act_scales)
    return {
        torch.ops.lathe.attention.default: attention_opset23 if opset >= 23 else attention,
        torch.ops.lathe.linear_w8a8.default: linear,
    }
