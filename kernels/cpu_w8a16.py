"""int8 weight-only linear on the CPU (lathe._C, csrc/cpu/w8a16_gemm.*): tensor checks, output
allocation, pointer passing. Threads follow torch.get_num_threads(); the ISA follows
lathe.kernels.cpu.force_isa / LATHE_ISA.

Weights are lathe's Int8WeightOnly format: qweight int8 [N, K], scales fp32 [N, G] with
group_size 0 (per channel, G = 1) or g dividing K (G = K / g). `w8a16_pack` re-lays them out
once at load time into one uint8 buffer; `w8a16_linear` runs y = x @ W^T + bias for fp32,
bf16 or fp16 x (output in x's dtype; fp16 goes through fp32: the kernel reads fp32/bf16).

Numerics: codes are widened to fp32 in registers and multiplied with x in fp32 FMA chains (one
a column, per group or per 128-long chunk of K), each chunk sum times its scale added to the
output; no weight is rounded, so the error is the fp32 summation's, as in the reference
(dequantize, then an fp32 matmul). Every ISA body gives the same bits.
Bad arguments raise lathe.errors.BadInput (a ValueError) naming the problem.
"""
from __future__ import annotations

import torch

from lathe import _ext
from lathe.errors import BadInput
from lathe.kernels.boundary import checked, linear_args

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _C():
    return checked(_ext.require_cpu())


def _groups(group_size, K: int, fn: str) -> int:
    if not isinstance(group_size, int) or group_size < 0 or (group_size and K % group_size):
        raise BadInput(f"{fn}: group_size must be 0 (per channel) or divide K={K}, got {group_size!r}")
    return K // group_size if group_size else 1


def packed_bytes(N: int, K: int, group_size: int) -> int:
    return _C().w8a16_packed_bytes(N, K, group_size)


def w8a16_pack(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """qweight int8 [N, K], scales float [N, G] -> the kernel's packed uint8 buffer."""
    if not (isinstance(qweight, torch.Tensor) and qweight.dtype == torch.int8 and qweight.dim() == 2):
        raise BadInput(f"w8a16_pack: qweight must be an int8 [N, K] tensor, got "
                         f"{getattr(qweight, 'dtype', type(qweight))} {tuple(getattr(qweight, 'shape', ()))}")
    N, K = qweight.shape
    if N == 0 or K == 0:
        raise BadInput(f"w8a16_pack: N and K must be positive, got N={N}, K={K}")
    G = _groups(group_size, K, "w8a16_pack")
    if not (isinstance(scales, torch.Tensor) and scales.is_floating_point() and tuple(scales.shape) == (N, G)):
        raise BadInput(f"w8a16_pack: scales must be float [N, G] = {(N, G)}, got "
                         f"{getattr(scales, 'dtype', type(scales))} {tuple(getattr(scales, 'shape', ()))}")
    for name, t in (("qweight", qweight), ("scales", scales)):
        if not t.is_cpu:
            raise BadInput(f"w8a16_pack: {name} must be on the CPU, got {t.device}")
    C = _C()
    q = qweight.contiguous()
    s = scales.to(torch.float32).contiguous()
    packed = torch.empty(C.w8a16_packed_bytes(N, K, group_size), dtype=torch.uint8)
    C.w8a16_pack(q.data_ptr(), K, s.data_ptr(), G, N, K, group_size, packed.data_ptr())
    return packed


def w8a16_linear(x: torch.Tensor, packed: torch.Tensor, N: int, group_size: int, bias=None) -> torch.Tensor:
    """x [..., K] fp32/bf16/fp16 -> [..., N] in x's dtype, with W from `w8a16_pack`."""
    # Checks format their messages only on failure: a decode-sized call is tens of microseconds.
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise BadInput(f"w8a16_linear: x must be a tensor [..., K], got {type(x)}")
    dtype = x.dtype
    if dtype == torch.float16:
        x = x.float()
    dt = _DTYPES.get(x.dtype)
    if dt is None:
        raise BadInput(f"w8a16_linear: x must be float32, bfloat16 or float16, got {dtype}")
    if not x.is_cpu:
        raise BadInput(f"w8a16_linear: x must be on the CPU, got {x.device}")
    K = x.shape[-1]
    if not (isinstance(N, int) and N > 0 and K > 0):
        raise BadInput(f"w8a16_linear: N and K must be positive, got N={N!r}, K={K}")
    _groups(group_size, K, "w8a16_linear")
    C = _C()
    want = C.w8a16_packed_bytes(N, K, group_size)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.numel() != want:
        raise BadInput(f"w8a16_linear: packed must be the uint8 buffer of w8a16_pack with {want} bytes "
                         f"for N={N}, K={K}, group_size={group_size}; got "
                         f"{getattr(packed, 'dtype', type(packed))} with "
                         f"{packed.numel() if isinstance(packed, torch.Tensor) else '?'} elements")
    if not packed.is_contiguous() or not packed.is_cpu:
        raise BadInput("w8a16_linear: packed must be a contiguous CPU tensor")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (N,):
            raise BadInput(f"w8a16_linear: bias must be float [{N}], got "
                             f"{getattr(bias, 'dtype', type(bias))} {tuple(getattr(bias, 'shape', ()))}")
        if not bias.is_cpu:
            raise BadInput(f"w8a16_linear: bias must be on the CPU, got {bias.device}")
    x2, M, ldx, bias, out = linear_args(x, K, N, bias)
    if M:
        C.w8a16_linear(x2.data_ptr(), dt, M, K, ldx, packed.data_ptr(), N,
                       group_size, 0 if bias is None else bias.data_ptr(), out.data_ptr(), N,
                       torch.get_num_threads())
    out = out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)
    return out if dtype == x.dtype else out.to(dtype)
