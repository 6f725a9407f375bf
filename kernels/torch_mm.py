"""The `torch` backend of linear_w8a8 and linear_fp8: lathe's activation quantization (the
reference's own per-token functions) around PyTorch's int8 / FP8 tensor-core GEMMs
(torch._int_mm -> cuBLASLt int8, torch._scaled_mm -> cuBLASLt FP8).

On a GPU these are faster than the Triton kernels for prefill-sized M and they are
CUDA-graph-safe: no host sync, no .item(), every allocation's size follows the input's shape.
Both GEMMs also run on the CPU, so the same code is tested there against the reference.

Weights come prepared once at load (QLinearW8A8.prepare / QLinearFP8.prepare): w_q int8 [N, K]
row-major is passed as w_q.t() (the column-major [K, N] operand cuBLASLt wants, a view),
colsum int32 [>= N] holds the weight's row sums for the zero point of asymmetric activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lathe.kernels import reference

# cuBLASLt's int8 GEMM rejects M <= 16 (torch._int_mm: "self.size(0) needs to be greater
# than 16"); decode pads its few rows up to this many (a fixed size: capture-safe).
INT_MM_MIN_ROWS = 32


def linear_w8a8(x, w_q, w_scale, bias, act: str, smooth, asym: bool, colsum):
    """The reference's math (lathe.kernels.reference.linear_w8a8) with the integer product on
    torch._int_mm: u8 codes q with zero point zp are shifted to int8 (q - 128), so
    (q - zp) @ W^T = (q - 128) @ W^T - (zp - 128) * colsum(W), exact in int32."""
    K = x.shape[-1]
    N = w_q.shape[0]
    x2 = x.reshape(-1, K)
    if smooth is not None:
        x2 = x2 * smooth
    q, s, zp = reference.quantize_rows_u8(x2, asym)
    qi = (q - 128.0).to(torch.int8)
    M = qi.shape[0]
    if x.is_cuda and M < INT_MM_MIN_ROWS:
        qi = F.pad(qi, (0, 0, 0, INT_MM_MIN_ROWS - M))
    acc = torch._int_mm(qi, w_q.t())
    if M < acc.shape[0]:
        acc = acc[:M]
    # The epilogue is a few passes over [M, N] (no fused GEMM epilogue in eager PyTorch): the
    # zero-point correction as one in-place rank-1 update, then in-place scaling, so each
    # pass reads and writes one buffer. Same operation order as the reference (bit-exact).
    if asym:
        acc.addr_((zp.reshape(-1) - 128).to(torch.int32), colsum[:N], alpha=-1)
    y = acc * s  # int32 * fp32 -> fp32
    y.mul_(w_scale)
    if bias is not None:
        y.add_(bias)
    return reference.apply_act(y, act).to(x.dtype).reshape(*x.shape[:-1], N)


def linear_fp8(x, w_fp8, w_scale, bias, act_granularity: str):
    """FP8 W8A8 on torch._scaled_mm: x quantized as the reference does (amax / 448 per token
    or per tensor), both scales applied by the GEMM's epilogue, output in x's dtype. w_scale
    fp32 [N] (per channel) or [1] (per tensor); bias in x's dtype (QLinearFP8.prepare stores
    it so at load)."""
    K = x.shape[-1]
    N = w_fp8.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    xq, sx = reference.quantize_fp8_act(x2, act_granularity)  # sx [M, 1] or []
    per_channel = w_scale.numel() != 1
    if act_granularity == "per_token" and per_channel:  # row-wise: [M, 1] x [1, N]
        sa, sb = sx, w_scale.reshape(1, N)
    elif act_granularity == "per_token":  # fold the one weight scale into the rows
        sa, sb = sx * w_scale, torch.ones(1, N, device=x.device)
    elif per_channel:
        sa, sb = sx.reshape(1, 1).expand(M, 1).contiguous(), w_scale.reshape(1, N)
    else:  # tensor-wise: two scalars
        sa, sb = sx.reshape(()), w_scale.reshape(())
    if bias is not None and bias.dtype != x.dtype:  # unprepared module only
        bias = bias.to(x.dtype)
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], N)


_fp8_probe: dict = {}


def fp8_runs(device, out_dtype, rowwise: bool) -> bool:
    """Whether torch._scaled_mm takes this scaling and output dtype on `device` (row-wise
    scaling with fp16 output is missing from some PyTorch/cuBLASLt versions). Probed once,
    with tiny tensors, at load time."""
    key = (device, out_dtype, rowwise)
    if key not in _fp8_probe:
        a = torch.zeros(32, 32, device=device).to(torch.float8_e4m3fn)
        sa = torch.ones(32, 1, device=device) if rowwise else torch.ones((), device=device)
        sb = torch.ones(1, 32, device=device) if rowwise else torch.ones((), device=device)
        try:
            torch._scaled_mm(a, a.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
            _fp8_probe[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _fp8_probe[key] = False
    return _fp8_probe[key]
