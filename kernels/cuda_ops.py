"""Thin wrappers over lathe._C_cuda (lathe's CUDA kernels): tensor checks, output allocation,
pointer and stream passing.

Importing this module never initialises CUDA and works without a GPU or the extension: the
extension is loaded (lathe._ext.require_cuda) only when a kernel is called.
"""
from __future__ import annotations

import math

import torch

from lathe import _ext
from lathe.errors import BadInput  # noqa: F401
from lathe.kernels.boundary import checked, need

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
GROUP_SIZES = (32, 64, 128)
HEAD_DIMS = (32, 64, 96, 128, 256)


_need = need


def _check_cuda(op: str, name: str, t: torch.Tensor, device: torch.device | None = None):
    _need(isinstance(t, torch.Tensor), f"{op}: {name} must be a tensor, got {type(t).__name__}")
    _need(t.device.type == "cuda", f"{op}: {name} must be a CUDA tensor, got device {t.device}")
    if device is not None:
        _need(t.device == device, f"{op}: {name} is on {t.device} but the input is on {device}")
    _need(t.is_contiguous(), f"{op}: {name} must be contiguous (call .contiguous() first)")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The kernels use 16-byte loads; a view at an odd storage offset is copied (fresh
    allocations from the caching allocator are always aligned)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _dtype_code(op: str, t: torch.Tensor) -> int:
    _need(t.dtype in DTYPE_CODES,
          f"{op}: activations must be float16 or bfloat16, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
    """y = x @ dequant(W)^T (+ bias) for decode, W in lathe's int4 format
    (lathe.compress.formats.Int4Group): qweight uint8 [N, K/2] (low nibble = even k),
    scales [N, K/g], zeros uint8 [N, K/g] (codes 0..15).

    x [..., K] float16/bfloat16; fp32 accumulation; returns [..., N] in x's dtype. Meant for
    up to 16 rows of x; more rows run 16 at a time. scales/bias in another float dtype are
    cast to x's dtype (store them in x's dtype to skip that copy).
    """
    op = "w4a16_linear"
    _check_cuda(op, "x", x)
    code = _dtype_code(op, x)
    dev = x.device
    _need(x.dim() >= 1 and x.shape[-1] > 0, f"{op}: x must be [..., K] with K > 0, got {tuple(x.shape)}")
    K = x.shape[-1]
    _need(isinstance(group_size, int) and group_size in GROUP_SIZES,
          f"{op}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    _need(K % group_size == 0, f"{op}: K = {K} is not a multiple of group_size {group_size}")
    _check_cuda(op, "qweight", qweight, dev)
    _need(qweight.dtype == torch.uint8, f"{op}: qweight must be uint8, got {qweight.dtype}")
    _need(qweight.dim() == 2 and qweight.shape[1] == K // 2,
          f"{op}: qweight must be [N, K/2] = [N, {K // 2}], got {tuple(qweight.shape)}")
    N = qweight.shape[0]
    _need(N > 0, f"{op}: qweight has no rows")
    n_groups = K // group_size
    _check_cuda(op, "scales", scales, dev)
    _need(scales.is_floating_point(), f"{op}: scales must be floating point, got {scales.dtype}")
    _need(tuple(scales.shape) == (N, n_groups),
          f"{op}: scales must be [N, K/g] = [{N}, {n_groups}], got {tuple(scales.shape)}")
    _check_cuda(op, "zeros", zeros, dev)
    _need(zeros.dtype == torch.uint8, f"{op}: zeros must be uint8 codes, got {zeros.dtype}")
    _need(tuple(zeros.shape) == (N, n_groups),
          f"{op}: zeros must be [N, K/g] = [{N}, {n_groups}], got {tuple(zeros.shape)}")
    if bias is not None:
        _check_cuda(op, "bias", bias, dev)
        _need(bias.is_floating_point(), f"{op}: bias must be floating point, got {bias.dtype}")
        _need(tuple(bias.shape) == (N,), f"{op}: bias must be [N] = [{N}], got {tuple(bias.shape)}")
        bias = bias.to(x.dtype)
    scales = scales.to(x.dtype)

    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=dev)
    M = x.numel() // K
    if M == 0:
        return out
    x2, qw = _aligned(x), _aligned(qweight)
    mod = checked(_ext.require_cuda())
    with torch.cuda.device(dev):
        mod.w4a16_linear(x2.data_ptr(), qw.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                         0 if bias is None else bias.data_ptr(), out.data_ptr(),
                         M, N, K, group_size, code, _stream(dev))
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     seq_lens: torch.Tensor | None = None, scale: float | None = None):
    """Flash-decoding attention for one query per head against a KV cache.

    q [B, Hq, D], k/v [B, Hkv, S, D] (contiguous, same float16/bfloat16 dtype, Hq a multiple
    of Hkv), seq_lens integer [B] (keys at positions >= seq_lens[b] are ignored; 0 gives
    zeros), scale defaults to 1/sqrt(D). Returns [B, Hq, D] in q's dtype; fp32 softmax.
    """
    op = "decode_attention"
    _check_cuda(op, "q", q)
    code = _dtype_code(op, q)
    dev = q.device
    _need(q.dim() == 3, f"{op}: q must be [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        _check_cuda(op, name, t, dev)
        _need(t.dtype == q.dtype, f"{op}: {name} is {t.dtype} but q is {q.dtype}")
        _need(t.dim() == 4, f"{op}: {name} must be [B, Hkv, S, D], got {tuple(t.shape)}")
    _need(k.shape == v.shape, f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    _, Hkv, S, Dk = k.shape
    _need(k.shape[0] == B, f"{op}: k has batch {k.shape[0]} but q has {B}")
    _need(Dk == D, f"{op}: k/v head dim {Dk} differs from q's {D}")
    _need(D in HEAD_DIMS, f"{op}: head dim {D} is not supported (expected one of {HEAD_DIMS})")
    _need(Hkv > 0 and Hq % Hkv == 0,
          f"{op}: q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if seq_lens is not None:
        _check_cuda(op, "seq_lens", seq_lens, dev)
        _need(not seq_lens.is_floating_point() and not seq_lens.is_complex()
              and seq_lens.dtype != torch.bool,
              f"{op}: seq_lens must be an integer tensor, got {seq_lens.dtype}")
        _need(tuple(seq_lens.shape) == (B,), f"{op}: seq_lens must be [B] = [{B}], got {tuple(seq_lens.shape)}")
        seq_lens = seq_lens.to(torch.int32)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    _need(math.isfinite(scale), f"{op}: scale must be finite, got {scale}")

    if B == 0 or Hq == 0:
        return torch.empty_like(q)
    if S == 0:  # no key at all: every row is empty, like a zero seq_len
        return torch.zeros_like(q)
    q2, k2, v2 = _aligned(q), _aligned(k), _aligned(v)
    out = torch.empty_like(q2)
    mod = checked(_ext.require_cuda())
    with torch.cuda.device(dev):
        mod.decode_attention(q2.data_ptr(), k2.data_ptr(), v2.data_ptr(),
                             0 if seq_lens is None else seq_lens.data_ptr(), out.data_ptr(),
                             B, Hq, Hkv, S, D, float(scale), code, _stream(dev))
    return out
