"""Plain-PyTorch references for every lathe op.

Each kernel backend (C++ CPU, Triton, CUDA) is tested against these, through the same op.
They are written for clarity, not speed, and they are also the `reference` backend of the
dispatcher, which runs on any device.
"""
from __future__ import annotations

import math

import torch

from lathe.errors import BadInput

# ----------------------------------------------------------------------------- int8 W8A8


def quantize_rows_s8(x: torch.Tensor):
    """Per-token (per-row) symmetric int8: q = round_half_even(x / s), s = amax / 127.

    Returns (q int8 [..., K], scale fp32 [..., 1]). All-zero rows get scale 1.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    return q, scale


def quantize_rows_u8(x: torch.Tensor, asym: bool):
    """Per-token u8 codes with a zero point, as lathe's CPU kernel stores them.

    symmetric: s = amax / 127, zp = 128, q = clamp(round(x * (1/s)), -127, 127) + 128.
    asymmetric: range [min(x, 0), max(x, 0)], s = range / 255, zp = round(-min / s),
    q = clamp(round(x * (1/s)) + zp, 0, 255). Returns (q float [.., K], s [.., 1], zp [.., 1]).
    The multiply by the fp32 reciprocal (not a division) is the kernel's definition.
    """
    x = x.float()
    if not asym:
        amax = x.abs().amax(dim=-1, keepdim=True)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(x * (1.0 / s)), -127, 127) + 128
        return q, s, torch.full_like(s, 128.0)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zp = torch.clamp(torch.round(-lo / s), 0, 255)
    q = torch.clamp(torch.round(x * (1.0 / s)) + zp, 0, 255)
    return q, s, zp


def linear_w8a8(x, w_q, w_scale, bias=None, act: str = "none", smooth=None, asym: bool = False):
    """y = ((q(x * smooth) - zp) @ w_q^T) * s_x * s_w + bias, then act. w_q int8 [N, K],
    w_scale fp32 [N], smooth fp32 [K] (SmoothQuant's inverse scale, folded into the
    quantization) or None; asym picks per-token asymmetric activations."""
    x = x.float()
    if smooth is not None:
        x = x * smooth
    q, s, zp = quantize_rows_u8(x, asym)
    acc = (q - zp).double() @ w_q.double().t()  # exact: |acc| < 2^53 for any practical K
    y = acc.float() * s * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return apply_act(y, act)


def apply_act(y, act: str):
    if act == "gelu":
        return torch.nn.functional.gelu(y)
    if act == "silu":
        return torch.nn.functional.silu(y)
    if act != "none":
        raise BadInput(f"unknown activation {act!r}: expected none, gelu or silu")
    return y


# ----------------------------------------------------------------------------- int4 W4A16


def unpack_int4(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)], two codes a byte, low nibble first -> uint8 codes [N, K]."""
    lo = qweight & 0x0F
    hi = qweight >> 4
    return torch.stack([lo, hi], dim=-1).reshape(qweight.shape[0], -1)[:, :K]


def dequant_int4(qweight, scales, zeros, group_size: int, K: int) -> torch.Tensor:
    """W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g], in the scales' dtype."""
    codes = unpack_int4(qweight, K).float()
    g = torch.arange(K, device=qweight.device) // group_size
    z = zeros.float()[:, g]
    s = scales.float()[:, g]
    return ((codes - z) * s).to(scales.dtype)


def linear_w4a16(x, qweight, scales, zeros, group_size: int, bias=None):
    """y = x @ dequant(W)^T + bias, computed in fp32, returned in x's dtype."""
    K = x.shape[-1]
    w = dequant_int4(qweight, scales, zeros, group_size, K).float()
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- int8 W8A16


def dequant_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[n, k] = qweight[n, k] * scales[n, k // g] in fp32 (G = scales.shape[1] groups)."""
    N, K = qweight.shape
    G = scales.shape[1]
    return (qweight.float().view(N, G, K // G) * scales.float()[..., None]).view(N, K)


def linear_w8a16(x, qweight, scales, bias=None):
    """y = x @ dequant(W)^T + bias: the weight dequantized once, an fp32 matmul, returned in
    x's dtype (what QLinearW8A16 computed before the op existed)."""
    w = dequant_int8(qweight, scales)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- FP8 (E4M3)

FP8_E4M3_MAX = 448.0


def quantize_fp8_act(x: torch.Tensor, act_granularity: str):
    """Dynamic FP8 activations: scale = amax / 448 per token (row) or per tensor (1 when all
    zero); returns (float8_e4m3fn codes, fp32 scale [..., 1] or [])."""
    xf = x.float()
    if act_granularity == "per_token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif act_granularity == "per_tensor":
        amax = xf.abs().amax()
    else:
        raise BadInput(f"unknown act_granularity {act_granularity!r}: expected per_token or per_tensor")
    sx = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    xq = (xf / sx).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, sx


def linear_fp8(x, w_fp8, w_scale, bias=None, act_granularity: str = "per_token"):
    """FP8 W8A8 simulated in fp32: y = (fp8(x / sx) @ fp8_w^T) * sx * w_scale + bias, returned
    in x's dtype. w_scale [N] (per channel) or [1] (per tensor)."""
    xq, sx = quantize_fp8_act(x, act_granularity)
    y = (xq.float() @ w_fp8.float().t()) * sx * w_scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- attention


def attention(q, k, v, causal: bool = False, key_padding_mask=None, scale=None):
    """Softmax attention in fp32, returned in q's dtype.

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] with Hq a multiple of Hkv (GQA/MQA).
    key_padding_mask: bool [B, Sk], True where the key is real. Rows whose keys are all padding
    return zeros (not NaN); any other NaN (in a row's inputs, or from an overflowing score) is
    kept. causal aligns the last query with the last key (decode-friendly).
    """
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise BadInput(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    rep = Hq // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(D))
    Sk = k.shape[2]
    allowed = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        qi = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        ki = torch.arange(Sk, device=q.device)[None, :]
        allowed = allowed & (ki <= qi)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    # Rows with no visible key are defined as zeros (softmax gives NaN there). Only those: a
    # NaN in a row's inputs, or a score that overflows, stays NaN in that row.
    seen = allowed.any(dim=-1, keepdim=True)
    out = torch.where(seen, p, 0.0) @ vf
    return torch.where(seen, out, 0.0).to(q.dtype)
