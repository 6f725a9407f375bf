"""ONNX lowerings of the int8 W8A8 format (int8_per_channel_sym, torch.ops.lathe.linear_w8a8).

- target onnxruntime, int8_mode "fused" (default): lathe's per-token asymmetric math (the
  kernel's scale, zero point and rounding) in onnxruntime's fused int8 GEMM,
  com.microsoft.MatMulIntegerToFloat with a per-row activation scale; the per-row zero point
  rides in the GEMM as padded columns (see make_linear_w8a8_ort_fused). Figures:
  bench/results/minilm-onnx-int8-cpu.md and `lathe export --help`.
- int8_mode "exact": the same math in standard ONNX ops only (ReduceMin/Max -> per-row scale
  and zero point -> one per-axis QuantizeLinear to u8, MatMulInteger(u8, s8), the zero-point
  correction with the weight's column sums, the fp32 epilogue): runs on any ONNX runtime, but
  onnxruntime runs its elementwise ops one by one (slower).
- int8_mode "fast": DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add, which
  onnxruntime fuses into DynamicQuantizeMatMul (per-tensor asymmetric u8 activations), GELU as
  com.microsoft.Gelu. int8_mode "hybrid": the same, but the modules whose activations a
  per-tensor scale represents badly (calibrated by the exporter; MiniLM's FFN down-projections
  of layers 0-3) stay exact. Per-tensor activations cost quality (MiniLM, 300 sentences: fast
  0.92, hybrid 0.98 min cosine against lathe's 0.994).
- target tensorrt: explicit quantization (QDQ) that TensorRT accepts: symmetric int8
  QuantizeLinear/DequantizeLinear with zero point 0, per-channel (axis 0) on the weight and
  per-tensor on the activation with a STATIC scale (recorded at compress time, or calibrated
  by the exporter: lathe.export.onnx.static_act_scales). This is a different quantization from
  lathe's kernel (static per-tensor symmetric instead of per-token dynamic, and modules
  compressed with asymmetric activations are exported symmetric), so it is validated against
  PyTorch with a looser tolerance (lathe.export.validate.TOLERANCE["int8-static"]). Modules
  whose activations a per-tensor scale cannot represent (in MiniLM the FFN down-projections of
  layers 0-3) keep float activations: weight-only DQ -> MatMul.
"""
from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op

from lathe.export.lowerings import register_lowering
from lathe.export.lowerings.common import FLOAT, INT32, UINT8, by_graph_name, const, epilogue, msft


def linear_w8a8_ort(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                    asym: bool = False, w_packed=None, colsum=None, ort: bool = True):
    """lathe's exact per-token math. x is flattened to [M, K] so one QuantizeLinear with a
    per-row scale and zero point (axis 0) does round/shift/saturate/cast in one pass;
    MatMulInteger takes only a scalar zero point, so the per-row one is subtracted after it
    through the weight's column sums (constant-folded by onnxruntime)."""
    if smooth is not None:
        x = op.Mul(x, smooth)
    N = w_q.shape[0]
    x2 = op.Flatten(x, axis=-1)
    axes = const([1], torch.int64)
    zero = const(0.0)
    if asym:
        lo = op.Min(op.ReduceMin(x2, axes, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(x2, axes, keepdims=0), zero)
        rng = op.Sub(hi, lo)
        s = op.Where(op.Greater(rng, zero), op.Div(rng, const(255.0)), const(1.0))
        zp = op.Clip(op.Round(op.Div(op.Neg(lo), s)), zero, const(255.0))
    else:
        amax = op.ReduceMax(op.Abs(x2), axes, keepdims=0)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, const(127.0)), const(1.0))
        zp = op.Add(op.Mul(s, zero), const(128.0))  # 128 on every row (u8 with zero point 128)
    q = op.QuantizeLinear(x2, s, op.Cast(zp, to=UINT8), axis=0)
    acc = op.MatMulInteger(q, op.Transpose(w_q, perm=[1, 0]))
    wsum = op.ReduceSum(op.Cast(w_q, to=INT32), const([1], torch.int64), keepdims=0)
    col = const([-1, 1], torch.int64)
    acc = op.Sub(acc, op.Mul(op.Reshape(op.Cast(zp, to=INT32), col), wsum))
    y = op.Mul(op.Cast(acc, to=FLOAT), op.Mul(op.Reshape(s, col), w_scale))
    shape = op.Concat(op.Slice(op.Shape(x), const([0], torch.int64), const([-1], torch.int64)),
                      const([N], torch.int64), axis=0)
    return epilogue(op.Reshape(y, shape), bias, act, ort)


