"""torch.ops.lathe.attention (not a format: registered under the op's name).

- opset 18: MatMul/Softmax/MatMul with an additive key-padding mask; causal (bottom-right
  aligned, so a decode step sees its whole cache) and GQA (kv heads repeated).
- opset >= 23: the standard ONNX `Attention` op. onnxruntime 1.32 runs it on CPU (MiniLM
  validates at cosine 1.0); its attn_mask must be [B, 1, Sq, Sk] there (no broadcast over Sq),
  so the key-padding mask is expanded; rows with no real key give zeros, as lathe's kernel
  does. Only recent TensorRT 10.x parsers import it: opset 18 stays the default."""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

from lathe.export.lowerings import register_lowering
from lathe.export.lowerings.common import FLOAT, const as _c


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


def attention_opset23(q, k, v, key_padding_mask=None, causal: bool = False, scale: float | None = None):
    """The standard ONNX Attention op (opset 23). q/k/v are 4-D [B, H, S, D], so no head
    attributes are needed. The bool mask (True = attend) is expanded to [B, 1, Sq, Sk]."""
    from onnxscript import ir
    from onnxscript import opset23 as op23

    if scale is None:
        raise ValueError("lathe ONNX export needs an explicit attention scale")
    if causal:
        raise NotImplementedError("causal lowering is not implemented yet")
    mask = None
    if key_padding_mask is not None:
        i64 = torch.int64
        m = op.Unsqueeze(op.Cast(key_padding_mask, to=ir.DataType.BOOL), _c([1, 2], i64))
        qs, ks = op.Shape(q), op.Shape(k)
        shape = op.Concat(op.Slice(qs, _c([0], i64), _c([1], i64)), _c([1], i64),
                          op.Slice(qs, _c([2], i64), _c([3], i64)),
                          op.Slice(ks, _c([2], i64), _c([3], i64)), axis=0)
        mask = op.Expand(m, shape)
    out = op23.Attention(q, k, v, mask, scale=float(scale))
    return out[0] if isinstance(out, (tuple, list)) else out


@register_lowering("attention", op="attention")
def lower(ctx):
    return attention_opset23 if ctx.opset >= 23 else attention
