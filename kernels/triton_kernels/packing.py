"""int4 weight packings: lathe's own, and converters from GPTQ and AWQ checkpoints (pure PyTorch).

lathe int4 format (the one the W4A16 kernel reads; see lathe.compress.formats.Int4Group), for a
weight W [N, K] (nn.Linear order) in groups of g along K:
  qweight uint8 [N, K/2]  two codes a byte, LOW nibble = even k, HIGH nibble = odd k
  scales        [N, K/g]  (fp16/bf16/fp32)
  zeros   uint8 [N, K/g]  codes 0..15 (symmetric quantization uses 8)
  W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g]

GPTQ (AutoGPTQ / GPTQ-for-LLaMA "v1" checkpoints), bits = 4:
  qweight int32 [K/8, N]  packed along K, low bits first: code[k, n] = (qweight[k//8, n] >> 4*(k%8)) & 15
  qzeros  int32 [G, N/8]  packed along N the same way, stored as zero-1 (v1); v2 stores the zero
  scales  fp16  [G, N]
  g_idx   int32 [K]       group of each k (optional; act-order/desc_act makes it non-monotonic)
AWQ (AutoAWQ GEMM checkpoints):
  qweight int32 [K, N/8]  packed along N; nibble i of a word holds column 8c + AWQ_ORDER[i]
  qzeros  int32 [G, N/8]  same packing, the zero itself (no -1 offset)
  scales  fp16  [G, N]

Everything here is exact integer reshuffling: converting then dequantizing gives bit-identical
weights to dequantizing the original checkpoint.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Column held by nibble i of an AWQ word (AutoAWQ's order_map), and its inverse: the nibble
# that holds column j.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


class Int4Weight(NamedTuple):
    """A weight in the lathe int4 format. `perm` is None, or (act-order GPTQ) the permutation of
    K that the kernel's input must be gathered with: y = w4a16(x[..., perm], qweight, ...)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------- lathe nibbles


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> uint8 [N, ceil(K/2)], low nibble = even k.

    An odd K is padded with a zero code (unpack_int4(..., K) drops it)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects codes [N, K], got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16)  # wide enough to check the range without wrapping
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("int4 codes must lie in 0..15")
    c = c.to(torch.uint8)
    if c.shape[1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, K: Optional[int] = None) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 codes [N, K] (the inverse of pack_int4)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 must be uint8, got {packed.dtype}")
    K = packed.shape[1] * 2 if K is None else K
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :K].contiguous()


# ----------------------------------------------------------------------------- int32 words


def _unpack_words(words: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    """int32 words holding 8 nibbles each -> int16 codes, the 8 expanded along `dim`.

    `order[j]` is the nibble that holds the j-th of the 8 values (None: nibble j)."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # sign-free view of the 32 bits
    order = tuple(range(8)) if order is None else order
    shifts = torch.tensor([4 * i for i in order], dtype=torch.int64, device=words.device)
    if dim == 0:  # [R, C] -> [R, 8, C] -> [8R, C]
        nib = (w[:, None, :] >> shifts[None, :, None]) & 0xF
        return nib.reshape(-1, w.shape[1]).to(torch.int16)
    nib = (w[:, :, None] >> shifts[None, None, :]) & 0xF  # [R, C, 8] -> [R, 8C]
    return nib.reshape(w.shape[0], -1).to(torch.int16)


def _check_group_size(K: int, G: int) -> int:
    if G <= 0 or K % G:
        raise ValueError(f"K={K} is not a multiple of the number of groups {G}")
    return K // G


def gptq_to_lathe(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: Optional[torch.Tensor] = None, bits: int = 4,
                  zero_offset: int = 1) -> Int4Weight:
    """GPTQ 4-bit (qweight int32 [K/8, N], qzeros int32 [G, N/8], scales [G, N]) -> lathe int4.

    zero_offset: 1 for v1 checkpoints (zeros stored as z-1, the AutoGPTQ default), 0 for v2.
    The stored nibble wraps (z=0 is stored as 15); we return the intended zero, (stored+1) & 15,
    whereas v1 CUDA kernels compute 16 for it. Symmetric checkpoints (z=8) are unaffected.

    Act-order (g_idx not equal to k // g): lathe's groups are contiguous runs of K, so the
    columns of K are sorted by group (stable) and the permutation is returned in `perm`:
    W_lathe[:, j] = W[:, perm[j]], hence x @ W^T == x[..., perm] @ W_lathe^T. The caller applies
    perm to the activations (or folds it into the previous layer's output channels).
    """
    if bits != 4:
        raise ValueError(f"only 4-bit GPTQ converts to the lathe int4 format, got bits={bits}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("GPTQ qweight/qzeros must be int32")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    G = scales.shape[0]
    if scales.shape[1] != N or qzeros.shape != (G, N // 8) or N % 8:
        raise ValueError(f"inconsistent GPTQ shapes: qweight {tuple(qweight.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    g = _check_group_size(K, G)
    codes = _unpack_words(qweight, dim=0)  # [K, N]
    zeros = (_unpack_words(qzeros, dim=1) + zero_offset) & 0xF  # [G, N]

    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(device=qweight.device, dtype=torch.int64)
        if g_idx.shape != (K,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
            raise ValueError(f"g_idx must be [K={K}] with values in 0..{G - 1}")
        trivial = torch.arange(K, device=g_idx.device) // g
        if not torch.equal(g_idx, trivial):
            counts = torch.bincount(g_idx, minlength=G)
            if not bool((counts == g).all()):
                raise ValueError("g_idx does not give every group exactly K/G columns; "
                                 "cannot map it to contiguous groups")
            perm = torch.sort(g_idx, stable=True).indices
            codes = codes[perm]  # row j of the new K order is old row perm[j]
    qw = pack_int4(codes.t().contiguous().to(torch.uint8))
    return Int4Weight(qw, scales.t().contiguous(), zeros.t().contiguous().to(torch.uint8), g, perm)


def awq_to_lathe(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    """AWQ GEMM 4-bit (qweight int32 [K, N/8], qzeros int32 [G, N/8], scales [G, N]) -> lathe int4."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("AWQ qweight/qzeros must be int32")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G = scales.shape[0]
    if scales.shape[1] != N or qzeros.shape != (G, N // 8):
        raise ValueError(f"inconsistent AWQ shapes: qweight {tuple(qweight.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    g = _check_group_size(K, G)
    codes = _unpack_words(qweight, dim=1, order=AWQ_REVERSE_ORDER)  # [K, N]
    zeros = _unpack_words(qzeros, dim=1, order=AWQ_REVERSE_ORDER)  # [G, N]
    qw = pack_int4(codes.t().contiguous().to(torch.uint8))
    return Int4Weight(qw, scales.t().contiguous(), zeros.t().contiguous().to(torch.uint8), g, None)


def dequantize(w: Int4Weight, K: Optional[int] = None, dtype=torch.float32) -> torch.Tensor:
    """W [N, K] of a lathe int4 weight, in `dtype` (for checks; the kernel never materialises it)."""
    K = w.qweight.shape[1] * 2 if K is None else K
    codes = unpack_int4(w.qweight, K).float()
    gi = torch.arange(K, device=codes.device) // w.group_size
    return ((codes - w.zeros.float()[:, gi]) * w.scales.float()[:, gi]).to(dtype)
