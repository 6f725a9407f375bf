"""`torch.ops.lathe.conv2d_int8`: int8 convolution on NHWC u8 activations with static
per-tensor (scale, zero point) quantization, symmetric per-output-channel int8 weights (OHWI),
fp32 bias (BatchNorm folded in by the caller), an optional u8 residual added before the
activation (none / relu / relu6), and an fp32 or requantized u8 output (the bias joins the
integer sum as int32 there, as in ONNX's QLinearConv; see csrc/cpu/conv_int8.h). groups is 1 (dense,
an implicit GEMM on the CPU) or the channel count (depthwise); nothing in between.

The PyTorch reference does the integer sum exactly (fp64 convolution of integers) and the
fp32 epilogue in the kernel's order, so the C++ paths match it code for code."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lathe.errors import BadInput
from lathe.kernels.dispatch import backend_for


def _check(x, C, w_q, w_scale, bias, depthwise, residual, stride, pad_t, pad_l, OH, OW):
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] < C or x.shape[-1] % 4:
        raise BadInput(f"conv2d_int8: x must be uint8 NHWC [B, H, W, ldc] with ldc >= C={C} and a "
                       f"multiple of 4, got {x.dtype} {tuple(x.shape)}")
    if w_q.dtype != torch.int8 or w_q.dim() != 4:
        raise BadInput(f"conv2d_int8: weight must be int8 OHWI [N, kh, kw, C], got {w_q.dtype} {tuple(w_q.shape)}")
    N, kh, kw, Cw = w_q.shape
    if depthwise and (Cw != 1 or N != C):
        raise BadInput(f"conv2d_int8: a depthwise weight is [C={C}, kh, kw, 1], got {tuple(w_q.shape)}")
    if not depthwise and Cw != C:
        raise BadInput(f"conv2d_int8: weight has {Cw} input channels, x has {C}")
    if kh * kw > 64:
        raise BadInput(f"conv2d_int8: kernel {kh}x{kw} is larger than 8x8")
    if w_scale.dtype != torch.float32 or w_scale.shape != (N,) or (bias is not None and (
            bias.dtype != torch.float32 or bias.shape != (N,))):
        raise BadInput(f"conv2d_int8: w_scale and bias must be float32 [{N}]")
    if stride < 1 or pad_t < 0 or pad_l < 0 or OH < 1 or OW < 1:
        raise BadInput(f"conv2d_int8: bad geometry stride={stride} pad=({pad_t}, {pad_l}) out={OH}x{OW}")
    if (OH - 1) * stride - pad_t + kh < 1 or (OW - 1) * stride - pad_l + kw < 1:
        raise BadInput("conv2d_int8: the output reaches past the input")
    if residual is not None:
        if depthwise:
            raise BadInput("conv2d_int8: a depthwise convolution takes no residual")
        if residual.dtype != torch.uint8 or tuple(residual.shape[:3]) != (x.shape[0], OH, OW) \
                or residual.shape[-1] < N:
            raise BadInput(f"conv2d_int8: residual must be uint8 [B, {OH}, {OW}, >= {N}], got "
                           f"{residual.dtype} {tuple(residual.shape)}")


@torch.library.custom_op("lathe::conv2d_int8", mutates_args=())
def conv2d_int8(x: torch.Tensor, C: int, x_scale: float, x_zp: int, w_q: torch.Tensor,
                w_scale: torch.Tensor, bias: Optional[torch.Tensor], depthwise: bool, stride: int,
                pad_t: int, pad_l: int, OH: int, OW: int, residual: Optional[torch.Tensor],
                res_scale: float, res_zp: int, act: str, out_scale: float, out_zp: int,
                packed: Optional[torch.Tensor], wsum: Optional[torch.Tensor]) -> torch.Tensor:
    """out_scale > 0: u8 [B, OH, OW, N rounded up to 4] codes; otherwise fp32 [B, OH, OW, N].
    packed/wsum: the CPU kernel's weight layout (lathe.kernels.cpu_conv.pack), made once."""
    _check(x, C, w_q, w_scale, bias, depthwise, residual, stride, pad_t, pad_l, OH, OW)
    if act not in ("none", "relu", "relu6"):
        raise BadInput(f"conv2d_int8: act must be none, relu or relu6, got {act!r}")
    if backend_for("conv2d_int8", x.device) == "cpu":
        from lathe.kernels import cpu_conv
        if packed is None or wsum is None:
            packed, wsum = cpu_conv.pack(w_q, depthwise)
        return cpu_conv.conv(x.contiguous(), C, x_scale, x_zp, tuple(w_q.shape), packed, wsum,
                             w_scale.contiguous(), None if bias is None else bias.contiguous(),
                             (stride, pad_t, pad_l, OH, OW), depthwise,
                             None if residual is None else residual.contiguous(), res_scale, res_zp,
                             act, out_scale, out_zp)
    return reference(x, C, x_scale, x_zp, w_q, w_scale, bias, depthwise, stride, pad_t, pad_l, OH, OW,
                     residual, res_scale, res_zp, act, out_scale, out_zp)


