"""Thin wrappers over lathe._C's int8 convolutions (csrc/cpu/conv_int8.h): weight packing
and the call with pointers, shapes and strides. Threads follow torch.get_num_threads()."""
from __future__ import annotations

import torch

from lathe import _ext

ACTS = {"none": 0, "relu": 1, "relu6": 2}


def pack(w_q: torch.Tensor, depthwise: bool):
    """int8 OHWI weight [N, kh, kw, C] (depthwise: C = 1) -> (packed int8, wsum int32)."""
    C_ = _ext.require_cpu()
    w_q = w_q.contiguous()
    N, kh, kw, C = w_q.shape
    if depthwise:
        packed = torch.empty(C_.dwconv_int8_packed_bytes(N, kh, kw), dtype=torch.int8)
        wsum = torch.empty(-(-N // 64) * 64, dtype=torch.int32)
        C_.dwconv_int8_pack(w_q.data_ptr(), N, kh, kw, packed.data_ptr(), wsum.data_ptr())
    else:
        packed = torch.empty(C_.conv2d_int8_packed_bytes(N, kh, kw, C), dtype=torch.int8)
        wsum = torch.empty(C_.conv2d_int8_wsum_len(N), dtype=torch.int32)
        C_.conv2d_int8_pack(w_q.data_ptr(), N, kh, kw, C, packed.data_ptr(), wsum.data_ptr())
    return packed, wsum


def conv(x, C: int, x_scale: float, x_zp: int, w_shape, packed, wsum, w_scale, bias, geom,
         depthwise: bool, residual, res_scale: float, res_zp: int, act: str, out_scale: float,
         out_zp: int):
    """x u8 [B, H, W, ldc]; geom (stride, pad_t, pad_l, OH, OW). Returns u8 [B, OH, OW, N4]
    (out_scale > 0) or fp32 [B, OH, OW, N]."""
    C_ = _ext.require_cpu()
    B, H, W, ldc = x.shape
    N, kh, kw, _ = w_shape
    stride, pad_t, pad_l, OH, OW = geom
    if out_scale > 0:
        out = torch.empty(B, OH, OW, -(-N // 4) * 4, dtype=torch.uint8)
    else:
        out = torch.empty(B, OH, OW, N, dtype=torch.float32)
    C_.conv_int8(depthwise, x.data_ptr(), (B, H, W, C, ldc), float(x_scale), int(x_zp),
                 (kh, kw, stride, pad_t, pad_l, OH, OW), packed.data_ptr(), wsum.data_ptr(),
                 w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(), N,
                 0 if residual is None else residual.data_ptr(),
                 0 if residual is None else residual.shape[-1], float(res_scale), int(res_zp),
                 ACTS[act], out_scale > 0, float(out_scale) if out_scale > 0 else 1.0, int(out_zp),
                 out.data_ptr(), out.shape[-1], torch.get_num_threads())
    return out


def pack_f32(w: torch.Tensor):
    """fp32 OIHW weight [N, C, kh, kw] -> the fp32 first layer's layout (csrc/cpu/conv_f32_u8.h)."""
    C_ = _ext.require_cpu()
    w = w.float().contiguous()
    N, C, kh, kw = w.shape
    packed = torch.empty(C_.conv_f32_u8_packed_floats(N, C, kh, kw), dtype=torch.float32)
    C_.conv_f32_u8_pack(w.data_ptr(), N, C, kh, kw, packed.data_ptr())
    return packed


def conv_f32_u8(x, packed, bias, N: int, k: int, geom, act: str, out_scale: float, out_zp: int):
    """x fp32 NCHW contiguous; geom (stride, pad_t, pad_l, OH, OW) -> (u8 [B, OH, OW, N4] codes,
    bool [B]: the images whose outputs were not finite)."""
    C_ = _ext.require_cpu()
    B, C, H, W = x.shape
    stride, pad_t, pad_l, OH, OW = geom
    out = torch.empty(B, OH, OW, -(-N // 4) * 4, dtype=torch.uint8)
    bad = torch.empty(B, dtype=torch.uint8)
    C_.conv_f32_u8(x.data_ptr(), (B, C, H, W), (k, k, stride, pad_t, pad_l, OH, OW), packed.data_ptr(),
                   0 if bias is None else bias.data_ptr(), N, ACTS[act], float(out_scale), int(out_zp),
                   out.data_ptr(), out.shape[-1], bad.data_ptr(), torch.get_num_threads())
    return out, bad.bool()


def chain(in_channels: int, in_scale: float, in_zp: int, layers):
    """lathe._C.ConvChain over layers: dicts with depthwise, C, N, kh, kw, stride, pad (-1 same),
    packed, wsum, w_scale, bias (tensors; bias may be None), src, res, act, out_scale, out_zp,
    and fpacked (pack_f32's weights: an fp32 first layer on the images; else None).
    The caller keeps the tensors alive as long as the chain."""
    C_ = _ext.require_cpu()
    c = C_.ConvChain(int(in_channels), float(in_scale), int(in_zp))
    for d in layers:
        def p(t):
            return 0 if t is None else t.data_ptr()
        c.add(bool(d["depthwise"]), d["C"], d["N"], d["kh"], d["kw"], d["stride"], d["pad"],
              p(d["packed"]), p(d["wsum"]), p(d["w_scale"]), p(d["bias"]), d["src"], d["res"],
              ACTS[d["act"]], float(d["out_scale"]), int(d["out_zp"]), p(d.get("fpacked")))
    return c


def run_chain(c, x: torch.Tensor):
    """x: fp32 contiguous NCHW images, or u8 NHWC codes [B, H, W, C4] at the chain's input
    quantization -> (the last layer's NHWC output, bool [B]: images with NaN/Inf; all False for
    codes, whose caller knows its images')."""
    codes = x.dtype == torch.uint8
    B, H, W = (x.shape[0], *x.shape[1:3]) if codes else (x.shape[0], *x.shape[2:])
    OH, OW, ld, u8 = c.out_shape(H, W)
    out = torch.empty(B, OH, OW, ld, dtype=torch.uint8 if u8 else torch.float32)
    bad = torch.empty(B, dtype=torch.uint8)
    run = c.run_codes if codes else c.run
    run(x.data_ptr(), B, H, W, out.data_ptr(), bad.data_ptr(), torch.get_num_threads())
    return out, bad.bool()
