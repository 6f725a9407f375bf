"""Thin wrappers over lathe._C (the C++ CPU kernels): tensor checks, output allocation,
pointer passing. Threads follow torch.get_num_threads()."""
from __future__ import annotations

import contextlib

import torch

from lathe import _ext
from lathe.errors import BadInput
from lathe.kernels.boundary import checked

ACTS = {"none": 0, "gelu": 1, "silu": 2}
ISAS = {"scalar": 0, "avx2": 1, "avx512_vnni": 2, "avx512_bf16": 3, "amx": 4}


def _C():
    return checked(_ext.require_cpu())


def best_isa() -> str:
    C = _C()
    return C.isa_name(C.best_isa())


def active_isa() -> str:
    C = _C()
    return C.isa_name(C.active_isa())


def cpu_flags() -> str:
    """The ISA-relevant flags of this CPU, as the skip reasons and errors name them."""
    return _C().cpu_flags()


def isa_missing(name: str) -> str | None:
    """None when this CPU runs ISA level `name`, else the reason it cannot (for test skips)."""
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}: expected one of {sorted(ISAS)}")
    if ISAS[name] <= ISAS[best_isa()]:
        return None
    need = {"avx2": "avx2", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "amx": "amx_int8"}[name]
    return f"CPU lacks {need} (flags: {cpu_flags()})"


@contextlib.contextmanager
def force_isa(name: str):
    """Run the CPU kernels on a given ISA level, at most the best (tests use it to reach every path)."""
    C = _C()
    if name not in ISAS:
        raise BadInput(f"unknown ISA {name!r}: expected one of {sorted(ISAS)}")
    prev = C.active_isa()
    C.force_isa(ISAS[name])
    try:
        yield
    finally:
        C.force_isa(prev)


def int8_pack(w_q: torch.Tensor):
    """int8 [N, K] -> (packed int8 [bytes], colsum int32 [N padded to 16]) in the VNNI layout."""
    if not (w_q.dtype == torch.int8):
        raise BadInput(f"int8_pack: weight must be int8, got {w_q.dtype}")
    if not (w_q.dim() == 2):
        raise BadInput(f"int8_pack: weight must be 2-D [N, K], got shape {tuple(w_q.shape)}")
    if not (w_q.device.type == "cpu"):
        raise BadInput(f"int8_pack: weight must be on the CPU, got {w_q.device}")
    w_q = w_q.contiguous()
    N, K = w_q.shape
    C = _C()
    packed = torch.empty(C.int8_packed_bytes(N, K), dtype=torch.int8)
    colsum = torch.empty(C.int8_packed_cols(N), dtype=torch.int32)
    C.int8_pack_weight(w_q.data_ptr(), N, K, K, packed.data_ptr(), colsum.data_ptr())
    return packed, colsum


def int8_linear(x, packed, colsum, w_scale, bias, N: int, act: str = "none", smooth=None,
                asym: bool = False):
    """x fp32 [..., K] -> fp32 [..., N] through the W8A8 kernel (per-token dynamic quant of
    x * smooth, where smooth is SmoothQuant's inverse scale [K] or None)."""
    if not (x.dtype == torch.float32):
        raise BadInput(f"int8_linear: x must be float32, got {x.dtype}")
    if not (x.device.type == "cpu"):
        raise BadInput(f"int8_linear: x must be on the CPU, got {x.device}")
    if not (act in ACTS):
        raise BadInput(f"int8_linear: unknown act {act!r}: expected one of {sorted(ACTS)}")
    K = x.shape[-1]
    C = _C()
    if not (packed.dtype == torch.int8 and packed.numel() == C.int8_packed_bytes(N, K)):
        raise BadInput(f"int8_linear: packed weight holds {packed.numel()} bytes, expected "
                         f"{C.int8_packed_bytes(N, K)} for N={N}, K={K}")
    if not (colsum.dtype == torch.int32 and colsum.numel() == C.int8_packed_cols(N)):
        raise BadInput("int8_linear: colsum does not match the packed weight")
    if not (w_scale.dtype == torch.float32 and w_scale.numel() == N and w_scale.is_contiguous()):
        raise BadInput(f"int8_linear: w_scale must be contiguous float32 [{N}], got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if bias is not None:
        if not (bias.dtype == torch.float32 and bias.numel() == N and bias.is_contiguous()):
            raise BadInput(f"int8_linear: bias must be contiguous float32 [{N}]")
    if smooth is not None:
        if not (smooth.dtype == torch.float32 and smooth.numel() == K and smooth.is_contiguous()):
            raise BadInput(f"int8_linear: smooth must be contiguous float32 [{K}]")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < K):  # e.g. expand()ed rows
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=torch.float32)
    if M:
        C.int8_linear(x2.data_ptr(), 0 if smooth is None else smooth.data_ptr(), M, K, x2.stride(0),
                      packed.data_ptr(), colsum.data_ptr(),
                      w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(), N,
                      out.data_ptr(), N, ACTS[act], int(asym), torch.get_num_threads())
    return out.reshape(*lead, N)


def quantize_rows_u8(x: torch.Tensor, asym: bool):
    """The kernel's own per-token quantization (for tests): u8 codes [M, K], scale [M, 1],
    zero point [M, 1]."""
    if not (x.dtype == torch.float32 and x.dim() == 2):
        raise BadInput("quantize_rows_u8: x must be float32 [M, K]")
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.uint8)
    s = torch.empty(M, dtype=torch.float32)
    z = torch.empty(M, dtype=torch.int32)
    _C().quantize_rows_u8(x.data_ptr(), M, K, K, q.data_ptr(), s.data_ptr(), z.data_ptr(),
                          int(asym), torch.get_num_threads())
    return q, s[:, None], z[:, None]