@conv2d_int8.register_fake
def _(x, C, x_scale, x_zp, w_q, w_scale, bias, depthwise, stride, pad_t, pad_l, OH, OW, residual,
      res_scale, res_zp, act, out_scale, out_zp, packed, wsum):
    N = w_q.shape[0]
    if out_scale > 0:
        return x.new_empty(x.shape[0], OH, OW, -(-N // 4) * 4)
    return x.new_empty(x.shape[0], OH, OW, N, dtype=torch.float32)


def int_sum(x, C, x_zp, w_q, depthwise, stride, pad_t, pad_l, OH, OW) -> torch.Tensor:
    """sum (q - zp) * w exactly (fp64 holds these integers), NHWC [B, OH, OW, N]."""
    N, kh, kw, _ = w_q.shape
    xi = (x[..., :C].double() - x_zp).permute(0, 3, 1, 2)
    H, W = xi.shape[-2:]
    pb = max((OH - 1) * stride + kh - H - pad_t, 0)
    pr = max((OW - 1) * stride + kw - W - pad_l, 0)
    xi = F.pad(xi, (pad_l, pr, pad_t, pb))  # real zero in the padding
    acc = F.conv2d(xi, w_q.double().permute(0, 3, 1, 2), stride=stride, groups=C if depthwise else 1)
    return acc[:, :, :OH, :OW].permute(0, 2, 3, 1)


def epilogue(acc, x_scale, w_scale, bias, residual, res_scale, res_zp, act, out_scale, out_zp, N):
    """The kernel's fp32 epilogue, in its order of operations. acc: the exact integer sum (fp64).
    u8 out: the bias joins the integer sum as round(bias / s) (ONNX QLinearConv's int32 bias),
    one fp32 multiplier s / out_scale per channel, the activation folded into the u8 clamp."""
    f32 = torch.float32
    s = torch.tensor(x_scale, dtype=f32) * w_scale
    b = bias if bias is not None else torch.zeros_like(w_scale)
    r = None if residual is None else residual[..., :N].float() - float(res_zp)
    if out_scale <= 0:
        y = acc.float() * s + b
        if r is not None:
            y = y + r * torch.tensor(res_scale, dtype=f32)
        if act in ("relu", "relu6"):
            y = y.clamp_min(0)
        if act == "relu6":
            y = y.clamp_max(6)
        return y.contiguous()
    inv = 1.0 / torch.tensor(out_scale, dtype=f32)
    bq = torch.round(b.double() / s.double()).clamp(-2.0 ** 30, 2.0 ** 30)
    t = (acc + bq).float() * (s * inv)
    if r is not None:
        t = t + r * (torch.tensor(res_scale, dtype=f32) * inv)
    q = (torch.round(t) + out_zp).clamp(*u8_act_bounds(act, inv, out_zp)).to(torch.uint8)
    N4 = -(-N // 4) * 4
    return F.pad(q, (0, N4 - N)).contiguous() if N4 != N else q.contiguous()


def u8_act_bounds(act, inv, out_zp) -> tuple[float, float]:
    """The u8 clamp (lo, hi) with the activation folded in, as csrc/cpu/conv_int8.h's
    u8_act_bounds (inv: fp32 1 / out_scale)."""
    lo = out_zp if act in ("relu", "relu6") else 0
    hi = min(255.0, out_zp + torch.round(6 * inv).item()) if act == "relu6" else 255
    return lo, max(lo, hi)


def reference(x, C, x_scale, x_zp, w_q, w_scale, bias, depthwise, stride, pad_t, pad_l, OH, OW,
              residual, res_scale, res_zp, act, out_scale, out_zp):
    acc = int_sum(x, C, x_zp, w_q, depthwise, stride, pad_t, pad_l, OH, OW)
    return epilogue(acc, x_scale, w_scale, bias, residual, res_scale, res_zp, act, out_scale, out_zp,
                    w_q.shape[0])



# ----------------------------------------------------------------------------- fp32 first layer

@torch.library.custom_op("lathe::conv2d_f32_u8", mutates_args=())
def conv2d_f32_u8(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], stride: int, pad_t: int,
                  pad_l: int, OH: int, OW: int, act: str, out_scale: float, out_zp: int,
                  packed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense fp32 convolution on fp32 NCHW images writing u8 NHWC codes [B, OH, OW, N rounded up
    to 4] at (out_scale, out_zp), the activation folded into the clamp; and bool [B], the images
    whose outputs were not finite. The first layer of an int8 network kept in fp32
    (csrc/cpu/conv_f32_u8.h); packed: lathe.kernels.cpu_conv.pack_f32(w), made once."""
    _check_f32(x, w, bias, stride, pad_t, pad_l, OH, OW, act, out_scale, out_zp)
    if backend_for("conv2d_int8", x.device) == "cpu":
        from lathe.kernels import cpu_conv
        if packed is None:
            packed = cpu_conv.pack_f32(w)
        return cpu_conv.conv_f32_u8(x.float().contiguous(), packed, None if bias is None else bias.contiguous(),
                                    w.shape[0], w.shape[-1], (stride, pad_t, pad_l, OH, OW), act, out_scale, out_zp)
    return f32_u8_reference(x, w, bias, stride, pad_t, pad_l, OH, OW, act, out_scale, out_zp)


@conv2d_f32_u8.register_fake
def _(x, w, bias, stride, pad_t, pad_l, OH, OW, act, out_scale, out_zp, packed):
    N4 = -(-w.shape[0] // 4) * 4
    return (x.new_empty(x.shape[0], OH, OW, N4, dtype=torch.uint8), x.new_empty(x.shape[0], dtype=torch.bool))


def _check_f32(x, w, bias, stride, pad_t, pad_l, OH, OW, act, out_scale, out_zp):
    if x.dim() != 4 or not x.dtype.is_floating_point:
        raise BadInput(f"conv2d_f32_u8: x must be float NCHW [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if w.dim() != 4 or w.dtype != torch.float32 or w.shape[1] != x.shape[1] or w.shape[2] != w.shape[3]:
        raise BadInput(f"conv2d_f32_u8: weight must be float32 [N, {x.shape[1]}, k, k], got {w.dtype} "
                       f"{tuple(w.shape)}")
    if w.shape[-1] > 8 or w.shape[0] > 4096:
        raise BadInput(f"conv2d_f32_u8: kernel {w.shape[-1]} > 8 or {w.shape[0]} > 4096 outputs")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (w.shape[0],)):
        raise BadInput(f"conv2d_f32_u8: bias must be float32 [{w.shape[0]}]")
    if stride < 1 or pad_t < 0 or pad_l < 0 or OH < 1 or OW < 1:
        raise BadInput(f"conv2d_f32_u8: bad geometry stride={stride} pad=({pad_t}, {pad_l}) out={OH}x{OW}")
    if act not in ("none", "relu", "relu6"):
        raise BadInput(f"conv2d_f32_u8: act must be none, relu or relu6, got {act!r}")
    if not out_scale > 0 or not 0 <= out_zp <= 255:
        raise BadInput(f"conv2d_f32_u8: bad output quantization scale={out_scale} zp={out_zp}")


def f32_u8_reference(x, w, bias, stride, pad_t, pad_l, OH, OW, act, out_scale, out_zp):
    """The kernel's operations in its order: y = bias, then y = y + x * w tap by tap (c, ky, kx),
    each an fp32 multiply and an fp32 add (a tap in the zero padding adds an exact zero), then
    the codes as conv_f32_u8.h writes them."""
    f32 = torch.float32
    x = x.to(f32)
    B, C, H, W = x.shape
    N, _, kh, kw = w.shape
    pb = max((OH - 1) * stride + kh - H - pad_t, 0)
    pr = max((OW - 1) * stride + kw - W - pad_l, 0)
    xp = F.pad(x, (pad_l, pr, pad_t, pb))
    y = (bias if bias is not None else torch.zeros(N, dtype=f32, device=x.device)).view(1, N, 1, 1)
    y = y.expand(B, N, OH, OW).clone()
    for c in range(C):
        for ky in range(kh):
            for kx in range(kw):
                xs = xp[:, c, ky:ky + (OH - 1) * stride + 1:stride, kx:kx + (OW - 1) * stride + 1:stride]
                y = y + xs[:, None] * w[:, c, ky, kx].view(1, N, 1, 1)
    bad = ~torch.isfinite(y).flatten(1).all(1)
    inv = 1.0 / torch.tensor(out_scale, dtype=f32)
    t = y * inv
    big = 1048576.0
    t = torch.where(torch.isnan(t), torch.tensor(-big, dtype=f32), t.clamp(-big, big))
    q = (torch.round(t) + out_zp).clamp(*u8_act_bounds(act, inv, out_zp)).to(torch.uint8).permute(0, 2, 3, 1)
    N4 = -(-N // 4) * 4
    if N4 != N:
        q = torch.cat([q, q.new_full((*q.shape[:3], N4 - N), out_zp)], -1)
    return q.contiguous(), bad
