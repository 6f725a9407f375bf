"""ONNX lowerings of the int4 weight-only format (int4_group, torch.ops.lathe.linear_w4a16).

- target onnxruntime: `com.microsoft.MatMulNBits` (bits 4, block_size = the group size).
  lathe's Int4Group layout is MatMulNBits' already: B [N, K/g, g/2] (low nibble = even k),
  scales [N*K/g], zero points packed two a byte [N, ceil((K/g)/2)]. accuracy_level 4 lets
  onnxruntime quantize the activations to int8 per block (its fast path); 0 keeps fp32
  activations (closer to PyTorch).
- target tensorrt: block-wise INT4 DequantizeLinear (opset 21, axis 1, block_size g) + MatMul.
  TensorRT takes zero point 0 only, so the weight is stored as signed INT4 `code - 8`, and an
  asymmetric module's zero point becomes an exact fp correction: W = (code - 8) * s + (8 - zero) * s,
  and x @ [(8 - zero) * s]^T expanded over each group is (x summed over each group of g inputs)
  @ [(8 - zero) * s]^T, a [.., K/g] x [K/g, N] MatMul.

Both read the module's packed buffers through the exporter's Buffers table (the exporter
passes symbolic tensors only)."""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

from lathe.export.lowerings import register_lowering
from lathe.export.lowerings.common import Buffers, const, epilogue, msft, tensor


def _codes(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """int4 codes 0..15 [N, K] from lathe's packed [N, K/2] (low nibble = even k)."""
    q = qweight.to(torch.uint8)
    out = torch.empty(q.shape[0], K, dtype=torch.uint8)
    out[:, 0::2], out[:, 1::2] = q & 0xF, q >> 4
    return out


def matmulnbits_inputs(qweight, scales, zeros, group_size: int):
    """lathe Int4Group buffers -> MatMulNBits' B [N, K/g, g/2], scales [N*K/g], packed zero
    points [N * ceil((K/g)/2)] (numpy)."""
    N, G = scales.shape
    B = qweight.to(torch.uint8).reshape(N, G, group_size // 2).numpy()
    z = zeros.to(torch.uint8)
    if G % 2:
        z = torch.cat([z, torch.zeros(N, 1, dtype=torch.uint8)], dim=1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1).numpy()
    return B, scales.float().reshape(-1).numpy(), zp


def make_linear_w4a16(target: str, buffers: Buffers, accuracy_level: int = 4):
    nbits = msft("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"],
                 ("K", "N", "bits", "block_size", "accuracy_level"))

    def linear_w4a16_ort(x, qweight, scales, zeros, group_size: int, bias=None,
                         p_codes=None, p_scales=None, p_zeros=None):
        N, G = buffers(scales).shape
        B, s, zp = matmulnbits_inputs(buffers(qweight), buffers(scales), buffers(zeros), group_size)
        return nbits(x, tensor(B), tensor(s), tensor(zp), None, bias, K=G * group_size, N=N, bits=4,
                     block_size=group_size, accuracy_level=accuracy_level)

    def linear_w4a16_dq(x, qweight, scales, zeros, group_size: int, bias=None,
                        p_codes=None, p_scales=None, p_zeros=None):
        import ml_dtypes
        from onnxscript import opset21 as op21

        s = buffers(scales).float()
        z = buffers(zeros).to(torch.int16)
        N, G = s.shape
        K = G * group_size
        w4 = (_codes(buffers(qweight), K).to(torch.int16) - 8).numpy().astype(ml_dtypes.int4)
        w = op21.DequantizeLinear(tensor(w4), tensor(s.numpy()), axis=1, block_size=group_size)
        y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
        off = (8 - z).float() * s  # [N, G]: the zero point's share, exact
        if bool((off != 0).any()):
            shape = op.Concat(op.Slice(op.Shape(x), const([0], torch.int64), const([-1], torch.int64)),
                              const([G, group_size], torch.int64), axis=0)
            xg = op.ReduceSum(op.Reshape(x, shape), const([-1], torch.int64), keepdims=0)
            y = op.Add(y, op.MatMul(xg, tensor(off.t().contiguous().numpy())))
        return epilogue(y, bias)

    return linear_w4a16_ort if target == "onnxruntime" else linear_w4a16_dq


@register_lowering("int4_group")
def lower(ctx):
    return None if ctx.buffers is None else make_linear_w4a16(ctx.target, ctx.buffers, ctx.accuracy_level)
