"""Fused attention forward on the CPU (lathe._C.attention_fwd): tensor checks, output
allocation, pointer and stride passing. Threads follow torch.get_num_threads().

q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] with Hq a multiple of Hkv (GQA/MQA), float32 or
bfloat16 (all three the same; bf16 is computed in fp32 and rounded once at the end). Any
strides work as long as the head dim is contiguous, so the [B, H, S, D] views of a model's
[B, S, H, D] projections need no copy. key_padding_mask: bool/uint8 [B, Sk], True where the
key is real; a query row that sees no real key outputs zeros. causal aligns the last query
with the last key (query i sees keys j <= i + Sk - Sq).
"""
from __future__ import annotations

import math

import torch

from lathe import _ext
from lathe.errors import BadInput
from lathe.kernels.boundary import checked

DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _C():
    return checked(_ext.require_cpu())


def _shape(t) -> tuple:
    return tuple(t.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ masks]) v, returned as a new contiguous [B, Hq, Sq, D] tensor."""
    # Checks are ordered so the common valid call touches few tensor attributes (this wrapper
    # is on the path of every attention layer; the kernel itself re-checks sizes and strides).
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise BadInput(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_cpu:
            raise BadInput(f"attention: {name} must be on the CPU, got {t.device}")
        if t.dim() != 4:
            raise BadInput(f"attention: {name} must be 4-D [B, H, S, D], got shape {_shape(t)}")
    dtype = q.dtype
    code = DTYPES.get(dtype)
    if code is None:
        raise BadInput(f"attention: dtype {dtype} is not supported (float32 or bfloat16)")
    if k.dtype != dtype or v.dtype != dtype:
        raise BadInput(f"attention: q, k, v dtypes differ: {dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Sq, D = q.shape
    kshape = k.shape
    Bk, Hkv, Sk, Dk = kshape
    if v.shape != kshape:
        raise BadInput(f"attention: k {_shape(k)} and v {_shape(v)} shapes differ")
    if Bk != B:
        raise BadInput(f"attention: batch sizes differ: q {_shape(q)}, k {_shape(k)}")
    if Dk != D:
        raise BadInput(f"attention: head dims differ: q {_shape(q)}, k {_shape(k)}")
    if Hkv == 0 or Hq % Hkv:
        raise BadInput(f"attention: q heads {Hq} not a multiple of kv heads {Hkv} "
                         f"(q {_shape(q)}, k {_shape(k)})")
    if D == 0:
        raise BadInput(f"attention: head dim must be positive, got q {_shape(q)}")
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    if D > 1 and (qs[3] != 1 or ks[3] != 1 or vs[3] != 1):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(3) != 1:
                raise BadInput(f"attention: {name} {_shape(t)} must have a contiguous last dim, "
                                 f"got strides {tuple(t.stride())}")
    mask_ptr = 0
    m = key_padding_mask
    if m is not None:
        if not isinstance(m, torch.Tensor) or not m.is_cpu:
            raise BadInput("attention: key_padding_mask must be a CPU tensor")
        if m.shape != (B, Sk):
            raise BadInput(f"attention: key_padding_mask shape {_shape(m)} != [B, Sk] = "
                             f"{(B, Sk)} (q {_shape(q)}, k {_shape(k)})")
        if m.dtype == torch.bool:
            m = m.contiguous().view(torch.uint8)
        elif m.dtype == torch.uint8:
            m = m.contiguous()
        else:
            raise BadInput(f"attention: key_padding_mask must be bool or uint8, got {m.dtype}")
        mask_ptr = m.data_ptr()
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise BadInput(f"attention: scale {scale} is not finite")
    out = torch.empty((B, Hq, Sq, D), dtype=dtype)
    if B == 0 or Hq == 0 or Sq == 0:
        return out
    # a size-1 head dim may report any stride; the kernel wants 1
    _C().attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, Hq, Hkv, Sq,
                       Sk, D, (qs[0], qs[1], qs[2], 1), (ks[0], ks[1], ks[2], 1),
                       (vs[0], vs[1], vs[2], 1), (Hq * Sq * D, Sq * D, D, 1), code, mask_ptr, Sk,
                       bool(causal), scale, torch.get_num_threads())
    return out