def make_linear_w8a8_ort_fast(exact: set | None = None):
    """The fast onnxruntime lowering: per-TENSOR asymmetric u8 activations through
    DynamicQuantizeLinear, then MatMulInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias),
    the exact pattern onnxruntime's graph optimizer fuses into one DynamicQuantizeMatMul
    (prepacked s8 weight, no elementwise passes), and GELU as one com.microsoft.Gelu.
    A per-tensor activation scale is lossy where a few tokens carry outliers (BERT's FFN
    down-projections): the modules whose weight buffer names are in `exact` (the exporter
    finds them by calibration) keep lathe's per-token lowering (linear_w8a8_ort)."""
    table = by_graph_name({k: 0.0 for k in (exact or ())})

    def linear_w8a8_ort_fast(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                             asym: bool = False, w_packed=None, colsum=None):
        if str(w_q.name) in table:
            return linear_w8a8_ort(x, w_q, w_scale, bias, act, smooth, asym, ort=True)
        if smooth is not None:
            x = op.Mul(x, smooth)
        xq, xs, xzp = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, op.Transpose(w_q, perm=[1, 0]), xzp)
        y = op.Mul(op.Cast(acc, to=FLOAT), op.Mul(xs, w_scale))
        return epilogue(y, bias, act, ort=True)

    return linear_w8a8_ort_fast


