"""Fused softmax attention forward in Triton (FlashAttention-2 style online softmax).

Entry points
  flash_attention(q, k, v, causal, key_padding_mask, scale)   q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]
  flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)   packed [total, H, D]
  flash_decode(q, k, v, key_padding_mask, scale, num_splits)   Sq == 1, split-K over the keys
Semantics are those of lathe.kernels.reference.attention: GQA/MQA (Hq a multiple of Hkv),
causal aligned bottom-right (query i sees keys j <= i + Sk - Sq), key_padding_mask bool
[B, Sk] with True = real key, and a query row with no visible key returns zeros, not NaN.
Inputs fp16/bf16 (fp32 is accepted, computed with exact fp32 dots, for the interpreter tests);
the output has q's dtype. Head dims up to 256; a D that is not a power of two (96) is padded in
the block to the next one, with masked loads.

How: one program owns BLOCK_M query rows of one (batch, head); it streams K/V in BLOCK_N
blocks, keeping a running max m, running denominator l and an fp32 accumulator, so the Sq x Sk
score matrix is never written to memory. exp2 with log2(e) folded into the scale. The causal
loop stops at the diagonal and applies the causal/boundary masks only to the blocks that need
them. Fully masked rows keep m = -inf; the "safe max" (0 where m is -inf) keeps
exp2(-inf - -inf) out of the arithmetic and l = 0 rows are written as zeros.

Roofline (forward, per call)
  FLOPs = 4 * B * Hq * Sq * Sk * D  (QK^T and PV, 2 FLOPs a multiply-add; about half with causal
          and Sq == Sk)
  bytes = 2 bytes * (2 * B * Hq * Sq * D + 2 * B * Hkv * Sk * D)  (read Q, K, V, write O, fp16)
  intensity = FLOPs / bytes ~ Sq*Sk*D / (Sq*D + Sk*D) ~ S/2 FLOP/byte at Sq = Sk = S (Hq = Hkv)
  H100 SXM: 989 TFLOP/s dense bf16/fp16, 3.35 TB/s HBM3 -> ridge point 295 FLOP/byte.
  So prefill (S >= ~600) is compute-bound: B=4, H=16, S=4096, D=128 is 550 GFLOP -> 0.56 ms at
  peak (0.28 ms causal); FA2-class kernels reach ~50-70% of peak on H100 without wgmma/TMA
  warp specialisation, so expect ~1 ms here.
  Decode (Sq = 1) has intensity ~ Hq/Hkv FLOP/byte: memory-bound, time ~ KV bytes / 3.35 TB/s
  (B=1, Hkv=8, Sk=32k, D=128 fp16: 134 MB -> 40 us), which is why decode splits the keys over
  many programs (flash-decoding) instead of using one program per head.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._runtime import MISSING_TRITON, bucket, check_device, interpreting, num_sms, pick_configs

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the package's lazy wrappers only import this module when called
    raise ImportError(MISSING_TRITON) from e

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Sq == 1 with at least this many keys goes to the split-K decode kernels.
DECODE_MIN_KEYS = 512


def _dot_precision(dtype) -> str:
    # fp32 inputs are the test path: exact fp32 dots, not tf32 (fp16/bf16 ignore this).
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- autotune configs


def _fwd_configs():
    # Hopper (228 KB shared, 4 warp schedulers): 128-row query tiles with 8 warps and 3-4
    # stages keep the tensor cores fed at S >= 1k; 64-row tiles give short sequences (S = 512,
    # B*H = 64 -> 512 programs) more than two waves over 132 SMs. The fixed (no-autotune)
    # config fits the shared memory of every arch (D = 256 included).
    cfg = lambda bm, bn, w, s: triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)  # noqa: E731
    full = [cfg(*c) for c in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2),
                              (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4),
                              (64, 64, 4, 2), (64, 32, 4, 2)]]
    return pick_configs(full, cfg(64, 64, 4, 2), cfg(16, 16, 4, 1))


def _smem_limit(named_args) -> int:
    """Shared memory a block may use on the launch device (the AOT tests pass the target's
    limit as __smem_limit__; no CUDA tensor: no limit)."""
    if named_args.get("__smem_limit__"):
        return named_args["__smem_limit__"]
    q = named_args.get("Q")
    if isinstance(q, torch.Tensor) and q.device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", 101376)
    return 1 << 30


def _prune_fwd(configs, named_args, **kwargs):
    # D=256: a 64x64 tile with 2 stages takes ~104 KB of shared memory: it fits sm_80/sm_90
    # (163/227 KB) but not Ada's 99 KB, where BLOCK_N drops to 32. Larger tiles or more stages
    # never fit; compiling them first wastes autotune time.
    if named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 0)) >= 256:
        bn_max = 64 if _smem_limit(named_args) >= 128 * 1024 else 32
        out, seen = [], set()
        for c in configs:
            if c.kwargs["BLOCK_M"] > 64 or c.num_stages > 2:
                continue
            kw = {**c.kwargs, "BLOCK_N": min(c.kwargs["BLOCK_N"], bn_max)}
            key = (kw["BLOCK_M"], kw["BLOCK_N"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        return out or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return configs


def _decode_configs():
    cfg = lambda bn, w, s: triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)  # noqa: E731
    full = [cfg(*c) for c in [(64, 4, 2), (128, 4, 2), (64, 4, 3), (128, 8, 3), (128, 8, 2)]]
    return pick_configs(full, cfg(64, 4, 2), cfg(16, 4, 1))


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, mask_base, stride_ms,
                lo, hi, offs_m, offs_d, seq_k, diag, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Online-softmax update over keys [lo, hi). MASKED: these blocks may cross the sequence end
    or the causal diagonal (the caller keeps whole, fully visible blocks unmasked)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        if MASKED:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            ok = n_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(ok, qk, float("-inf"))
        if HAS_MASK:
            real = tl.load(mask_base + offs_n * stride_ms, mask=n_ok, other=0)
            qk = tl.where(real[None, :] != 0, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with nothing visible yet has m_new = -inf; subtract 0 there so that
        # exp2(-inf - m) is 0 rather than exp2(nan).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_fwd_configs(), key=["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "IS_CAUSAL",
                                              "HAS_MASK", "IS_VARLEN"],
                 prune_configs_by={"early_config_prune": _prune_fwd}, cache_results=True)
@triton.jit
def _attn_fwd_kernel(
        Q, K, V, O, Mask, CuQ, CuK, qk_scale,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, stride_mb, stride_ms,
        Hq, GROUP, Sq, Sk, SQ_BUCKET, SK_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B * Hq, cdiv(Sq or max_seqlen_q, BLOCK_M)). Dense: q [B, Hq, Sq, D] by strides.
    Varlen: q [total_q, Hq, D] (stride_qb = 0), sequence b spans CuQ[b]:CuQ[b+1] (same for k).
    (B * Hq on axis 0, whose limit is 2^31 - 1 rather than 65535.)"""
    bh = tl.program_id(0)
    # Last query blocks first: under causal they are the longest, so they start in the first
    # wave instead of trailing at the end.
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)  # head offsets can pass 2^31 elements on long sequences
    if IS_VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        seq_q = (tl.load(CuQ + b + 1) - tl.load(CuQ + b)).to(tl.int32)
        k_start = tl.load(CuK + b).to(tl.int64)
        seq_k = (tl.load(CuK + b + 1) - tl.load(CuK + b)).to(tl.int32)
    else:
        q_start = 0
        seq_q = Sq
        k_start = 0
        seq_k = Sk
    b64 = b.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + kvh * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + kvh * stride_vh + k_start * stride_vs
    mask_base = Mask + b64 * stride_mb

    diag = seq_k - seq_q  # bottom-right causal alignment
    if IS_CAUSAL:
        # Keys below `mid` are visible to every row of this block; [mid, hi) crosses the diagonal.
        hi = tl.maximum(tl.minimum(seq_k, (start_m + 1) * BLOCK_M + diag), 0)
        mid = tl.maximum(tl.minimum(start_m * BLOCK_M + diag + 1, hi), 0)
    else:
        hi = seq_k + 0 * start_m
        mid = hi
    mid = (mid // BLOCK_N) * BLOCK_N
    # Varlen grids are sized for the longest sequence: blocks past this one's end do no work.
    hi = tl.where(start_m * BLOCK_M >= seq_q, 0, hi)
    mid = tl.minimum(mid, hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                mask_base, stride_ms, 0, mid, offs_m, offs_d, seq_k, diag,
                                qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL,
                                HAS_MASK, DOT_PREC)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                mask_base, stride_ms, mid, hi, offs_m, offs_d, seq_k, diag,
                                qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL,
                                HAS_MASK, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # no visible key: acc is 0, the row stays 0
    out = acc / l_safe[:, None]
    o_base = O + b64 * stride_ob + h * stride_oh + q_start * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_decode_configs(), key=["SK_BUCKET", "BLOCK_D", "BLOCK_G", "HAS_MASK"],
                 cache_results=True)
