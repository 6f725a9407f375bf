"""ONNX lowering of the int8 weight-only format (int8_weight_only, torch.ops.lathe.linear_w8a16),
both targets: int8 DequantizeLinear (per channel axis 0; per group blocked along K at opset
21) + MatMul: the reference's own math."""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

from lathe.export.lowerings import register_lowering
from lathe.export.lowerings.common import const, epilogue


def linear_w8a16(x, qweight, scales, bias=None, group_size: int = 0, packed=None):
    """int8 DQ + MatMul; per group needs opset 21 (blocked DequantizeLinear)."""
    if group_size:
        from onnxscript import opset21 as op21
        w = op21.DequantizeLinear(qweight, scales, axis=1, block_size=group_size)
    else:
        w = op.DequantizeLinear(qweight, op.Reshape(scales, const([-1], torch.int64)), axis=0)
    return epilogue(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)


@register_lowering("int8_weight_only")
def lower(ctx):
    return linear_w8a16