def zero_point_rows(w_q: torch.Tensor) -> int:
    """How many extra int8 K-rows carry -sum_k W[n, k] (the zero-point correction of
    linear_w8a8_ort_fused) for this [N, K] int8 weight: each row holds at most 127 in size."""
    return max(1, -(-int(w_q.to(torch.int32).sum(1).abs().max()) // 127))


def _augmented_weight(w_q, J: int):
    """The weight as [K + J, N]: W^T, then J rows splitting -colsum evenly (Hermite:
    sum_j floor((t + j) / J) = t), each |row| <= ceil(|t| / J) <= 127 (constant-folded)."""
    t = op.Cast(op.Neg(op.ReduceSum(op.Cast(w_q, to=INT32), const([1], torch.int64), keepdims=1)), to=FLOAT)
    parts = op.Floor(op.Div(op.Add(t, const([[float(j) for j in range(J)]])), const(float(J))))
    return op.Concat(op.Transpose(w_q, perm=[1, 0]),
                     op.Cast(op.Transpose(parts, perm=[1, 0]), to=ir.DataType.INT8), axis=0)


_MITF = ["A", "B", "a_scale", "b_scale", "a_zero_point?", "b_zero_point?", "bias?"]


def make_linear_w8a8_ort_fused(zp_rows: dict, opset: int = 18):
    """The default onnxruntime lowering: lathe's own per-token asymmetric math (the kernel's
    scale, zero point and rounding), run by onnxruntime's fused int8 GEMM.

    Per row m of x [M, K]: s = (max(x, 0) - min(x, 0)) / 255, zp = round(-min / s), exactly as
    the kernel. MatMulIntegerToFloat (MLAS, prepacked s8 weight) takes only a scalar zero
    point for its activation but a per-row scale, so the per-row zero point rides in the GEMM
    itself: x is padded with J columns holding zp[m], and the weight gets J extra rows whose
    sum is -sum_k W[n, k] (each within int8, J = zp_rows[name], see zero_point_rows). The GEMM
    then returns s[m] * w_scale[n] * sum_k (q[m, k] - zp[m]) W[n, k]; the bias is folded into
    BiasGelu, or into the Sum before a LayerNormalization by lathe.export.ort_graph.

    opset >= 21 (lathe's default for onnxruntime int8): x stays [.., K] and one blocked
    QuantizeLinear (block = the whole row) quantizes it with its per-row scale and zero point,
    about a dozen small nodes a linear, since onnxruntime's cost per node is what bounds
    batch 1. Older opsets: x is flattened to [M, K] for a per-axis QuantizeLinear (more nodes).
    Symmetric modules: zero point 128 on every row, as the kernel (a scalar zero point: no padding)."""
    table = by_graph_name({k: float(v) for k, v in zp_rows.items()})
    mitf = msft("MatMulIntegerToFloat", _MITF)

    def linear_w8a8_ort_fused(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                              asym: bool = False, w_packed=None, colsum=None):
        if smooth is not None:
            x = op.Mul(x, smooth)
        y = (_fused_rows(x, w_q, w_scale, asym, int(table[str(w_q.name)]), mitf) if opset >= 21
             else _fused_flat(x, w_q, w_scale, asym, int(table[str(w_q.name)]), mitf))
        if act == "gelu" and bias is not None:  # one pass: com.microsoft.BiasGelu
            return msft("BiasGelu", 2)(y, bias)
        return epilogue(y, bias, act, ort=True)

    return linear_w8a8_ort_fused


def _fused_rows(x, w_q, w_scale, asym: bool, J: int, mitf):
    """opset 21: per-row quantization of x [.., K] in place (blocked QuantizeLinear)."""
    from onnxscript import opset21 as op21

    K = w_q.shape[1]
    axes, zero, tiny = const([-1], torch.int64), const(0.0), const(1e-30)
    # a row of zeros gets any positive scale (1e-30 here, 1 in the kernel): both give y = 0
    if not asym:
        s = op.Div(op.Max(op.ReduceMax(op.Abs(x), axes, keepdims=1), tiny), const(127.0))
        zp = op.Expand(op.Constant(value=ir.tensor(torch.tensor([128], dtype=torch.uint8))), op.Shape(s))
        q = op21.QuantizeLinear(x, s, zp, axis=-1, block_size=K)
        return mitf(q, op.Transpose(w_q, perm=[1, 0]), s, w_scale, const(128, torch.uint8))
    lo = op.Min(op.ReduceMin(x, axes, keepdims=1), zero)
    # max(hi, 1e-30) - lo: the kernel's max(hi, 0) - min(lo, 0) (equal in fp32 unless |lo| < 1e-23)
    s = op.Div(op.Sub(op.Max(op.ReduceMax(x, axes, keepdims=1), tiny), lo), const(255.0))
    zp = op21.QuantizeLinear(op.Neg(lo), s, axis=-1, block_size=1)  # round(-lo / s), u8 (-lo <= 255 s)
    q = op21.QuantizeLinear(x, s, zp, axis=-1, block_size=K)
    q = op.Concat(q, *([zp] * J), axis=-1)  # J more u8 columns holding zp (the padding)
    return mitf(q, _augmented_weight(w_q, J), s, w_scale)


def _fused_flat(x, w_q, w_scale, asym: bool, J: int, mitf):
    """opset < 21: x flattened to [M, K], one per-axis QuantizeLinear (axis 0)."""
    i64 = torch.int64
    N = w_q.shape[0]
    x2 = op.Flatten(x, axis=-1)
    axes, zero = const([1], i64), const(0.0)
    if asym:
        lo = op.Min(op.ReduceMin(x2, axes, keepdims=0), zero)
        s = op.Div(op.Max(op.Sub(op.Max(op.ReduceMax(x2, axes, keepdims=0), zero), lo), const(1e-30)), const(255.0))
        zp = op.Cast(op.Round(op.Div(op.Neg(lo), s)), to=UINT8)  # in [0, 255] as -lo <= 255 s
    else:  # symmetric: u8 with zero point 128 on every row, as the kernel
        s = op.Div(op.Max(op.ReduceMax(op.Abs(x2), axes, keepdims=0), const(1e-30)), const(127.0))
        zp = op.Cast(op.Add(op.Mul(s, zero), const(128.0)), to=UINT8)
    q = op.QuantizeLinear(x2, s, zp, axis=0)
    q = op.Concat(q, op.Expand(op.Unsqueeze(zp, axes), const([1, J], i64)), axis=1)
    y = mitf(q, _augmented_weight(w_q, J), op.Unsqueeze(s, axes), w_scale)
    return op.Reshape(y, op.Concat(op.Shape(x, end=-1), const([N], i64), axis=0))


def make_linear_w8a8_qdq(act_scales: dict | None):
    """The TensorRT lowering of linear_w8a8, closing over the static per-tensor activation
    scales {weight buffer name: scale} (lathe.export.onnx.static_act_scales makes them).
    A scale of None keeps that module's activations in floating point (weight-only DQ)."""
    table = by_graph_name(act_scales)

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
            s_x = const(table[key])
            zp = const(0, torch.int8)
            xdq = op.DequantizeLinear(op.QuantizeLinear(x, s_x, zp), s_x, zp)
        wdq = op.DequantizeLinear(w_q, w_scale, axis=0)  # int8 weight: zero point 0 by default
        return epilogue(op.MatMul(xdq, op.Transpose(wdq, perm=[1, 0])), bias, act)

    return linear_w8a8_qdq


@register_lowering("int8_per_channel_sym")
def lower(ctx):
    if ctx.target == "tensorrt":
        return make_linear_w8a8_qdq(ctx.act_scales)
    if ctx.int8_mode == "fused":
        return make_linear_w8a8_ort_fused(ctx.zp_rows or {}, ctx.opset)
    if ctx.int8_mode == "exact":
        return linear_w8a8_ort
    return make_linear_w8a8_ort_fast(ctx.exact if ctx.int8_mode == "hybrid" else None)
