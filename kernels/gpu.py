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