@triton.jit
def _decode_partial_kernel(
        Q, K, V, Mask, Opart, Lse, qk_scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_mb, stride_ms, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
        Hkv, GROUP, Sk, CHUNK, SK_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
        HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B * Hkv, num_splits). One program: the GROUP query heads that share one KV head
    (rows of the tile, so K/V are read once for all of them) against keys
    [split * CHUNK, split * CHUNK + CHUNK). Writes the normalised partial output and its
    log2-sum-exp, which _decode_reduce_kernel merges."""
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = bkv // Hkv
    kvh = (bkv % Hkv).to(tl.int64)
    b64 = b.to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, Sk)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, K + b64 * stride_kb + kvh * stride_kh,
                                V + b64 * stride_vb + kvh * stride_vh, stride_ks, stride_vs,
                                Mask + b64 * stride_mb, stride_ms, lo, hi, offs_g, offs_d,
                                hi, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, False,
                                HAS_MASK, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    p_base = Opart + b64 * stride_pb + split * stride_ps
    tl.store(p_base + heads[:, None] * stride_ph + offs_d[None, :], acc / l_safe[:, None],
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(Opart, Lse, O, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                          stride_ob, stride_oh, Hq, NUM_SPLITS,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B * Hq,): out = sum_s w_s * O_s / sum_s w_s with w_s = 2^(lse_s - max lse)."""
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # 0 for empty or fully masked splits
    denom = tl.sum(w, 0)
    part = tl.load(Opart + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------- wrappers


def _check_qkv(q, k, v, head_axis: int):
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q/k/v must share one dtype of fp16/bf16/fp32, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim {D} unsupported: at most 256")
    Hq, Hkv = q.shape[head_axis], k.shape[head_axis]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    check_device(q, k, v)


def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16


def _mask_arg(key_padding_mask, q, B, Sk):
    if key_padding_mask is None:
        return q, 0, 0  # never read (HAS_MASK=False)
    if key_padding_mask.shape != (B, Sk):
        raise ValueError(f"key_padding_mask must be [B={B}, Sk={Sk}], got {tuple(key_padding_mask.shape)}")
    m = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, decode: Optional[bool] = None) -> torch.Tensor:
    """softmax(q k^T * scale + masks) v. q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D].

    decode: None picks the split-K decode kernels for Sq == 1 and Sk >= DECODE_MIN_KEYS; True
    forces them (Sq must be 1), False never uses them.
    """
    _check_qkv(q, k, v, head_axis=1)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape[0] != B:
        raise ValueError(f"batch mismatch: q {B}, k {k.shape[0]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    use_decode = (Sq == 1 and Sk >= DECODE_MIN_KEYS) if decode is None else decode
    if use_decode:
        # Sq == 1: the causal mask hides nothing (the query aligns with the last key).
        return flash_decode(q, k, v, key_padding_mask, scale)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    mask, smb, sms = _mask_arg(key_padding_mask, q, B, Sk)

    def grid(meta):
        return (B * Hq, triton.cdiv(Sq, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, out, mask, q, q, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        smb, sms, Hq, Hq // Hkv, Sq, Sk, bucket(Sq), bucket(Sk),
        HEAD_DIM=D, BLOCK_D=_block_d(D), IS_CAUSAL=bool(causal),
        HAS_MASK=key_padding_mask is not None, IS_VARLEN=False,
        DOT_PREC=_dot_precision(q.dtype))
    return out


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                           causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Attention over a packed batch of variable-length sequences (flash-attn's varlen API).

    q [total_q, Hq, D], k/v [total_k, Hkv, D]; cu_seqlens_* int32 [B+1], cumulative lengths
    starting at 0: sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] against
    k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]. causal aligns each sequence's last query with its
    last key. Pass max_seqlen_q to avoid a device->host sync. Returns [total_q, Hq, D].
    """
    _check_qkv(q, k, v, head_axis=1)
    if q.dim() != 3:
        raise ValueError(f"varlen q must be [total, H, D], got {tuple(q.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [B+1]")
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    B = cu_seqlens_q.numel() - 1
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if B > 0 else 0
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max()) if B > 0 else 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = torch.empty_like(q)
    if out.numel() == 0 or B == 0 or max_seqlen_q == 0:
        return out.zero_()

    def grid(meta):
        return (B * Hq, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, out, q, cu_q, cu_k, scale * _LOG2E,
        0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0),
        0, v.stride(1), v.stride(0), 0, out.stride(1), out.stride(0),
        0, 0, Hq, Hq // Hkv, max_seqlen_q, max_seqlen_k, bucket(max_seqlen_q), bucket(max_seqlen_k),
        HEAD_DIM=D, BLOCK_D=_block_d(D), IS_CAUSAL=bool(causal), HAS_MASK=False, IS_VARLEN=True,
        DOT_PREC=_dot_precision(q.dtype))
    return out


def _default_splits(B: int, Hkv: int, Sk: int, device) -> int:
    # Enough programs for ~2 waves over the SMs, but chunks of at least 256 keys so the
    # per-split overhead (partial write + reduce) stays small.
    want = triton.cdiv(2 * num_sms(device), max(1, B * Hkv))
    return max(1, min(want, triton.cdiv(Sk, 256), 128))


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                 num_splits: Optional[int] = None) -> torch.Tensor:
    """Single-query attention (q [B, Hq, 1, D]) over a long KV cache, flash-decoding style:
    the keys are cut into num_splits chunks, each (chunk, batch, kv head) program computes a
    partial softmax for all query heads of that kv head, then a reduction kernel merges them
    with their log-sum-exp. Same semantics as flash_attention with Sq == 1."""
    _check_qkv(q, k, v, head_axis=1)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Sq != 1:
        raise ValueError(f"flash_decode takes one query per sequence, got Sq={Sq}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if Sk == 0:
        return out.zero_()
    splits = num_splits or _default_splits(B, Hkv, Sk, q.device)
    # Chunks are whole multiples of every autotuned BLOCK_N, so only the last one is ragged.
    gran = 16 if interpreting() else 128
    chunk = triton.cdiv(triton.cdiv(Sk, splits), gran) * gran
    splits = triton.cdiv(Sk, chunk)
    group = Hq // Hkv
    block_d = _block_d(D)
    part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    mask, smb, sms = _mask_arg(key_padding_mask, q, B, Sk)
    _decode_partial_kernel[(B * Hkv, splits)](
        q, k, v, mask, part, lse, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), smb, sms,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        Hkv, group, Sk, chunk, bucket(Sk),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HAS_MASK=key_padding_mask is not None, DOT_PREC=_dot_precision(q.dtype))
    _decode_reduce_kernel[(B * Hq,)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), Hq, splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out
