"""int4 weight-only linear on the CPU (lathe._C, csrc/cpu/int4_gemm.*): tensor checks, output
allocation, pointer passing. Threads follow torch.get_num_threads(); the ISA follows
lathe.kernels.cpu.force_isa / LATHE_ISA.

Weights are lathe's int4 format (lathe.compress.formats.Int4Group): qweight uint8 [N, K/2]
(low nibble = even k), scales fp32 [N, K/g], zeros uint8 [N, K/g] codes 0..15 or None for
symmetric (zero 8); W = (code - zero) * scale. `int4_pack` re-lays them out once at load time;
`int4_linear` runs y = x @ W^T + bias for fp32 or bf16 x (output in x's dtype).

Numerics (`exact`):
  exact=False (default): activations are quantized per (row, group) to int8 on the fly and
    multiplied with the 4-bit codes by VPDPBUSD in int32 (onnxruntime's MatMulNBits with
    accuracy_level=4 does the same). The only extra error is the activation rounding,
    at most half a step of amax/127 per element: about 45 dB SQNR at g=32 and 43 dB at g=128
    for Gaussian-like activations, versus the fp32 reference.
  exact=True: weight tiles are dequantized to fp32 exactly as the reference does and
    multiplied in fp32 (same error class as lathe.kernels.reference.linear_w4a16).
"""
from __future__ import annotations

import torch

from lathe import _ext
from lathe.errors import BadInput
from lathe.kernels.boundary import checked, linear_args, need

GROUP_SIZES = (32, 64, 128)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _C():
    return checked(_ext.require_cpu())


_need = need


