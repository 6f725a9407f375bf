"""ONNX lowerings of lathe's weight-only and FP8 linears (see lathe.export.lowering for the
int8 W8A8 ones and the translation table).

- linear_w4a16, target onnxruntime: `com.microsoft.MatMulNBits` (bits 4, block_size = the
  group size). lathe's Int4Group layout is MatMulNBits' already: B [N, K/g, g/2] (low nibble
  = even k), scales [N*K/g], zero points packed two a byte [N, ceil((K/g)/2)].
  accuracy_level 4 lets onnxruntime quantize the activations to int8 per block (its fast
  path); 0 keeps fp32 activations (closer to PyTorch).
- linear_w4a16, target tensorrt: block-wise INT4 DequantizeLinear (opset 21, axis 1,
  block_size g) + MatMul. TensorRT takes zero point 0 only, so the weight is stored as signed
  INT4 `code - 8`, and an asymmetric module's zero point becomes an exact fp correction:
  W = (code - 8) * s + (8 - zero) * s, and x @ [(8 - zero) * s]^T expanded over each group is
  (x summed over each group of g inputs) @ [(8 - zero) * s]^T, a [.., K/g] x [K/g, N] MatMul.
- linear_w8a16 (both targets): int8 DequantizeLinear (per channel axis 0; per group blocked
  along K at opset 21) + MatMul.
- linear_fp8 (both targets): FLOAT8E4M3FN weight + DequantizeLinear, and the activations
  quantized in the graph: scale = amax / 448 per token (x flattened to [M, K], axis 0) or per
  tensor, QuantizeLinear to FLOAT8E4M3FN (saturating, round to nearest even as
  torch.float8_e4m3fn) and DequantizeLinear back, then MatMul in fp32: the same math as
  QLinearFP8's reference forward.

The int4 lowerings read the module's buffers (the exporter passes symbolic tensors only): the
exporter gives them a `Buffers` table of the model's buffers by every name the graph uses."""
from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op

FP8_MAX = 448.0


def _c(v, dtype=torch.float32):
    return op.Constant(value=ir.tensor(torch.tensor(v, dtype=dtype)))


def _k(a) -> "op":
    """A constant from a numpy array or torch tensor (int4/uint4 numpy arrays included)."""
    return op.Constant(value=ir.tensor(a))


class Buffers:
    """The model's buffers by every name the exporter gives them: `<fqn>` in the saved graph,
    `b_<fqn with . as _>` while tracing."""

    def __init__(self, model):
        self.table = {}
        for name, t in model.named_buffers():
            flat = name.replace(".", "_")
            for key in (name, flat, "b_" + flat, "p_" + flat):
                self.table[key] = t

    def __call__(self, sym) -> torch.Tensor:
        t = self.table.get(str(sym.name))
        if t is None:
            raise ValueError(f"no buffer named {sym.name} in the model being exported")
        return t.detach().cpu()


def _epilogue(y, bias):
    return y if bias is None else op.Add(y, bias)


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
    from lathe.export.lowering import msft

    nbits = msft("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"],
                 ("K", "N", "bits", "block_size", "accuracy_level"))

    def linear_w4a16_ort(x, qweight, scales, zeros, group_size: int, bias=None,
                         p_codes=None, p_scales=None, p_zeros=None):
        N, G = buffers(scales).shape
        B, s, zp = matmulnbits_inputs(buffers(qweight), buffers(scales), buffers(zeros), group_size)
        return nbits(x, _k(B), _k(s), _k(zp), None, bias, K=G * group_size, N=N, bits=4,
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
        w = op21.DequantizeLinear(_k(w4), _k(s.numpy()), axis=1, block_size=group_size)
        y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
        off = (8 - z).float() * s  # [N, G]: the zero point's share, exact
        if bool((off != 0).any()):
            shape = op.Concat(op.Slice(op.Shape(x), _c([0], torch.int64), _c([-1], torch.int64)),
                              _c([G, group_size], torch.int64), axis=0)
            xg = op.ReduceSum(op.Reshape(x, shape), _c([-1], torch.int64), keepdims=0)
            y = op.Add(y, op.MatMul(xg, _k(off.t().contiguous().numpy())))
        return _epilogue(y, bias)

    return linear_w4a16_ort if target == "onnxruntime" else linear_w4a16_dq


def linear_w8a16(x, qweight, scales, bias=None, group_size: int = 0, packed=None):
    """int8 DQ + MatMul; per group needs opset 21 (blocked DequantizeLinear)."""
    if group_size:
        from onnxscript import opset21 as op21
        w = op21.DequantizeLinear(qweight, scales, axis=1, block_size=group_size)
    else:
        w = op.DequantizeLinear(qweight, op.Reshape(scales, _c([-1], torch.int64)), axis=0)
    return _epilogue(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)


def linear_fp8(x, w_fp8, w_scale, bias=None, act_granularity: str = "per_token"):
    from onnxscript import opset19 as op19

    FP8 = ir.DataType.FLOAT8E4M3FN
    zero, one = _c(0.0), _c(1.0)
    if w_scale.shape is not None and w_scale.shape[0] == 1:
        w = op19.DequantizeLinear(w_fp8, op.Reshape(w_scale, _c([], torch.int64)))
    else:
        w = op19.DequantizeLinear(w_fp8, w_scale, axis=0)
    zp = op.Cast(zero, to=FP8)  # sets QuantizeLinear's output type
    if act_granularity == "per_token":
        # QuantizeLinear takes a per-axis scale only 1-D: x is divided by its [.., 1] scale and
        # quantized with scale 1 (the same values), then multiplied back after the DQ.
        amax = op.ReduceMax(op.Abs(x), _c([-1], torch.int64), keepdims=1)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, _c(FP8_MAX)), one)
        xdq = op.Mul(op19.DequantizeLinear(op19.QuantizeLinear(op.Div(x, s), one, zp), one, zp), s)
    else:
        amax = op.ReduceMax(op.Abs(x), keepdims=0)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, _c(FP8_MAX)), one)
        xdq = op19.DequantizeLinear(op19.QuantizeLinear(x, s, zp), s, zp)
    return _epilogue(op.MatMul(xdq, op.Transpose(w, perm=[1, 0])), bias)


def needs_opset(model, target: str) -> int:
    """The lowest opset the model's modules need (each format's min_opset: 21 for blocked
    DequantizeLinear, int4 on tensorrt and grouped int8 weight-only; 19 for FP8), at least 18."""
    from lathe.compress.formats import quantized_modules

    return max([18] + [m.format.min_opset(target) for _, m in quantized_modules(model)])


def table(target: str, buffers: Buffers | None, accuracy_level: int = 4) -> dict:
    """The weight-only/FP8 entries of the translation table, for the ops that exist."""
    out = {}
    ops = torch.ops.lathe
    if buffers is not None:
        out[ops.linear_w4a16.default] = make_linear_w4a16(target, buffers, accuracy_level)
    if hasattr(ops, "linear_w8a16"):
        out[ops.linear_w8a16.default] = linear_w8a16
    if hasattr(ops, "linear_fp8"):
        out[ops.linear_fp8.default] = linear_fp8
    return out


__all__ = ["Buffers", "make_linear_w4a16", "linear_w8a16", "linear_fp8", "needs_opset", "table",
           "matmulnbits_inputs"]
