"""ONNX lowering of the FP8 format (fp8_e4m3, torch.ops.lathe.linear_fp8), both targets:
FLOAT8E4M3FN weight + DequantizeLinear, and the activations quantized in the graph: scale =
amax / 448 per token (x flattened to [M, K], axis 0) or per tensor, QuantizeLinear to
FLOAT8E4M3FN (saturating, round to nearest even as torch.float8_e4m3fn) and DequantizeLinear
back, then MatMul in fp32: the same math as QLinearFP8's reference forward."""
from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op

from lathe.export.lowerings import register_lowering
from lathe.export.lowerings.common import const, epilogue

FP8_MAX = 448.0


def linear_fp8(x, w_fp8, w_scale, bias=None, act_granularity: str = "per_token"):
    from onnxscript import opset19 as op19

    FP8 = ir.DataType.FLOAT8E4M3FN
    zero, one = const(0.0), const(1.0)
    if w_scale.shape is not None and w_scale.shape[0] == 1:
        w = op19.DequantizeLinear(w_fp8, op.Reshape(w_scale, const([], torch.int64)))
    else:
        w = op19.DequantizeLinear(w_fp8, w_scale, axis=0)
    zp = op.Cast(zero, to=FP8)  # sets QuantizeLinear's output type
    if act_granularity == "per_token":
        # QuantizeLinear takes a per-axis scale only 1-D: x is divided by its [.., 1] scale and
        # quantized with scale 1 (the same values), then multiplied back after the DQ.
        amax = op.ReduceMax(op.Abs(x), const([-1], torch.int64), keepdims=1)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, const(FP8_MAX)), one)
        xdq = op.Mul(op19.DequantizeLinear(op19.QuantizeLinear(op.Div(x, s), one, zp), one, zp), s)
    else:
        amax = op.ReduceMax(op.Abs(x), keepdims=0)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, const(FP8_MAX)), one)
        xdq = op19.DequantizeLinear(op19.QuantizeLinear(x, s, zp), s, zp)
    return epilogue(op.MatMul(xdq, op.Transpose(w, perm=[1, 0])), bias)


@register_lowering("fp8_e4m3")
def lower(ctx):
    return linear_fp8
