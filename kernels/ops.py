"""The lathe ops: `torch.ops.lathe.<name>`. Model code calls these and nothing else.

Each op is registered once as a torch.library custom op with a fake (meta) implementation, so
torch.compile and torch.export trace through it, and its body hands its arguments to the
dispatcher (`lathe.kernels.dispatch.call`). Below each op, its implementations register with
`@impl(op, backend, when=condition)`: the conditions are the only rules.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lathe.kernels import cpu, cpu_attention, cpu_int4, cpu_w8a16, reference
from lathe.errors import BadInput
from lathe.kernels.dispatch import call, impl

# ----------------------------------------------------------------------------- linear_w8a8


@torch.library.custom_op("lathe::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], act: str, smooth: Optional[torch.Tensor],
                asym: bool, w_packed: Optional[torch.Tensor], colsum: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8: per-token dynamic symmetric int8 activations x per-channel int8 weights.

    w_q int8 [N, K] is the canonical weight; w_packed/colsum are the CPU kernel's pre-packed
    copy (lathe.kernels.cpu.int8_pack), made once at load time; for the `torch` backend
    (GPU: torch._int_mm) w_packed is None and colsum holds w_q's row sums, int32 [N]. smooth
    [K] multiplies x before quantization (SmoothQuant's 1/s, fused into the quantization
    pass). asym picks per-token asymmetric u8 activations (zero point) over symmetric ones.
    """
    _check_w8a8(x, w_q, w_scale)
    return call("linear_w8a8", x.device, x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum)


@impl("linear_w8a8", "cpu")
def _w8a8_cpu(x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum):
    N = w_q.shape[0]
    if w_packed is None or colsum is None:
        w_packed, colsum = cpu.int8_pack(w_q)
    if x.dtype == torch.float32:
        return cpu.int8_linear(x, w_packed, colsum, w_scale, bias, N, act, smooth, asym)
    return cpu.int8_linear(x.float(), w_packed, colsum, w_scale, bias, N, act, smooth, asym).to(x.dtype)


def _int_mm_ok(x, w_q, *_):
    """cuBLASLt's int8 GEMM wants K and N multiples of 8 (other shapes: Triton or the reference)."""
    return not x.is_cuda or (w_q.shape[1] % 8 == 0 and w_q.shape[0] % 8 == 0)


def _w8a8_int_mm(x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum):
    from lathe.kernels import torch_mm
    if colsum is None:  # unprepared module: a pass over the weight (prepare() makes it once)
        colsum = w_q.sum(1, dtype=torch.int32)
    return torch_mm.linear_w8a8(x, w_q, w_scale, bias, act, smooth, asym, colsum)


impl("linear_w8a8", "torch", when=_int_mm_ok)(_w8a8_int_mm)
# asymmetric activations on the Triton backend: torch._int_mm (the Triton kernel is symmetric)
impl("linear_w8a8", "triton", when=lambda x, w_q, w_scale, bias, act, smooth, asym, *_:
     asym and _int_mm_ok(x, w_q))(_w8a8_int_mm)


@impl("linear_w8a8", "triton", when=lambda x, w_q, w_scale, bias, act, smooth, asym, *_: not asym)
def _w8a8_triton(x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum):
    from lathe.kernels.gpu import triton_linear_w8a8
    return triton_linear_w8a8(x, w_q, w_scale, bias, act, smooth)


@impl("linear_w8a8", "reference")
def _w8a8_reference(x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum):
    return reference.linear_w8a8(x, w_q, w_scale, bias, act, smooth, asym).to(x.dtype)


@impl("linear_w8a8", "triton")  # what the conditions above leave: the reference, said once
def _w8a8_triton_fallback(*args):
    from lathe.kernels.gpu import fallback
    fallback("linear_w8a8", "reference", "asymmetric activations (the Triton kernel is symmetric)")
    return _w8a8_reference(*args)


@linear_w8a8.register_fake
def _(x, w_q, w_scale, bias, act, smooth, asym, w_packed, colsum):
    _check_w8a8(x, w_q, w_scale)
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


# |u8 code| <= 255 times |s8 weight| <= 128, summed over K, must fit the int32 accumulator
W8A8_MAX_K = (2**31 - 1) // (255 * 128)