def _check_group(group_size, fn):
    _need(isinstance(group_size, int) and group_size in GROUP_SIZES,
          f"{fn}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def int4_pack(qweight: torch.Tensor, scales: torch.Tensor, zeros, group_size: int, K: int = None):
    """Pack lathe-int4 weights for `int4_linear`.

    qweight uint8 [N, ceil(K/2)], scales [N, ceil(K/g)] (any float dtype; stored fp32),
    zeros uint8 [N, ceil(K/g)] or None (symmetric, zero 8). K defaults to 2 * qweight.shape[1].
    Returns {"codes": uint8, "scales": float32, "zeros": uint8} (1-D, layout in int4_gemm.h).
    """
    _check_group(group_size, "int4_pack")
    _need(isinstance(qweight, torch.Tensor) and qweight.dtype == torch.uint8,
          f"int4_pack: qweight must be a uint8 tensor, got {getattr(qweight, 'dtype', type(qweight))}")
    _need(qweight.dim() == 2, f"int4_pack: qweight must be 2-D [N, K/2], got shape {tuple(qweight.shape)}")
    N = qweight.shape[0]
    if K is None:
        K = 2 * qweight.shape[1]
    _need(N > 0 and K > 0, f"int4_pack: N and K must be positive, got N={N}, K={K}")
    _need(qweight.shape[1] == (K + 1) // 2,
          f"int4_pack: qweight has {qweight.shape[1]} bytes a row, K={K} needs {(K + 1) // 2}")
    G = -(-K // group_size)
    _need(isinstance(scales, torch.Tensor) and scales.is_floating_point(),
          f"int4_pack: scales must be a floating-point tensor, got {getattr(scales, 'dtype', type(scales))}")
    _need(tuple(scales.shape) == (N, G),
          f"int4_pack: scales must have shape [N, K/g] = {(N, G)}, got {tuple(scales.shape)}")
    if zeros is not None:
        _need(isinstance(zeros, torch.Tensor) and zeros.dtype == torch.uint8,
              f"int4_pack: zeros must be uint8 codes, got {getattr(zeros, 'dtype', type(zeros))}")
        _need(tuple(zeros.shape) == (N, G),
              f"int4_pack: zeros must have shape [N, K/g] = {(N, G)}, got {tuple(zeros.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None:
            _need(t.device.type == "cpu", f"int4_pack: {name} must be on the CPU, got {t.device}")
    C = _C()
    qweight = qweight.contiguous()
    scales = scales.to(torch.float32).contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    codes = torch.empty(C.int4_packed_code_bytes(N, K, group_size), dtype=torch.uint8)
    p_scales = torch.empty(C.int4_packed_scale_count(N, K, group_size), dtype=torch.float32)
    p_zeros = torch.empty(C.int4_packed_scale_count(N, K, group_size), dtype=torch.uint8)
    C.int4_pack(qweight.data_ptr(), qweight.shape[1], scales.data_ptr(), G,
                0 if zeros is None else zeros.data_ptr(), G, N, K, group_size,
                codes.data_ptr(), p_scales.data_ptr(), p_zeros.data_ptr())
    return {"codes": codes, "scales": p_scales, "zeros": p_zeros}


def _packed_sizes(N: int, K: int, g: int):
    """(code bytes, scale/zero count) of the packed layout (csrc/cpu/int4_gemm.h)."""
    cols = -(-N // 16) * 16
    groups = -(-K // g)
    return cols * groups * g // 2, cols * groups


def int4_linear(x: torch.Tensor, packed: dict, N: int, K: int, group_size: int, bias=None,
                exact: bool = False) -> torch.Tensor:
    """x [..., K] fp32/bf16 -> [..., N] in x's dtype: x @ W^T + bias with W from `int4_pack`.

    exact=False quantizes activations per (row, group) to int8 (VNNI route, see the module
    docstring); exact=True keeps them fp32.
    """
    # Checks raise with formatted messages only on failure: a decode-sized call is ~0.2 ms,
    # so the wrapper keeps to a few microseconds.
    if group_size not in GROUP_SIZES or not isinstance(group_size, int):
        raise BadInput(f"int4_linear: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if not isinstance(x, torch.Tensor):
        raise BadInput(f"int4_linear: x must be a tensor, got {type(x)}")
    dt = _DTYPES.get(x.dtype)
    if dt is None:
        raise BadInput(f"int4_linear: x must be float32 or bfloat16, got {x.dtype}")
    if not x.is_cpu:
        raise BadInput(f"int4_linear: x must be on the CPU, got {x.device}")
    if not (isinstance(N, int) and N > 0 and isinstance(K, int) and K > 0):
        raise BadInput(f"int4_linear: N and K must be positive ints, got N={N!r}, K={K!r}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise BadInput(f"int4_linear: x's last dimension must be K={K}, got shape {tuple(x.shape)}")
    try:
        codes, scales, zeros = packed["codes"], packed["scales"], packed["zeros"]
    except (TypeError, KeyError):
        raise BadInput("int4_linear: packed must be the dict int4_pack returns "
                         "(codes, scales, zeros)") from None
    nbytes, nscales = _packed_sizes(N, K, group_size)
    for name, t, dtype, n in (("codes", codes, torch.uint8, nbytes),
                              ("scales", scales, torch.float32, nscales),
                              ("zeros", zeros, torch.uint8, nscales)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != n:
            raise BadInput(
                f"int4_linear: packed[{name!r}] must be {dtype} with {n} elements for N={N}, "
                f"K={K}, g={group_size}; got {getattr(t, 'dtype', type(t))} with "
                f"{t.numel() if isinstance(t, torch.Tensor) else '?'} elements")
        if not t.is_contiguous():
            raise BadInput(f"int4_linear: packed[{name!r}] must be contiguous")
        if not t.is_cpu:
            raise BadInput(f"int4_linear: packed[{name!r}] must be on the CPU, got {t.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in (torch.float32, x.dtype):
            raise BadInput(f"int4_linear: bias must be float32 or {x.dtype}, "
                             f"got {getattr(bias, 'dtype', type(bias))}")
        if bias.shape != (N,):
            raise BadInput(f"int4_linear: bias must have shape [{N}], got {tuple(bias.shape)}")
        if not bias.is_cpu:
            raise BadInput(f"int4_linear: bias must be on the CPU, got {bias.device}")
    x2, M, ldx, bias, out = linear_args(x, K, N, bias)
    if M:
        _C().int4_linear(x2.data_ptr(), dt, M, K, ldx,
                         codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), N, group_size,
                         0 if bias is None else bias.data_ptr(), out.data_ptr(), N,
                         1 if exact else 0, torch.get_num_threads())
        if not exact:
            # The int8-activation route cannot hold +-Inf (its group scale turns the row NaN):
            # rows that came out NaN are redone on the exact fp32 route, which gives what the
            # reference gives (Inf, or NaN where Inf meets a zero weight or an opposite Inf).
            bad = torch.isnan(out).any(dim=1).nonzero().flatten()
            if bad.numel():
                xb = x2[bad].contiguous()
                ob = torch.empty(xb.shape[0], N, dtype=x.dtype)
                _C().int4_linear(xb.data_ptr(), dt, xb.shape[0], K, K, codes.data_ptr(), scales.data_ptr(),
                                 zeros.data_ptr(), N, group_size, 0 if bias is None else bias.data_ptr(),
                                 ob.data_ptr(), N, 1, torch.get_num_threads())
                out[bad] = ob
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)
