"""ONNX lowerings of the lathe ops, one per (op, target), used as the dynamo exporter's
custom_translation_table. Export never special-cases a model: every lathe module reaches the
graph through its op, and the op's lowering emits standard ONNX that runtimes execute.

- attention: MatMul/Softmax/MatMul with an additive key-padding mask (opset 18).
- linear_w8a8, target onnxruntime: per-token dynamic quantization written out in standard ops
  (ReduceMin/Max -> scale, zero point -> Round/Clip -> u8), MatMulInteger(u8, s8), the
  zero-point correction with the weight's column sums, and the fp32 epilogue. The integer
  math is the kernel's, so onnxruntime reproduces lathe's int8 model, not an approximation.
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
    y = op.Mul(op.Mul(op.Cast(acc, to=FLOAT), s), w_scale)
    if bias is not None:
        y = op.Add(y, bias)
    if act == "gelu":
        y = _gelu(y)
    elif act == "silu":
        y = op.Mul(y, op.Sigmoid(y))
    return y


def translation_table(target: str = "onnxruntime") -> dict:
    if target != "onnxruntime":
        raise ValueError(f"unknown export target {target!r}: expected onnxruntime")
    return {
        torch.ops.lathe.attention.default: attention,
        torch.ops.lathe.linear_w8a8.default: linear_w8a8_ort,
    }