def _check_w8a8(x, w_q, w_scale):
    """Shapes and dtypes only (metadata: also runs on fake tensors while tracing)."""
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise BadInput(f"linear_w8a8: w_q must be int8 [N, K], got {w_q.dtype} {tuple(w_q.shape)}")
    N, K = w_q.shape
    if N == 0 or K == 0:
        raise BadInput(f"linear_w8a8: w_q has an empty dimension [N={N}, K={K}]")
    if x.dim() < 1 or x.shape[-1] != K:
        raise BadInput(f"linear_w8a8: x must be [..., K={K}] to match w_q, got {tuple(x.shape)}")
    if K > W8A8_MAX_K:
        raise BadInput(f"linear_w8a8: K={K} exceeds {W8A8_MAX_K}, beyond which the int32 accumulator "
                       "can overflow (255 x 128 x K > 2^31); split the layer along K")
    if tuple(w_scale.shape) != (N,):
        raise BadInput(f"linear_w8a8: w_scale must be [{N}], got {tuple(w_scale.shape)}")


# ----------------------------------------------------------------------------- linear_w4a16


@torch.library.custom_op("lathe::linear_w4a16", mutates_args=())
def linear_w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor],
                 p_codes: Optional[torch.Tensor] = None, p_scales: Optional[torch.Tensor] = None,
                 p_zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only int4 (lathe int4 format, see lathe.compress.formats.Int4Group). p_* are the
    CPU kernel's layout (lathe.kernels.cpu_int4.int4_pack), made once at load time."""
    return call("linear_w4a16", x.device, x, qweight, scales, zeros, group_size, bias, p_codes, p_scales, p_zeros)


def _cpu_float(x, *_):
    return x.dtype in (torch.float32, torch.bfloat16)


@impl("linear_w4a16", "cpu", when=_cpu_float)
def _w4a16_cpu(x, qweight, scales, zeros, group_size, bias, p_codes, p_scales, p_zeros):
    K = x.shape[-1]
    if p_codes is None:
        p = cpu_int4.int4_pack(qweight, scales, zeros, group_size, K)
    else:
        p = {"codes": p_codes, "scales": p_scales, "zeros": p_zeros}
    return cpu_int4.int4_linear(x, p, qweight.shape[0], K, group_size, bias)


# which GPU kernel (CUDA GEMV, Triton GEMV/GEMM, dequant + cuBLAS): lathe.kernels.gpu.kernel_for
@impl("linear_w4a16", "cuda")
def _w4a16_cuda(x, qweight, scales, zeros, group_size, bias, *_):
    from lathe.kernels import gpu
    return gpu.linear_w4a16("cuda", x, qweight, scales, zeros, group_size, bias)


@impl("linear_w4a16", "triton")
def _w4a16_triton(x, qweight, scales, zeros, group_size, bias, *_):
    from lathe.kernels import gpu
    return gpu.linear_w4a16("triton", x, qweight, scales, zeros, group_size, bias)


@impl("linear_w4a16", "reference")
def _w4a16_reference(x, qweight, scales, zeros, group_size, bias, *_):
    return reference.linear_w4a16(x, qweight, scales, zeros, group_size, bias)


