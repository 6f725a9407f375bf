"""The dispatcher's bridge to the Triton kernels (lathe.kernels.triton_kernels), in the
argument order of the lathe ops."""
from __future__ import annotations


def triton_attention(q, k, v, key_padding_mask, causal, scale):
    from lathe.kernels.triton_kernels.attention import flash_attention

    return flash_attention(q, k, v, causal, key_padding_mask, scale)


def triton_linear_w8a8(x, w_q, w_scale, bias, act, smooth=None):
    from lathe.kernels.triton_kernels.qmatmul import w8a8_linear

    return w8a8_linear(x, w_q, w_scale, bias, act, smooth=smooth)


def triton_linear_w4a16(x, qweight, scales, zeros, group_size, bias):
    from lathe.kernels.triton_kernels.qmatmul import w4a16_linear

    return w4a16_linear(x, qweight, scales, zeros, group_size, bias)


def triton_linear_w8a16(x, qweight, scales, bias, group_size):
    from lathe.kernels.triton_kernels.qmatmul import w8a16_linear

    return w8a16_linear(x, qweight, scales, group_size or None, bias)


def triton_linear_fp8(x, w_fp8, w_scale, bias, act_granularity):
    """Quantize x to FP8 (per token or per tensor, as reference.quantize_fp8_act), then the
    Triton fp8 x fp8 matmul; output in x's dtype."""
    from lathe.kernels.reference import quantize_fp8_act
    from lathe.kernels.triton_kernels.qmatmul import fp8_linear

    xq, sx = quantize_fp8_act(x, act_granularity)
    sx = sx.reshape(-1)  # [M] per token, [1] per tensor
    b = None if bias is None else bias.float()
    return fp8_linear(xq, w_fp8, sx, w_scale.float(), b, out_dtype=x.dtype)
