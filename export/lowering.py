"""ONNX lowerings of the lathe ops, one per (op, target), used as the dynamo exporter's
custom_translation_table. Export never special-cases a model: every lathe module reaches the
graph through its op, and the op's lowering emits standard ONNX that runtimes execute.

- attention: MatMul/Softmax/MatMul with an additive key-padding mask (opset 18); causal
  (bottom-right aligned, so a decode step sees its whole cache) and GQA (kv heads repeated).
- attention, opset >= 23: the standard ONNX `Attention` op. onnxruntime 1.32 runs it on CPU
  (checked: MiniLM validates at cosine 1.0); its attn_mask must be [B, 1, Sq, Sk] there (no
  broadcast over Sq), so the key-padding mask is expanded; rows with no real key give zeros, as
  lathe's kernel does. Only recent TensorRT 10.x parsers import it: opset 18 stays the default.
- linear_w8a8, target onnxruntime, int8_mode "fused" (default): lathe's per-token asymmetric
  math (the kernel's scale, zero point and rounding) in onnxruntime's fused int8 GEMM,
  com.microsoft.MatMulIntegerToFloat with a per-row activation scale; the per-row zero point
  rides in the GEMM as padded columns (see make_linear_w8a8_ort_fused). Quality is lathe's
  PyTorch int8 model's; speed about onnxruntime's own quantize_dynamic recipes (figures:
  bench/results/minilm-onnx-int8-cpu.md, and `lathe export --help`).
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
- Every onnxruntime graph gets lathe.export.ort_graph.keep_layernorm_unfused (residual sums as
  Sum, so onnxruntime keeps LayerNormalization instead of its slower SkipLayerNormalization).
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
from onnxscript.values import Op, Opset

_MSFT = Opset("com.microsoft", 1)
_ANY = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(uint8)", "tensor(int8)",
        "tensor(int32)", "tensor(int64)"]


def msft(name: str, inputs: int | list = 1, attrs: tuple = ()):
    """An onnxruntime contrib op (com.microsoft; target onnxruntime only). The onnx package has
    no schemas for them and the exporter needs one, so a minimal schema is made here:
    `inputs` names (a trailing "?" marks an optional one), INT attributes `attrs`."""
    from onnx.defs import OpSchema

    names = inputs if isinstance(inputs, list) else [f"X{i}" for i in range(inputs)]
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    params = [OpSchema.FormalParameter(n.rstrip("?"), f"T{i}", param_option=opt if n.endswith("?") else single)
              for i, n in enumerate(names)]
    schema = OpSchema(name, "com.microsoft", 1, inputs=params,
                      outputs=[OpSchema.FormalParameter("Y", "TY")],
                      type_constraints=[(f"T{i}", _ANY, "") for i in range(len(names))] + [("TY", _ANY, "")],
                      attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=False) for a in attrs])
    return Op(_MSFT, name, schema)


FLOAT, INT32, UINT8 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.UINT8


def _c(v, dtype=torch.float32):
    return op.Constant(value=ir.tensor(torch.tensor(v, dtype=dtype)))


def _repeat_kv(t, rep: int):
    """GQA: [B, Hkv, S, D] -> [B, Hkv * rep, S, D], each kv head repeated for its q heads."""
    if rep == 1:
        return t
    i64 = torch.int64
    shp = op.Shape(t)
    b, h, rest = (op.Slice(shp, _c([a], i64), _c([z], i64)) for a, z in ((0, 1), (1, 2), (2, 4)))
    big = op.Concat(b, h, _c([rep], i64), rest, axis=0)
    t = op.Expand(op.Unsqueeze(t, _c([2], i64)), big)
    return op.Reshape(t, op.Concat(b, op.Mul(h, _c([rep], i64)), rest, axis=0))


def _causal_bias(q, k):
    """[Sq, Sk] additive mask, bottom-right aligned as lathe's kernel: query i sees keys
    j <= i + Sk - Sq (a decode step's one query sees the whole cache)."""
    i64 = torch.int64
    sq = op.Slice(op.Shape(q), _c([2], i64), _c([3], i64))
    sk = op.Slice(op.Shape(k), _c([2], i64), _c([3], i64))
    qi = op.Add(op.Range(_c(0, i64), op.Squeeze(sq), _c(1, i64)), op.Squeeze(op.Sub(sk, sq)))
    kj = op.Range(_c(0, i64), op.Squeeze(sk), _c(1, i64))
    allowed = op.LessOrEqual(op.Unsqueeze(kj, _c([0], i64)), op.Unsqueeze(qi, _c([1], i64)))
    return op.Where(allowed, _c(0.0), _c(-1e30))


def attention(q, k, v, key_padding_mask=None, causal: bool = False, scale: float | None = None):
    if scale is None:
        raise ValueError("lathe ONNX export needs an explicit attention scale")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and hq != hkv:
        k, v = _repeat_kv(k, hq // hkv), _repeat_kv(v, hq // hkv)
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _c(scale))
    if key_padding_mask is not None:
        m = op.Unsqueeze(op.Cast(key_padding_mask, to=FLOAT), _c([1, 2], torch.int64))
        # 0 where the key is real, -1e30 where it is padding (finite: no NaN from -inf - -inf)
        s = op.Add(s, op.Mul(op.Sub(_c(1.0), m), _c(-1e30)))
    if causal:
        s = op.Add(s, _causal_bias(q, k))
    return op.MatMul(op.Softmax(s, axis=-1), v)


def _gelu(y):
    return op.Mul(op.Mul(y, _c(0.5)), op.Add(_c(1.0), op.Erf(op.Mul(y, _c(0.7071067811865476)))))


def _epilogue(y, bias, act: str, ort: bool = False):
    """The kernel epilogue after dequantization: bias, then the fused activation. ort: GELU as
    onnxruntime's one-pass com.microsoft.Gelu instead of five elementwise ops."""
    if bias is not None:
        y = op.Add(y, bias)
    if act == "gelu":
        return msft("Gelu")(y) if ort else _gelu(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    return y


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
    axes = _c([1], torch.int64)
    zero = _c(0.0)
    if asym:
        lo = op.Min(op.ReduceMin(x2, axes, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(x2, axes, keepdims=0), zero)
        rng = op.Sub(hi, lo)
        s = op.Where(op.Greater(rng, zero), op.Div(rng, _c(255.0)), _c(1.0))
        zp = op.Clip(op.Round(op.Div(op.Neg(lo), s)), zero, _c(255.0))
    else:
        amax = op.ReduceMax(op.Abs(x2), axes, keepdims=0)
        s = op.Where(op.Greater(amax, zero), op.Div(amax, _c(127.0)), _c(1.0))
        zp = op.Add(op.Mul(s, zero), _c(128.0))  # 128 on every row (u8 with zero point 128)
    q = op.QuantizeLinear(x2, s, op.Cast(zp, to=UINT8), axis=0)
    acc = op.MatMulInteger(q, op.Transpose(w_q, perm=[1, 0]))
    wsum = op.ReduceSum(op.Cast(w_q, to=INT32), _c([1], torch.int64), keepdims=0)
    col = _c([-1, 1], torch.int64)
    acc = op.Sub(acc, op.Mul(op.Reshape(op.Cast(zp, to=INT32), col), wsum))
    y = op.Mul(op.Cast(acc, to=FLOAT), op.Mul(op.Reshape(s, col), w_scale))
    shape = op.Concat(op.Slice(op.Shape(x), _c([0], torch.int64), _c([-1], torch.int64)),
                      _c([N], torch.int64), axis=0)
    return _epilogue(op.Reshape(y, shape), bias, act, ort)


def make_linear_w8a8_ort_fast(exact: set | None = None):
    """The fast onnxruntime lowering: per-TENSOR asymmetric u8 activations through
    DynamicQuantizeLinear, then MatMulInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias),
    the exact pattern onnxruntime's graph optimizer fuses into one DynamicQuantizeMatMul
    (prepacked s8 weight, no elementwise passes), and GELU as one com.microsoft.Gelu.
    A per-tensor activation scale is lossy where a few tokens carry outliers (BERT's FFN
    down-projections): the modules whose weight buffer names are in `exact` (the exporter
    finds them by calibration) keep lathe's per-token lowering (linear_w8a8_ort)."""
    table = _scale_table({k: 0.0 for k in (exact or ())})

    def linear_w8a8_ort_fast(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                             asym: bool = False, w_packed=None, colsum=None):
        if str(w_q.name) in table:
            return linear_w8a8_ort(x, w_q, w_scale, bias, act, smooth, asym, ort=True)
        if smooth is not None:
            x = op.Mul(x, smooth)
        xq, xs, xzp = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, op.Transpose(w_q, perm=[1, 0]), xzp)
        y = op.Mul(op.Cast(acc, to=FLOAT), op.Mul(xs, w_scale))
        return _epilogue(y, bias, act, ort=True)

    return linear_w8a8_ort_fast


def zero_point_rows(w_q: torch.Tensor) -> int:
    """How many extra int8 K-rows carry -sum_k W[n, k] (the zero-point correction of
    linear_w8a8_ort_fused) for this [N, K] int8 weight: each row holds at most 127 in size."""
    return max(1, -(-int(w_q.to(torch.int32).sum(1).abs().max()) // 127))


def make_linear_w8a8_ort_fused(zp_rows: dict):
    """The default onnxruntime lowering: lathe's own per-token asymmetric math (the kernel's
    scale, zero point and rounding), run by onnxruntime's fused int8 GEMM.

    Per row m of x [M, K]: s = (max(x, 0) - min(x, 0)) / 255, zp = round(-min / s), exactly as
    the kernel. MatMulIntegerToFloat (MLAS, prepacked s8 weight) takes only a scalar zero
    point for its activation but a per-row scale, so the per-row zero point rides in the GEMM
    itself: x is padded with J zero columns, which QuantizeLinear turns into zp[m], and the
    weight gets J extra rows whose sum is -sum_k W[n, k] (each within int8, J = zp_rows[name],
    see zero_point_rows). The GEMM then returns s[m] * w_scale[n] * sum_k (q[m, k] - zp[m]) W[n, k]
    with no elementwise pass over the [M, N] output besides the bias (folded into BiasGelu, or
    into the Sum before a LayerNormalization by lathe.export.ort_graph)."""
    table = _scale_table({k: float(v) for k, v in zp_rows.items()})

    def linear_w8a8_ort_fused(x, w_q, w_scale, bias=None, act: str = "none", smooth=None,
                              asym: bool = False, w_packed=None, colsum=None):
        i64 = torch.int64
        J = int(table[str(w_q.name)])
        N = w_q.shape[0]
        if smooth is not None:
            x = op.Mul(x, smooth)
        x2 = op.Flatten(x, axis=-1)
        axes, zero = _c([1], i64), _c(0.0)
        # a row of zeros gets any positive scale (1e-30 here, 1 in the kernel): both give y = 0
        if asym:
            lo = op.Min(op.ReduceMin(x2, axes, keepdims=0), zero)
            s = op.Div(op.Max(op.Sub(op.Max(op.ReduceMax(x2, axes, keepdims=0), zero), lo), _c(1e-30)), _c(255.0))
            zp = op.Cast(op.Round(op.Div(op.Neg(lo), s)), to=UINT8)  # in [0, 255] as -lo <= 255 s
        else:  # symmetric: u8 with zero point 128 on every row, as the kernel
            s = op.Div(op.Max(op.ReduceMax(op.Abs(x2), axes, keepdims=0), _c(1e-30)), _c(127.0))
            zp = op.Cast(op.Add(op.Mul(s, zero), _c(128.0)), to=UINT8)
        q = op.QuantizeLinear(x2, s, zp, axis=0)
        # J more u8 columns holding zp[m] (the padding that carries the zero point)
        q = op.Concat(q, op.Expand(op.Unsqueeze(zp, axes), _c([1, J], i64)), axis=1)
        # the weight as [K + J, N]: W^T, then J rows splitting -colsum evenly (Hermite:
        # sum_j floor((t + j) / J) = t), each |row| <= ceil(|t| / J) <= 127
        t = op.Cast(op.Neg(op.ReduceSum(op.Cast(w_q, to=INT32), axes, keepdims=1)), to=FLOAT)
        parts = op.Floor(op.Div(op.Add(t, _c([[float(j) for j in range(J)]])), _c(float(J))))
        w_aug = op.Concat(op.Transpose(w_q, perm=[1, 0]),
                          op.Cast(op.Transpose(parts, perm=[1, 0]), to=ir.DataType.INT8), axis=0)
        y = msft("MatMulIntegerToFloat", ["A", "B", "a_scale", "b_scale", "a_zero_point?", "b_zero_point?", "bias?"])(
            q, w_aug, op.Unsqueeze(s, axes), w_scale)
        y = op.Reshape(y, op.Concat(op.Shape(x, end=-1), _c([N], i64), axis=0))
        if act == "gelu" and bias is not None:  # one pass: com.microsoft.BiasGelu
            return msft("BiasGelu", 2)(y, bias)
        return _epilogue(y, bias, act, ort=True)

    return linear_w8a8_ort_fused


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
INT8_MODES = ("fused", "fast", "hybrid", "exact")


def translation_table(target: str = "onnxruntime", opset: int = 18, act_scales: dict | None = None,
                      int8_mode: str = "fused", exact: set | None = None, buffers=None,
                      accuracy_level: int = 4, zp_rows: dict | None = None) -> dict:
    """target onnxruntime: dynamic int8, `int8_mode` "fused" (lathe's per-token math in
    MatMulIntegerToFloat; `zp_rows` from lathe.export.onnx.zero_point_table), "fast" (per-tensor,
    fused by onnxruntime into DynamicQuantizeMatMul), "hybrid" (fast, with the modules in
    `exact` on the per-token lowering) or "exact" (lathe's per-token math in standard ops);
    target tensorrt: symmetric static QDQ with `act_scales` (see make_linear_w8a8_qdq).
    opset >= 23 lowers attention to the standard Attention op. The weight-only and FP8 ops
    lower as lathe.export.weight_only says (int4 needs `buffers`, a weight_only.Buffers)."""
    from lathe.export import weight_only

    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    if int8_mode not in INT8_MODES:
        raise ValueError(f"unknown int8 mode {int8_mode!r}: expected one of {', '.join(INT8_MODES)}")
    if target == "tensorrt":
        linear = make_linear_w8a8_qdq(act_scales)
    elif int8_mode == "fused":
        linear = make_linear_w8a8_ort_fused(zp_rows or {})
    else:
        linear = (linear_w8a8_ort if int8_mode == "exact"
                  else make_linear_w8a8_ort_fast(exact if int8_mode == "hybrid" else None))
    return {
        torch.ops.lathe.attention.default: attention_opset23 if opset >= 23 else attention,
        torch.ops.lathe.linear_w8a8.default: linear,
        **weight_only.table(target, buffers, accuracy_level),
    }