@linear_w4a16.register_fake
def _(x, qweight, scales, zeros, group_size, bias, p_codes=None, p_scales=None, p_zeros=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ----------------------------------------------------------------------------- linear_w8a16


@torch.library.custom_op("lathe::linear_w8a16", mutates_args=())
def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor], group_size: int,
                 packed: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight-only int8 (lathe.compress.formats.Int8WeightOnly): y = x @ W^T + bias with
    W[n, k] = qweight[n, k] * scales[n, k // g]; qweight int8 [N, K], scales fp32 [N, G],
    group_size 0 = per channel (G = 1). x fp32/bf16/fp16, output in x's dtype. `packed` is the
    CPU kernel's layout (lathe.kernels.cpu_w8a16.w8a16_pack), made once at load time; None
    packs here (a full pass over the weight: callers on a hot path prepare it)."""
    _check_w8a16(x, qweight, scales, bias, group_size)
    return call("linear_w8a16", x.device, x, qweight, scales, bias, group_size, packed)


@impl("linear_w8a16", "cpu")
def _w8a16_cpu(x, qweight, scales, bias, group_size, packed):
    if packed is None:
        packed = cpu_w8a16.w8a16_pack(qweight, scales, group_size)
    return cpu_w8a16.w8a16_linear(x, packed, qweight.shape[0], group_size, bias)


@impl("linear_w8a16", "triton")
def _w8a16_triton(x, qweight, scales, bias, group_size, packed):
    from lathe.kernels.gpu import triton_linear_w8a16
    return triton_linear_w8a16(x, qweight, scales, bias, group_size)


@impl("linear_w8a16", "reference")
def _w8a16_reference(x, qweight, scales, bias, group_size, packed):
    return reference.linear_w8a16(x, qweight, scales, bias)


@linear_w8a16.register_fake
def _(x, qweight, scales, bias, group_size, packed):
    _check_w8a16(x, qweight, scales, bias, group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_w8a16(x, qweight, scales, bias, group_size):
    """Shapes and dtypes only (metadata: also runs on fake tensors while tracing)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise BadInput(f"linear_w8a16: qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    if x.dtype not in _FLOATS or x.dim() < 1 or x.shape[-1] != K:
        raise BadInput(f"linear_w8a16: x must be float32/bfloat16/float16 [..., K={K}], got "
                       f"{x.dtype} {tuple(x.shape)}")
    if group_size < 0 or (group_size and K % group_size):
        raise BadInput(f"linear_w8a16: group_size must be 0 (per channel) or divide K={K}, got {group_size}")
    G = K // group_size if group_size else 1
    if not scales.is_floating_point() or tuple(scales.shape) != (N, G):
        raise BadInput(f"linear_w8a16: scales must be float [N, G] = [{N}, {G}], got "
                       f"{scales.dtype} {tuple(scales.shape)}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (N,)):
        raise BadInput(f"linear_w8a16: bias must be float [{N}], got {bias.dtype} {tuple(bias.shape)}")


# ----------------------------------------------------------------------------- linear_fp8


@torch.library.custom_op("lathe::linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], act_granularity: str) -> torch.Tensor:
    """FP8 E4M3 W8A8 (lathe.compress.formats.FP8E4M3): x is quantized at run time to
    float8_e4m3fn, scale amax/448 per token or per tensor (act_granularity), then multiplied
    with w_fp8 float8_e4m3fn [N, K] and scaled by w_scale fp32 [N] or [1], + bias.

    CUDA on sm_89+ (Ada, Hopper): the Triton FP8 matmul (fp8 x fp8, fp32 accumulation). CPU
    and older GPUs: the reference, which simulates it in fp32 (CPUs have no FP8 units: this
    shows FP8's accuracy, not its speed)."""
    _check_fp8(x, w_fp8, w_scale, bias, act_granularity)
    return call("linear_fp8", x.device, x, w_fp8, w_scale, bias, act_granularity)


def _scaled_mm_ok(x, w_fp8, w_scale, bias, act_granularity):
    """torch._scaled_mm takes this case (cuBLASLt's FP8 GEMM wants K and N multiples of 16)."""
    return (not x.is_cuda or (w_fp8.shape[0] % 16 == 0 and w_fp8.shape[1] % 16 == 0)) \
        and _fp8_gemm(x.device, x.dtype, act_granularity == "per_token" or w_scale.numel() != 1)


@impl("linear_fp8", "torch", when=_scaled_mm_ok)
def _fp8_torch(x, w_fp8, w_scale, bias, act_granularity):
    from lathe.kernels import torch_mm
    return torch_mm.linear_fp8(x, w_fp8, w_scale, bias, act_granularity)


@impl("linear_fp8", "torch", when=lambda x, *_: _fp8_units(x.device))
@impl("linear_fp8", "triton", when=lambda x, *_: _fp8_units(x.device))  # FP8 units: sm_89+
def _fp8_triton(x, w_fp8, w_scale, bias, act_granularity):
    from lathe.kernels.gpu import triton_linear_fp8
    return triton_linear_fp8(x, w_fp8, w_scale, bias, act_granularity)


@impl("linear_fp8", "reference")
def _fp8_reference(x, w_fp8, w_scale, bias, act_granularity):
    return reference.linear_fp8(x, w_fp8, w_scale, bias, act_granularity)


@impl("linear_fp8", "triton")  # no FP8 units: the reference, said once
def _fp8_triton_fallback(*args):
    from lathe.kernels.gpu import fallback
    fallback("linear_fp8", "reference", "FP8 needs an sm_89+ GPU")
    return _fp8_reference(*args)


@linear_fp8.register_fake
def _(x, w_fp8, w_scale, bias, act_granularity):
    _check_fp8(x, w_fp8, w_scale, bias, act_granularity)
    return x.new_empty(*x.shape[:-1], w_fp8.shape[0])


_FP8_UNITS: dict = {}


def _fp8_units(device) -> bool:
    """sm_89+ (Ada, Hopper); asked once a device, not on every call."""
    hit = _FP8_UNITS.get(device)
    if hit is None:
        hit = _FP8_UNITS[device] = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    return hit


def _fp8_gemm(device, dtype, rowwise: bool) -> bool:
    """torch._scaled_mm takes this case: FP8 units (or the CPU) and the scaling / output dtype."""
    from lathe.kernels.torch_mm import fp8_runs
    return (device.type == "cpu" or _fp8_units(device)) and fp8_runs(device, dtype, rowwise)


def _check_fp8(x, w_fp8, w_scale, bias, act_granularity):
    if w_fp8.dtype != torch.float8_e4m3fn or w_fp8.dim() != 2:
        raise BadInput(f"linear_fp8: w_fp8 must be float8_e4m3fn [N, K], got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    N, K = w_fp8.shape
    if x.dtype not in _FLOATS or x.dim() < 1 or x.shape[-1] != K:
        raise BadInput(f"linear_fp8: x must be float32/bfloat16/float16 [..., K={K}], got {x.dtype} {tuple(x.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.numel() not in (1, N) or w_scale.dim() != 1:
        raise BadInput(f"linear_fp8: w_scale must be float32 [{N}] or [1], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (N,)):
        raise BadInput(f"linear_fp8: bias must be float [{N}], got {bias.dtype} {tuple(bias.shape)}")
    if act_granularity not in ("per_token", "per_tensor"):
        raise BadInput(f"linear_fp8: act_granularity must be per_token or per_tensor, got {act_granularity!r}")


# ----------------------------------------------------------------------------- attention


@torch.library.custom_op("lathe::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], causal: bool,
              scale: Optional[float]) -> torch.Tensor:
    """Softmax attention. q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D]; key_padding_mask bool [B, Sk]
    (True = real key). Rows with no real key give zeros; a NaN among a row's visible inputs,
    or a score that overflows, gives NaN in that row (never zeros)."""
    return call("attention", q.device, q, k, v, key_padding_mask, causal, scale)


@impl("attention", "triton")
def _attention_triton(q, k, v, key_padding_mask, causal, scale):
    from lathe.kernels.gpu import triton_attention
    return triton_attention(q, k, v, key_padding_mask, causal, scale).contiguous()


@impl("attention", "cpu", when=_cpu_float)
def _attention_cpu(q, k, v, key_padding_mask, causal, scale):
    return cpu_attention.attention(q, k, v, key_padding_mask, causal, scale)


@impl("attention", "sdpa")
def _attention_sdpa(q, k, v, key_padding_mask, causal, scale):
    return _sdpa(q, k, v, key_padding_mask, causal, scale).contiguous()


@impl("attention", "reference")
def _attention_reference(q, k, v, key_padding_mask, causal, scale):
    return reference.attention(q, k, v, causal, key_padding_mask, scale).contiguous()


@attention.register_fake
def _(q, k, v, key_padding_mask, causal, scale):
    # Every backend returns a new contiguous tensor, whatever the strides of q (the
    # compiler checks the real strides against these).
    return q.new_empty(q.shape)


def _sdpa(q, k, v, key_padding_mask, causal, scale):
    mask = None
    Sq, Sk = q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].bool()
        if causal:
            mask = mask & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    elif causal and Sq != Sk:
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    if key_padding_mask is not None:
        empty = ~key_padding_mask.bool().any(dim=-1)
        # no `if empty.any()`: a host sync, which a CUDA graph cannot capture
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out
