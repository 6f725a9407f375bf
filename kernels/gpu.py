"""The dispatcher's bridge to the GPU kernels (Triton: lathe.kernels.triton_kernels; CUDA:
lathe.kernels.cuda_ops), in the argument order of the lathe ops, and the names of the kernels
that run: `kernel_for` says, per op and shape, which kernel a GPU call takes, and a shape the
fast kernel cannot take goes to a stated path (`fallback` warns once per reason), never to
the reference without a word."""
from __future__ import annotations

import warnings

import torch

_HALF = (torch.float16, torch.bfloat16)
_warned: set = set()


def fallback(op: str, to: str, reason: str) -> None:
    """Warn (once per op and reason) that `op` runs `to` instead of its fast kernel."""
    key = (op, to, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"lathe {op}: running {to}, not the fast GPU kernel: {reason}", stacklevel=3)


def kernel_for(op: str, backend: str, rows: int | None = None, n: int | None = None,
               dtype: torch.dtype | None = None, group_size: int | None = None,
               device=None, asym: bool = False) -> str:
    """The kernel `torch.ops.lathe.<op>` runs on a GPU given the dispatcher's backend, e.g.
    'cuda:w4a16_gemv', 'triton:gemv', 'triton:dequant+cublas', 'reference (why)'."""
    if backend not in ("cuda", "triton"):
        return backend
    if op == "linear_w4a16":
        from lathe.kernels.cuda_ops import GROUP_SIZES

        if backend == "cuda" and rows is not None and rows <= 16 and dtype in _HALF and group_size in GROUP_SIZES:
            return "cuda:w4a16_gemv"
        from lathe.kernels.triton_kernels.qmatmul import weight_only_path

        return "triton:" + weight_only_path(rows or 1, n or 1 << 20, 4, device or "cuda")
    if op == "linear_w8a16":
        from lathe.kernels.triton_kernels.qmatmul import weight_only_path

        return "triton:" + weight_only_path(rows or 1, n or 1 << 20, 8, device or "cuda")
    if op == "linear_w8a8":
        if asym:
            return "reference (asymmetric activations: the Triton int8 kernel is symmetric)"
        return "triton:quant_rows_s8+scaled_mm"
    if op == "linear_fp8":
        dev = torch.device(device or "cuda")
        if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
            return "reference (FP8 needs an sm_89+ GPU)"
        return "triton:quant_rows_fp8+scaled_mm (per-tensor x: torch amax + quantize)"
    if op == "attention":
        from lathe.kernels.triton_kernels.attention import DECODE_MIN_KEYS

        return f"triton:flash_fwd (flash_decode split-K when Sq == 1 and Sk >= {DECODE_MIN_KEYS})"
    return backend


def triton_attention(q, k, v, key_padding_mask, causal, scale):
    from lathe.kernels.triton_kernels.attention import flash_attention

    return flash_attention(q, k, v, causal, key_padding_mask, scale)


def triton_linear_w8a8(x, w_q, w_scale, bias, act, smooth=None):
    from lathe.kernels.triton_kernels.qmatmul import w8a8_linear

    return w8a8_linear(x, w_q, w_scale, bias, act, smooth=smooth)


def linear_w4a16(backend, x, qweight, scales, zeros, group_size, bias):
    """The CUDA GEMV where it applies (M <= 16, fp16/bf16, g 32/64/128), else the Triton
    paths (qmatmul.weight_only_path)."""
    rows = x.shape[:-1].numel()
    name = kernel_for("linear_w4a16", backend, rows, qweight.shape[0], x.dtype, group_size, x.device)
    if name == "cuda:w4a16_gemv":
        from lathe.kernels.cuda_ops import w4a16_linear

        return w4a16_linear(x, qweight, scales, zeros, group_size, bias)
    if backend == "cuda" and rows <= 16:
        fallback("linear_w4a16", name, f"the CUDA GEMV takes fp16/bf16 x and group 32/64/128, "
                                       f"got {x.dtype}, group {group_size}")
    return triton_linear_w4a16(x, qweight, scales, zeros, group_size, bias)


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
    from lathe.kernels.triton_kernels.qmatmul import fp8_linear, quantize_per_token_fp8

    if act_granularity == "per_token":  # one Triton kernel, bit for bit the reference
        xq, sx = quantize_per_token_fp8(x)
    else:  # per tensor needs a global amax first: PyTorch's reduction
        xq, sx = quantize_fp8_act(x, act_granularity)
    sx = sx.reshape(-1)  # [M] per token, [1] per tensor
    b = None if bias is None else bias.float()
    return fp8_linear(xq, w_fp8, sx, w_scale.float(), b, out_dtype=x.dtype)
