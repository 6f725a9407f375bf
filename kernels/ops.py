"""The lathe ops: `torch.ops.lathe.<name>`. Model code calls these and nothing else.

Each op is registered once as a torch.library custom op with a fake (meta) implementation, so
torch.compile and torch.export trace through it, and its body asks the dispatcher
(`lathe.kernels.dispatch.backend_for`) which implementation runs on the input's device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lathe.kernels import cpu, reference
from lathe.kernels.dispatch import backend_for

# ----------------------------------------------------------------------------- linear_w8a8


@torch.library.custom_op("lathe::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], act: str, smooth: Optional[torch.Tensor],
                asym: bool, w_packed: Optional[torch.Tensor], colsum: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8: per-token dynamic symmetric int8 activations x per-channel int8 weights.

    w_q int8 [N, K] is the canonical weight; w_packed/colsum are the CPU kernel's pre-packed
    copy (lathe.kernels.cpu.int8_pack), made once at load time. smooth [K] multiplies x
    before quantization (SmoothQuant's 1/s, fused into the quantization pass). asym picks
    per-token asymmetric u8 activations (zero point) over symmetric ones.
    """
    backend = backend_for("linear_w8a8", x.device)
    N = w_q.shape[0]
    if backend == "cpu":
        if w_packed is None or colsum is None:
            w_packed, colsum = cpu.int8_pack(w_q)
        if x.dtype == torch.float32:
            return cpu.int8_linear(x, w_packed, colsum, w_scale, bias, N, act, smooth, asym)
        return cpu.int8_linear(x.float(), w_packed, colsum, w_scale, bias, N, act, smooth, asym).to(x.dtype)
    if backend == "triton" and not asym:
        from lathe.kernels.gpu import triton_linear_w8a8
        return triton_linear_w8a8(x, w_q, w_scale, bias, act, smooth)
    return reference.linear_w8a8(x, w_q, w_scale, bias, act, smooth, asym).to(x.dtype)


@linear_w8a8.register_fake
def _(x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum):
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


# ----------------------------------------------------------------------------- linear_w4a16


@torch.library.custom_op("lathe::linear_w4a16", mutates_args=())
def linear_w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor],
                 p_codes: Optional[torch.Tensor] = None, p_scales: Optional[torch.Tensor] = None,
                 p_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int4 (lathe int4 format, see lathe.compress.formats.Int4Group). p_* are the
    CPU kernel's layout (lathe.kernels.cpu_int4.int4_pack), made once at load time."""
    backend = backend_for("linear_w4a16", x.device)
    if backend == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        from lathe.kernels import cpu_int4
        K = x.shape[-1]
        if p_codes is None:
            p = cpu_int4.int4_pack(qweight, scales, zeros, group_size, K)
        else:
            p = {"codes": p_codes, "scales": p_scales, "zeros": p_zeros}
        return cpu_int4.int4_linear(x, p, qweight.shape[0], K, group_size, bias)
    if backend == "cuda" and x.shape[:-1].numel() <= 16:
        from lathe.kernels.cuda_ops import w4a16_linear
        return w4a16_linear(x, qweight, scales, zeros, group_size, bias)
    if backend in ("cuda", "triton"):
        from lathe.kernels.gpu import triton_linear_w4a16
        return triton_linear_w4a16(x, qweight, scales, zeros, group_size, bias)
    return reference.linear_w4a16(x, qweight, scales, zeros, group_size, bias)


@linear_w4a16.register_fake
def _(x, qweight, scales, zeros, group_size, bias, p_codes=None, p_scales=None, p_zeros=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ----------------------------------------------------------------------------- attention


@torch.library.custom_op("lathe::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], causal: bool,
              scale: Optional[float]) -> torch.Tensor:
    """Softmax attention. q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D]; key_padding_mask bool [B, Sk]
    (True = real key). Rows with no real key give zeros."""
    backend = backend_for("attention", q.device)
    if backend == "triton":
        from lathe.kernels.gpu import triton_attention
        return triton_attention(q, k, v, key_padding_mask, causal, scale).contiguous()
    if backend == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        from lathe.kernels import cpu_attention
        return cpu_attention.attention(q, k, v, key_padding_mask, causal, scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_padding_mask, causal, scale).contiguous()
    return reference.attention(q, k, v, causal, key_padding_mask, scale).contiguous()


@attention.register_fake
def _(q, k, v, key_padding_mask, causal, scale):
    # Every backend returns a new contiguous tensor, whatever the strides of q (the
    # compiler checks the real strides against these).
    return q.new_empty(q.shape)


def _sdpa(q, k, v, key_padding_mask, causal, scale):
    mask = None
    Sq, Sk = q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].bool()
        if causal:
            mask = mask & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    elif causal and Sq != Sk:
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    if key_padding_mask is not None:
        empty = ~key_padding_mask.bool().any(dim=-1)
        if bool(empty.any()):  # rare: skip the extra pass over the output otherwise
            out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out
