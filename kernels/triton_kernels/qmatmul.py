"""Quantized matmuls in Triton: y = x @ W^T for the lathe weight formats.

Entry points (x may have leading dims [..., K]; weights are nn.Linear order [N, K]):
  quantize_per_token_int8(x, smooth)   float x -> int8 q, fp32 scale per row (dynamic, symmetric)
  quantize_per_token_fp8(x)            float x -> float8_e4m3fn q, fp32 scale per row (one kernel)
  w8a8_linear(x, w_q, w_scale, ...)    int8 x int8 -> int32 accumulation, per-token x
                                       per-channel scales, optional bias and gelu/silu epilogue
  fp8_linear(x, w, x_scale, w_scale)   float8_e4m3fn x float8_e4m3fn -> fp32 accumulation,
                                       per-tensor or per-row/per-channel scales (sm_89+)
  w4a16_linear(x, qweight, scales, zeros, group_size)   lathe int4 weights (packing.py),
                                       dequantized in registers, fp32 accumulation
  w8a16_linear(x, qweight, scales, group_size)          int8 weights, per-group or per-channel
Semantics follow lathe.kernels.reference (quantize_rows_s8, linear_w8a8, linear_w4a16): the int4
weight tile is (code - zero) * scale rounded to the scales' dtype, then to x's dtype for the dot.

Roofline on H100 SXM (989 TFLOP/s fp16/bf16 dense, 1979 TOP/s int8/fp8 dense, 3.35 TB/s HBM3):
  FLOPs = 2 * M * N * K for all of them.
  W4A16 bytes = N*K/2 (codes) + N*(K/g)*(s + 1) (scales of s bytes, zeros) + 2*M*K + 2*M*N.
    At M = 1 that is 4 FLOP/byte: memory-bound until M ~ 295/4 ~ 70 (fp16 ridge 295 FLOP/byte).
    4096x4096, g=128, fp16 scales: 8.4 MB + 0.4 MB -> 2.6 us at 3.35 TB/s, against 33.5 MB /
    10 us for the fp16 weight: the ideal decode speed-up is ~3.8x (W8A16: ~2x).
  W8A8 bytes = M*K + N*K + 4*M (scales) + 4*N + o*M*N (o output bytes). For M << N, K the
    intensity is ~2M FLOP/byte against an int8 ridge of 1979/3.35 ~ 590: memory-bound below
    M ~ 300, and above it int8 tensor cores give up to 2x the fp16 rate (4096x4096, M=4096:
    137 GOP -> 70 us at peak). The dynamic quantization of x adds a pass over x
    (2*M*K read + M*K written for fp16 x).
  FP8 W8A8: the same bytes as int8, 1979 TFLOP/s dense on sm_90 (sm_89 has fp8 tensor cores too).
Weight-only paths by rows M (weight_only_path names them; bench reports show the name):
  M <= 16     gemv: a 16-row MMA tile, BLOCK_N = 16-64 output rows a program, no split-K
              (N >= 16 x SMs gives >= 2 programs per SM; fewer tiles take gemv-splitk, fp32
              atomics). The int4 codes are read as int32 words along W's rows ([N, K/8], the
              stored bytes, no repack): EVEN_K loads are 16-byte cp.async in a 3-5 stage
              pipeline (checked in the sm_90 PTX). Per 16 KB of codes a program issues
              ~5 ALU ops a weight (shift/and/or, fp32 sub/mul via the 2^23 exponent trick,
              one cvt to fp16), ~2.6 TB/s of codes at the H200's issue rate: above the
              ~1.4-2.1 TB/s that 3x fp16 cuBLAS needs at 4096^2..8192^2 (cuBLAS measured
              1.8-3.0 TB/s there). Unmeasured: the first GPU run of scripts/gpu_check.sh says.
  16 < M < DEQUANT_MIN_M   gemm: wgmma tiles up to 128x256, W dequantized per tile (1/BLOCK_M
              of the MMA work). At M = 256 both fp16 and int4 are compute-bound (8.6 GFLOP,
              ~12 us), so >= 1.5x fp16 is reachable only where cuBLAS is memory-bound (M <= ~64).
  M >= DEQUANT_MIN_M (1024)   dequant+cublas: W to x's dtype (read N*K/2, write 2*N*K bytes),
              then torch.matmul. The pass costs 2.5*N*K/BW against 2*M*N*K/F for the matmul:
              ~200/M of it on an H200 (F ~ 700 TFLOP/s, BW ~ 4.3 TB/s), 20% at M = 1024, 5% at
              M = 4096. So 0.95x fp16 holds from M ~ 4096 on this path; at M = 1024 the bench
              times the in-loop gemm beside it (path=) to pick the threshold.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._runtime import MISSING_TRITON, bucket, check_device, interpreting, num_sms, pick_configs

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the package's lazy wrappers only import this module when called
    raise ImportError(MISSING_TRITON) from e

_ACTS = {"none": 0, "gelu": 1, "silu": 2}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Weight-only matmuls with at most this many rows take the decode (GEMV) kernels.
SMALL_M = 16
# Row block of the int8 quantizer under the interpreter (small, so both of its paths are tested).
QUANT_BLOCK_INTERP = 128
# int4 matmuls with at least this many rows dequantize W once and call cuBLAS.
DEQUANT_MIN_M = 1024


def _dot_precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # exact fp32 for the interpreter tests


# ----------------------------------------------------------------------------- configs


def _cfg(bm, bn, bk, warps, stages, split_k=None):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    if split_k is not None:
        kw["SPLIT_K"] = split_k
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _mm_configs():
    # Hopper: 128x256 / 256x128 tiles with 8 warps feed wgmma; 64-wide tiles cover small M.
    full = [_cfg(*c) for c in [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                               (128, 128, 64, 4, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4),
                               (64, 64, 128, 4, 4), (32, 64, 128, 4, 4)]]
    return pick_configs(full, _cfg(128, 128, 128, 8, 3), _cfg(16, 32, 32, 4, 1))


def _wo_decode_configs():
    """M <= 16 (decode): one 16-row MMA tile; narrow N tiles give >= 2 waves of programs on
    132 SMs for N >= 4096 without split-K, and long BLOCK_K slabs (128-256 B of codes a row)
    with 3-5 stages keep ~16-32 KB of weight loads in flight per SM (Little's law at
    ~4.3 TB/s and ~1 us latency needs ~33 KB per SM)."""
    full = [_cfg(*c, split_k=1) for c in [(16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 32, 128, 4, 5),
                                          (16, 64, 128, 4, 4), (16, 16, 512, 4, 3), (16, 32, 512, 4, 3),
                                          (16, 64, 256, 8, 3)]]
    return pick_configs(full, _cfg(16, 32, 256, 4, 4, split_k=1), _cfg(16, 16, 32, 4, 1, split_k=1))


def _wo_splitk_configs():
    """M <= 16 with few output tiles (N < 16 x SMs): K is split across programs."""
    full = [_cfg(*c) for c in [(16, 32, 128, 4, 4, 2), (16, 32, 128, 4, 4, 4), (16, 32, 128, 4, 4, 8),
                               (16, 64, 128, 4, 4, 4), (16, 16, 256, 4, 4, 4), (16, 32, 256, 4, 4, 8)]]
    return pick_configs(full, _cfg(16, 32, 128, 4, 4, 4), _cfg(16, 16, 32, 4, 1, 2))


def _wo_gemm_configs():
    full = [_cfg(*c, split_k=1) for c in [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
                                          (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3),
                                          (64, 128, 128, 8, 3)]]
    return pick_configs(full, _cfg(64, 128, 64, 4, 4, split_k=1), _cfg(16, 16, 64, 4, 1, split_k=1))


def _prune_group(configs, named_args, **kwargs):
    """BLOCK_K must divide the group size or be a multiple of it (each slab then holds whole
    groups, or lies in one): halve it until it does, dropping the duplicates that makes."""
    g = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        while g % kw["BLOCK_K"] and kw["BLOCK_K"] % g:
            kw["BLOCK_K"] //= 2
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_half_even(v):
    """rint() for |v| < 2^23 from floor (libdevice's rint does not run in the interpreter)."""
    f = tl.math.floor(v)
    d = v - f  # exact
    half = f * 0.5
    odd = tl.math.floor(half) != half
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles share each column sweep, so W tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, offs_n, n_ok, Bias, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    if HAS_BIAS:
        acc = acc + tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # exact (erf) GELU, as torch.nn.functional.gelu
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if ACT == 2:  # SiLU
        acc = acc / (1.0 + tl.math.exp(-acc))
    return acc


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _quant_codes(x, scale, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    """int8: rint(x / s) clamped to +-127; FP8: x / s clamped to +-448 (NaN kept), rounded to
    e4m3 by the store's conversion. IEEE division (div_rn), as torch's x / s."""
    r = tl.math.div_rn(x, tl.broadcast_to(scale, [BLOCK_K]))
    if FP8:
        return tl.where(r != r, r, tl.minimum(tl.maximum(r, -448.0), 448.0))
    r = _round_half_even(r)
    return tl.minimum(tl.maximum(r, -127.0), 127.0)


@triton.jit
def _quant_rows_kernel(X, Smooth, Q, S, K, stride_xm, stride_qm,
                       HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                       FP8: tl.constexpr):
    """Grid (M,): per-row dynamic quantization, as reference.quantize_rows_s8 (int8:
    s = amax(|x * smooth|) / 127) or reference.quantize_fp8_act per token (FP8: s = amax / 448);
    s = 1 for an all-zero row or one holding a NaN (the reference's `amax > 0` is False there).
    ONE_PASS (K <= BLOCK_K, up to 8192): the row is read once and kept in registers; longer
    rows take a second pass over x (an L2 hit)."""
    QMAX: tl.constexpr = 448.0 if FP8 else 127.0
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    q_row = Q + row * stride_qm
    if ONE_PASS:
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(Smooth + offs, mask=offs < K, other=0.0).to(tl.float32)
        m = tl.max(tl.abs(x), 0)
        nan = tl.max((x != x).to(tl.int32), 0)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        nans = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = x * tl.load(Smooth + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
            nans = tl.maximum(nans, (x != x).to(tl.int32))
        m = tl.max(amax, 0)
        nan = tl.max(nans, 0)
    scale = tl.where((m > 0.0) & (nan == 0), tl.math.div_rn(m, QMAX), 1.0)
    if ONE_PASS:
        tl.store(q_row + offs, _quant_codes(x, scale, BLOCK_K, FP8).to(Q.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = x * tl.load(Smooth + offs, mask=offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + offs, _quant_codes(x, scale, BLOCK_K, FP8).to(Q.dtype.element_ty),
                     mask=offs < K)
    tl.store(S + row, scale)


@triton.autotune(configs=_mm_configs(), key=["M_BUCKET", "N", "K"], cache_results=True)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _scaled_mm_kernel(X, W, SX, SW, Bias, Y, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_ym, stride_sx, stride_sw,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IS_FP8: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """y = (x @ w^T) * sx[m] * sw[n] (+ bias, act). int8: exact int32 accumulation; fp8 (e4m3):
    fp32 accumulation. stride_sx/stride_sw = 0 broadcast a per-tensor scale.

    EVEN_K (K % BLOCK_K == 0): the loads are masked by row only, so they vectorize to 16 bytes
    and triton pipelines them (cp.async into num_stages buffers); a mask that varies along K
    turns them into 1-byte loads outside the pipeline (seen in the sm_90 PTX)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * stride_wn  # a [BLOCK_K, BLOCK_N] view of w^T
    if IS_FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x_ptrs + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            b = tl.load(w_ptrs + offs_k[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K
            a = tl.load(x_ptrs + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_FP8:
            # Hopper's fp8 MMA accumulates in reduced precision: promote the partial sum to
            # fp32 every BLOCK_K (<= 128) of K, as cuBLAS does without fast accumulation.
            acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
        else:
            # An explicit int32 out_dtype: triton 3.6 asserts acc dtype == out_dtype.
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sx = tl.load(SX + offs_m * stride_sx, mask=m_ok, other=0.0)
    sw = tl.load(SW + offs_n * stride_sw, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]  # reference order: (acc * s_x) * s_w
    y = _epilogue(y, offs_n, n_ok, Bias, HAS_BIAS, ACT)
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
             y.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_tile(qw_ptrs, s_ptrs, z_ptrs, wmask, gmask, zmask,
                  BITS: tl.constexpr, HAS_ZERO: tl.constexpr, NG: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] weight tile, dequantized in registers to OUT_DTYPE.

    BITS=4: qw_ptrs address a [BLOCK_N, BLOCK_K/8] tile of int32 words (the uint8 [N, K/2]
    weight viewed as int32 [N, K/8]; word j of a row holds k = 8j + i at bits 4i), so each row
    reads BLOCK_K/2 contiguous bytes: 128-bit coalesced loads, no duplicated addresses.
    BITS=8: a [BLOCK_N, BLOCK_K] int8 tile. The tile covers NG quantization groups
    (s_ptrs / z_ptrs [BLOCK_N, NG]). The codes become floats with the exponent trick
    (2^23 + c is an fp32 whose bits are 0x4B000000 | c): an OR and a subtract, not an
    int->float conversion, which runs at a quarter of the FMA rate. (c - z) is exact and the
    product is rounded once to the scales' dtype, as reference.dequant_int4."""
    s = tl.load(s_ptrs, mask=gmask, other=0.0)
    if BITS == 4:
        words = tl.load(qw_ptrs, mask=wmask, other=0)
        shifts = tl.arange(0, 8) * 4
        codes = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        c = (codes | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code
        if HAS_ZERO:
            z = tl.load(z_ptrs, mask=zmask, other=0).to(tl.int32)
            zf = (z | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + zero
        else:
            zf = tl.full([BLOCK_N, NG], 8388616.0, tl.float32)  # 2^23 + 8
        c = tl.reshape(c, [BLOCK_N, NG, BLOCK_K // NG])
        w = (c - zf[:, :, None]) * s.to(tl.float32)[:, :, None]
    else:
        c = tl.load(qw_ptrs, mask=wmask, other=0).to(tl.float32)
        c = tl.reshape(c, [BLOCK_N, NG, BLOCK_K // NG])
        w = c * s.to(tl.float32)[:, :, None]
    w = tl.reshape(w, [BLOCK_N, BLOCK_K])
    # Round like the reference (W in the scales' dtype), then to x's dtype for the MMA.
    return w.to(s.dtype).to(OUT_DTYPE)


@triton.jit
def _weight_only_kernel(X, QW, S, Z, Bias, Y, M, N, K, M_BUCKET,
                        stride_xm, stride_qn, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
                        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Grid (tiles, SPLIT_K): y[m, n] = sum_k x[m, k] W[n, k] (+ bias), fp32 accumulation.

    EVEN_K (K % BLOCK_K == 0, every Llama shape): loads are masked by row only, so the mask is
    constant along K and the weight loads vectorize to 16 bytes (a mask that varies along K
    makes triton split them into 4-byte copies).

    The weight tile is [BLOCK_N, BLOCK_K] in W's own row order (rows contiguous along K, see
    _dequant_tile) and enters the dot transposed. BLOCK_K divides GROUP_SIZE or is a multiple
    of it (stride_sg = 0: one scale per row, per-channel). SPLIT_K > 1: Y is a zeroed fp32
    buffer, fp32 partial sums are atomically added (run-to-run bit differences possible)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    KW: tl.constexpr = BLOCK_K // 8 if BITS == 4 else BLOCK_K  # weight elements per row
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_w = tl.arange(0, KW)
    offs_g = tl.arange(0, NG)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm
    qw_rows = QW + offs_n.to(tl.int64)[:, None] * stride_qn
    k_per_split = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kw = k0 // 8 + offs_w if BITS == 4 else k0 + offs_w
        if EVEN_K:
            x = tl.load(x_ptrs + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            wmask = tl.broadcast_to(n_ok[:, None], [BLOCK_N, KW])
        else:
            x = tl.load(x_ptrs + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            wmask = n_ok[:, None] & (kw < (K // 8 if BITS == 4 else K))[None, :]
        g = k0 // GROUP_SIZE + offs_g
        g_ok = (g * GROUP_SIZE < K)[None, :] & n_ok[:, None]
        w = _dequant_tile(qw_rows + kw[None, :], S + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                          Z + offs_n[:, None] * stride_zn + g[None, :] * stride_zg,
                          wmask, g_ok, g_ok,
                          BITS, HAS_ZERO, NG, BLOCK_N, BLOCK_K, X.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        if pid_k == 0:
            acc = acc + tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(y_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_int4_kernel(QW, S, Z, W, N, K, stride_qn, stride_sn, stride_zn, stride_wn,
                         HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """W [N, K] (W's dtype) from lathe int4 words, for the large-M path (then cuBLAS).
    EVEN_K: masks by row only (vector loads and stores, as in _weight_only_kernel)."""
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    g = k0 // GROUP_SIZE + tl.arange(0, NG)
    g_ok = (g * GROUP_SIZE < K)[None, :] & n_ok[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        wmask = tl.broadcast_to(n_ok[:, None], [BLOCK_N, BLOCK_K // 8])
        omask = tl.broadcast_to(n_ok[:, None], [BLOCK_N, BLOCK_K])
    else:
        wmask = n_ok[:, None] & (kw < K // 8)[None, :]
        omask = n_ok[:, None] & (offs_k < K)[None, :]
    w = _dequant_tile(QW + offs_n.to(tl.int64)[:, None] * stride_qn + kw[None, :],
                      S + offs_n[:, None] * stride_sn + g[None, :],
                      Z + offs_n[:, None] * stride_zn + g[None, :],
                      wmask, g_ok, g_ok, 4, HAS_ZERO, NG, BLOCK_N, BLOCK_K, W.dtype.element_ty)
    tl.store(W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], w, mask=omask)


_wo_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_weight_only_kernel)
_wo_kw = dict(key=["M_BUCKET", "N", "K", "GROUP_SIZE", "BITS"],
              prune_configs_by={"early_config_prune": _prune_group}, cache_results=True)
_wo_decode = triton.autotune(configs=_wo_decode_configs(), **_wo_kw)(_wo_kernel)
_wo_splitk = triton.autotune(configs=_wo_splitk_configs(), reset_to_zero=["Y"], **_wo_kw)(_wo_kernel)
_wo_gemm = triton.autotune(configs=_wo_gemm_configs(), **_wo_kw)(_wo_kernel)


# ----------------------------------------------------------------------------- wrappers


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _mm_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _act_code(act: str) -> int:
    if act not in _ACTS:
        raise ValueError(f"unknown activation {act!r}: expected none, gelu or silu")
    return _ACTS[act]


def _scale_arg(scale: torch.Tensor, n: int, what: str):
    """fp32 scale vector and its stride: one value (stride 0, per-tensor) or n values."""
    s = scale.to(torch.float32).reshape(-1).contiguous()
    if s.numel() == 1:
        return s, 0
    if s.numel() != n:
        raise ValueError(f"{what} must hold 1 or {n} values, got {scale.numel()}")
    return s, 1


def _quantize_rows(x: torch.Tensor, smooth: Optional[torch.Tensor], fp8: bool):
    check_device(x, smooth)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be fp16/bf16/fp32, got {x.dtype}")
    K = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    # Triton's interpreter rounds fp32 -> e4m3 wrongly (half away from zero, and 124 -> 64
    # when the mantissa carries): there the kernel writes the clamped fp32 values and torch
    # converts them. On a GPU the store converts (cvt.rn.satfinite, round-half-even).
    fp8_via_torch = fp8 and interpreting()
    q = torch.empty(M, K, device=x.device,
                    dtype=torch.float32 if fp8_via_torch else torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty(M, device=x.device, dtype=torch.float32)
    if M and K:
        sm = smooth.contiguous() if smooth is not None else x2
        block = min(triton.next_power_of_2(K), QUANT_BLOCK_INTERP if interpreting() else 8192)
        _quant_rows_kernel[(M,)](x2, sm, q, s, K, x2.stride(0), q.stride(0),
                                 HAS_SMOOTH=smooth is not None, BLOCK_K=block, ONE_PASS=K <= block,
                                 FP8=fp8, num_warps=4 if block <= 1024 else 8)
    elif M:
        s.fill_(1.0)
    if fp8_via_torch:
        q = q.to(torch.float8_e4m3fn)
    return q.reshape(*x.shape), s.reshape(x.shape[:-1])


def quantize_per_token_int8(x: torch.Tensor, smooth: Optional[torch.Tensor] = None):
    """Dynamic symmetric int8 per row of x [..., K] (as reference.quantize_rows_s8, on x * smooth
    if given): returns q int8 [..., K] and scale fp32 [...] (1 for an all-zero row)."""
    return _quantize_rows(x, smooth, fp8=False)


def quantize_per_token_fp8(x: torch.Tensor):
    """Dynamic e4m3 per row of x [..., K], one kernel, bit for bit
    reference.quantize_fp8_act(x, "per_token"): q float8_e4m3fn [..., K], scale fp32 [...]."""
    return _quantize_rows(x, None, fp8=True)


def _scaled_mm(x2, w, sx, ssx, sw, ssw, bias, act, out_dtype, is_fp8):
    M, K = x2.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:  # empty reduction: only bias and activation remain
        from lathe.kernels.reference import apply_act
        b = bias.float() if bias is not None else torch.zeros(N, device=x2.device)
        return y.copy_(apply_act(b.expand(M, N), act))
    _scaled_mm_kernel[_mm_grid(M, N)](
        x2, w, sx, sw, bias if bias is not None else sx, y, M, N, K, bucket(M),
        x2.stride(0), w.stride(0), y.stride(0), ssx, ssw,
        HAS_BIAS=bias is not None, ACT=_act_code(act), IS_FP8=is_fp8)
    return y


def _scaled_linear(x2, w, x_scale, w_scale, bias, act, out_dtype, is_fp8, lead):
    """[*lead, N]: x2 [M, K] codes times w [N, K] codes, scaled by x_scale / w_scale (one value
    or one a row / column each)."""
    M, N = x2.shape[0], w.shape[0]
    sx, ssx = _scale_arg(x_scale, M, "x_scale")
    sw, ssw = _scale_arg(w_scale, N, "w_scale")
    w = w if w.stride(-1) == 1 else w.contiguous()
    return _scaled_mm(x2, w, sx, ssx, sw, ssw, bias, act, out_dtype, is_fp8).reshape(*lead, N)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, act: str = "none",
                x_scale: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 int8 linear: y = (q_x @ w_q^T) * s_x * s_w + bias, then act.

    x: float [..., K] (quantized per token here, as reference.linear_w8a8, after * smooth), or
    int8 [..., K] with x_scale fp32 [...] / [..., 1]. w_q int8 [N, K], w_scale fp32 [N].
    Output dtype: out_dtype, else x's float dtype, else fp16 for an int8 x.
    """
    check_device(x, w_q, w_scale, bias, x_scale, smooth)
    if w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.shape[1] != x.shape[-1]:
        raise ValueError(f"w_q must be int8 [N, K={x.shape[-1]}], got {w_q.dtype} {tuple(w_q.shape)}")
    lead = x.shape[:-1]
    if x.dtype == torch.int8:
        if x_scale is None:
            raise ValueError("an int8 x needs its per-token x_scale")
        if smooth is not None:
            raise ValueError("smooth applies before quantization: pass a float x")
        q, sx = _rows(x), x_scale
        out_dtype = out_dtype or torch.float16
    else:
        q, sx = quantize_per_token_int8(x, smooth)
        q = q.reshape(-1, x.shape[-1])
        out_dtype = out_dtype or x.dtype
    return _scaled_linear(q, w_q, sx, w_scale, bias, act, out_dtype, False, lead)


def _require_fp8(device: torch.device):
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise RuntimeError(f"FP8 (e4m3) matmul needs an sm_89+ GPU (Ada/Hopper); this one is "
                               f"sm_{cap[0]}{cap[1]}: use w8a8_linear (int8) instead")


def quantize_fp8(x: torch.Tensor, per_row: bool = True):
    """float x [..., K] -> (float8_e4m3fn [..., K], fp32 scale [...] per row or [] per tensor),
    scale = amax / 448 (1 for zeros). Plain PyTorch: a convenience for callers and tests."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if per_row else xf.abs().amax()
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    s = scale[..., None] if per_row else scale
    q = (xf / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def fp8_linear(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, act: str = "none",
               out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """FP8 W8A8: y = (x @ w^T in fp32) * x_scale * w_scale + bias, then act.

    x float8_e4m3fn [..., K], w float8_e4m3fn [N, K]; x_scale one value (per tensor) or [M]
    (per row), w_scale one value or [N] (per channel). Needs sm_89+ on a GPU.
    """
    check_device(x, w, x_scale, w_scale, bias)
    _require_fp8(x.device)
    fp8 = torch.float8_e4m3fn
    if x.dtype != fp8 or w.dtype != fp8:
        raise TypeError(f"x and w must be torch.float8_e4m3fn, got {x.dtype}, {w.dtype}")
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"w must be [N, K={x.shape[-1]}], got {tuple(w.shape)}")
    lead = x.shape[:-1]
    return _scaled_linear(_rows(x), w, x_scale, w_scale, bias, act, out_dtype, True, lead)


def weight_only_path(M: int, N: int, bits: int, device) -> str:
    """Which kernel a weight-only matmul with M rows runs (named in bench reports):
      gemv          M <= 16 and N >= 16 x SMs: the decode kernel, one program a 16-row slab
                    of W (no split-K, no extra launches)
      gemv-splitk   M <= 16, fewer output tiles: K split over programs, fp32 atomics into a
                    zeroed buffer (two extra launches: the zero fill and the cast)
      gemm          16 < M < DEQUANT_MIN_M: tensor-core GEMM, W dequantized per tile
      dequant+cublas  int4 with M >= DEQUANT_MIN_M: W dequantized once to x's dtype, then
                    torch.matmul (the dequant pass is ~5% of the matmul there)."""
    if M <= SMALL_M:
        return "gemv" if triton.cdiv(N, 16) >= num_sms(torch.device(device)) else "gemv-splitk"
    if bits == 4 and M >= DEQUANT_MIN_M:
        return "dequant+cublas"
    return "gemm"


def _int4_words(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int32 [N, K/8], the same bytes (little-endian words): no copy unless
    the rows are not 4-byte aligned."""
    qw = qweight.contiguous()
    if qw.storage_offset() % 4:
        qw = qw.clone()
    return qw.view(torch.int32)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` from the lathe int4 format, on the GPU (as reference.dequant_int4,
    then cast to dtype)."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    qw, sc = _int4_words(qweight), scales.contiguous()
    zs = zeros.contiguous() if zeros is not None else sc
    w = torch.empty(N, K, device=qweight.device, dtype=dtype)
    bn, bk = (16, 64) if interpreting() else (64, 256)
    _dequant_int4_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        qw, sc, zs, w, N, K, qw.stride(0), sc.stride(0), zs.stride(0), w.stride(0),
        HAS_ZERO=zeros is not None, GROUP_SIZE=group_size, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=K % bk == 0, num_warps=4, num_stages=1)
    return w


PATHS = ("gemv", "gemv-splitk", "gemm", "dequant+cublas")


def _weight_only(x, qweight, scales, zeros, group_size, bias, bits, per_channel, path=None):
    check_device(x, qweight, scales, zeros, bias)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be fp16/bf16/fp32, got {x.dtype}")
    if scales.dtype not in _FLOATS:
        raise TypeError(f"scales must be fp16/bf16/fp32, got {scales.dtype}")
    K = x.shape[-1]
    N = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = _rows(x)
    M = x2.shape[0]
    y_dtype = x.dtype
    if M == 0 or N == 0:
        return torch.empty(*lead, N, device=x.device, dtype=y_dtype)
    if path is None:
        path = weight_only_path(M, N, bits, x.device)
    elif path not in PATHS or (path == "dequant+cublas" and bits != 4):
        raise ValueError(f"path must be one of {PATHS} (dequant+cublas: int4 only), got {path!r}")
    sc = scales.contiguous()
    if path == "dequant+cublas":
        w = dequantize_int4(qweight, sc, zeros, group_size, x.dtype)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
        return y.reshape(*lead, N)
    qw = _int4_words(qweight) if bits == 4 else qweight.contiguous()
    zs = zeros.contiguous() if zeros is not None else sc
    stride_sg = 0 if per_channel else sc.stride(1)
    # Per-channel: the scale does not change along K; a group wider than any BLOCK_K keeps
    # one scale load per row and slab.
    gs = 1024 if per_channel else group_size
    kernel = {"gemv": _wo_decode, "gemv-splitk": _wo_splitk, "gemm": _wo_gemm}[path]
    if path == "gemv-splitk":  # fp32 partial sums are atomically added into zeros
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(M, N, device=x.device, dtype=y_dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](x2, qw, sc, zs, bias if bias is not None else sc, y, M, N, K, bucket(M),
                 x2.stride(0), qw.stride(0), sc.stride(0), stride_sg, zs.stride(0),
                 zs.stride(1) if zeros is not None else 0, y.stride(0),
                 BITS=bits, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None,
                 GROUP_SIZE=gs, DOT_PREC=_dot_precision(x.dtype))
    return y.to(y_dtype).reshape(*lead, N)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], group_size: int = 128,
                 bias: Optional[torch.Tensor] = None, path: Optional[str] = None) -> torch.Tensor:
    """Weight-only int4 linear in the lathe format (see packing.py): y = x @ W^T + bias, fp32
    accumulation, returned in x's dtype. qweight uint8 [N, K/2], scales [N, K/g], zeros uint8
    [N, K/g] or None (symmetric, zero 8). K % group_size == 0, group_size a multiple of 16.
    path: None picks by shape (weight_only_path); one of PATHS forces it (benchmarks, tests)."""
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2) or K % 2:
        raise ValueError(f"qweight must be uint8 [N, K/2={K // 2}], got {qweight.dtype} {tuple(qweight.shape)}")
    if group_size <= 0 or group_size % 16 or K % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of 16 dividing K={K}")
    G = K // group_size
    if scales.shape != (N, G) or (zeros is not None and zeros.shape != (N, G)):
        raise ValueError(f"scales/zeros must be [N={N}, K/g={G}]")
    if zeros is not None and zeros.dtype != torch.uint8:
        raise TypeError(f"zeros must be uint8 codes, got {zeros.dtype}")
    return _weight_only(x, qweight, scales, zeros, group_size, bias, bits=4, per_channel=False, path=path)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 group_size: Optional[int] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int8 linear: W[n, k] = qweight[n, k] * scales[n, k // g] (symmetric).

    qweight int8 [N, K]; scales [N, 1] (per channel, group_size None) or [N, K/g]."""
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.dtype != torch.int8 or qweight.shape != (N, K):
        raise ValueError(f"qweight must be int8 [N, K={K}], got {qweight.dtype} {tuple(qweight.shape)}")
    per_channel = scales.dim() == 1 or scales.shape[-1] == 1
    if per_channel:
        sc = scales.reshape(N, 1)
    else:
        if group_size is None:
            group_size = K // scales.shape[1]
        if group_size <= 0 or group_size % 16 or K % group_size or scales.shape != (N, K // group_size):
            raise ValueError(f"scales [N, K/g] need a group_size that is a multiple of 16 "
                             f"dividing K={K}; got scales {tuple(scales.shape)}, g={group_size}")
        sc = scales
    return _weight_only(x, qweight, sc, None, group_size or K, bias, bits=8, per_channel=per_channel)
