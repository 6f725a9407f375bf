"""QConv2dInt8: an nn.Conv2d (+ folded BatchNorm, + fused ReLU/ReLU6) on lathe's int8 conv
kernel (torch.ops.lathe.conv2d_int8). Self-contained: `from_float(conv, ...)` builds it from
any nn.Conv2d, so model adapters and the generic transformers path can swap it in.

Activations between two quantized convolutions stay int8: the module returns a QAct (u8 NHWC
codes + scale + zero point) when it has output quantization parameters, and accepts a QAct or
an fp32 NCHW tensor (quantized on entry with the calibrated input parameters)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import lathe.kernels  # noqa: F401
from lathe.compress.formats import check_finite
from lathe.compress.modules import register_module
from lathe.errors import BadInput


@dataclass
class QAct:
    """u8 NHWC activation codes [B, H, W, ldc] (ldc = C rounded up to 4); real = (q - zp) * scale.
    bad: bool [B], the images that held NaN/Inf (their outputs become NaN)."""

    q: torch.Tensor
    C: int
    scale: float
    zp: int
    bad: torch.Tensor | None = None

    @property
    def shape(self):
        B, H, W, _ = self.q.shape
        return (B, self.C, H, W)

    def dequantize(self) -> torch.Tensor:
        """fp32 NCHW (channels_last memory)."""
        return ((self.q[..., :self.C].float() - self.zp) * self.scale).permute(0, 3, 1, 2)


def affine_params(lo: float, hi: float) -> tuple[float, int]:
    """u8 (scale, zero point) covering [min(lo, 0), max(hi, 0)]: 0 is exact, ReLU outputs get zp 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(min(255, max(0, round(-lo / scale))))


def quantize_input(x: torch.Tensor, scale: float, zp: int) -> QAct:
    """fp32 NCHW -> QAct with the static (scale, zp); channels padded to a multiple of 4. One
    pass in C++ where the extension is built (the PyTorch fallback makes several)."""
    from lathe import _ext

    B, C, H, W = x.shape
    bad = ~torch.isfinite(x.sum((1, 2, 3)))  # a NaN/Inf anywhere makes the image's sum non-finite
    C4 = -(-C // 4) * 4
    ext = _ext.cpu()
    if ext is not None and x.device.type == "cpu":
        x = x.float().contiguous()
        out = torch.empty(B, H, W, C4, dtype=torch.uint8)
        ext.quantize_nchw_u8(x.data_ptr(), B, C, H, W, float(scale), int(zp), out.data_ptr(), C4,
                             torch.get_num_threads())
    else:
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0) if bad.any() else x.float()
        q = (torch.round(x * (1.0 / scale)) + zp).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out = torch.full((B, H, W, C4), zp, dtype=torch.uint8)
        out[..., :C] = q
    return QAct(out, C, scale, zp, bad if bad.any() else None)


# Set by lathe.export.vision while it writes an ONNX graph: forward then emits nodes.
GRAPH_HOOK = None


class ChainUnit:
    """What every conv unit of lathe's int8 conv chain (lathe.kernels.conv_chain) shares; the
    unit has kernel_size, stride and padding."""

    def chain_ready(self) -> bool:
        """False while an ONNX export traces the units one by one."""
        return GRAPH_HOOK is None

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        from lathe.models.convnet import conv_geometry
        return conv_geometry(h, w, self.kernel_size, self.stride, self.padding)[2:]


class QConv2dInt8(ChainUnit, nn.Module):
    """Buffers: weight int8 OHWI [N, kh, kw, C/groups], weight_scale fp32 [N] (symmetric per
    output channel), bias fp32 [N] (conv bias + folded BatchNorm). Constructor args carry the
    geometry and the static activation quantization (in, out; out_scale 0 = fp32 output)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding="same", groups: int = 1, act: str = "none", in_scale: float = 1.0,
                 in_zp: int = 0, out_scale: float = 0.0, out_zp: int = 0, res_scale: float = 1.0,
                 res_zp: int = 0, device=None):
        super().__init__()
        if groups != 1 and not groups == in_channels == out_channels:
            raise BadInput(f"grouped convolution (groups={groups}, {in_channels} -> {out_channels} "
                           "channels) is not supported by lathe's int8 conv kernel: only groups=1 "
                           "(dense) or depthwise (groups = in = out channels)")
        if kernel_size > 8:
            raise BadInput(f"kernel size {kernel_size} is larger than the int8 conv kernel's 8")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.groups, self.act = stride, padding, groups, act
        self.in_scale, self.in_zp, self.out_scale, self.out_zp = in_scale, in_zp, out_scale, out_zp
        self.res_scale, self.res_zp = res_scale, res_zp
        self.depthwise = groups != 1
        cin = 1 if self.depthwise else in_channels
        self.register_buffer("weight", torch.zeros(out_channels, kernel_size, kernel_size, cin,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device))
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_wsum", None, persistent=False)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str = "none",
                   in_qparams=(1.0, 0), out_qparams=None, res_qparams=(1.0, 0), padding=None,
                   name: str = "conv"):
        """conv (+ bn folded) -> int8. in/out/res_qparams: (scale, zp) of the u8 input, output
        (None: fp32 output) and residual. padding: "same" (TF) or an int (default conv.padding)."""
        kh, kw = conv.kernel_size
        if kh != kw or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1]:
            raise BadInput(f"{name}: lathe's int8 conv takes square kernels, equal strides and no "
                           f"dilation, got kernel {conv.kernel_size}, stride {conv.stride}, dilation {conv.dilation}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1]:
            if padding is None:
                raise BadInput(f"{name}: padding {conv.padding!r} ({conv.padding_mode}) is not supported")
        pad = padding if padding is not None else conv.padding[0]
        w = conv.weight.detach().float()
        b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
        if bn is not None:  # fold: w' = w * g / sqrt(v + eps), b' = (b - mu) * g / sqrt(v + eps) + beta
            k = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
            w = w * k[:, None, None, None]
            b = (b - bn.running_mean.float()) * k + bn.bias.detach().float()
        check_finite(f"weight of {name}", w)
        check_finite(f"bias of {name}", b)
        amax = w.abs().amax((1, 2, 3))
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(w / scale[:, None, None, None]), -127, 127).to(torch.int8)
        out_scale, out_zp = out_qparams if out_qparams is not None else (0.0, 0)
        m = cls(conv.in_channels, conv.out_channels, kh, conv.stride[0], pad, conv.groups, act,
                float(in_qparams[0]), int(in_qparams[1]), float(out_scale), int(out_zp),
                float(res_qparams[0]), int(res_qparams[1]))
        m.weight.copy_(q.permute(0, 2, 3, 1))
        m.weight_scale.copy_(scale)
        m.bias.copy_(b)
        return m.prepare()

    def prepare(self, dtype=None):
        """Pack the weight for the CPU kernel (once, at load time). dtype (lathe.load's activation
        dtype) changes nothing here: the int8 conv keeps its scales and bias in fp32."""
        from lathe.kernels.dispatch import backend_for
        if self.weight.device.type == "cpu" and backend_for("conv2d_int8", "cpu") == "cpu":
            from lathe.kernels import cpu_conv
            self._packed, self._wsum = cpu_conv.pack(self.weight, self.depthwise)
        else:
            self._packed = self._wsum = None
        return self

    def manifest_args(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "groups": self.groups, "act": self.act, "in_scale": self.in_scale, "in_zp": self.in_zp,
                "out_scale": self.out_scale, "out_zp": self.out_zp, "res_scale": self.res_scale,
                "res_zp": self.res_zp}

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [N, C/groups, k, k] (BN folded), for export and tests."""
        return (self.weight.float() * self.weight_scale[:, None, None, None]).permute(0, 3, 1, 2)

    def forward(self, x, residual=None):
        from lathe.models.convnet import conv_geometry

        if GRAPH_HOOK is not None:
            return GRAPH_HOOK(self, x, residual)
        if isinstance(x, torch.Tensor):
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise BadInput(f"int8 conv expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
            x = quantize_input(x, self.in_scale, self.in_zp)
        if x.C != self.in_channels:
            raise BadInput(f"int8 conv expects {self.in_channels} channels, got {x.C}")
        if residual is not None and not isinstance(residual, QAct):
            raise BadInput("int8 conv: the residual must be an int8 activation (QAct)")
        B, H, W, _ = x.q.shape
        pt, pl, OH, OW = conv_geometry(H, W, self.kernel_size, self.stride, self.padding)
        y = torch.ops.lathe.conv2d_int8(
            x.q, self.in_channels, x.scale, x.zp, self.weight, self.weight_scale, self.bias,
            self.depthwise, self.stride, pt, pl, OH, OW, None if residual is None else residual.q,
            self.res_scale if residual is None else residual.scale,
            self.res_zp if residual is None else residual.zp, self.act, self.out_scale, self.out_zp,
            self._packed, self._wsum)
        bad = x.bad
        if self.out_scale > 0:
            return QAct(y, self.out_channels, self.out_scale, self.out_zp, bad)
        y = y.permute(0, 3, 1, 2)  # NCHW view of the NHWC result (channels_last memory)
        if bad is not None:
            y = y.masked_fill(bad[:, None, None, None], float("nan"))
        return y

    # lathe.kernels.conv_chain runs a model's units in one op through these three
    def chain_layer(self) -> dict | None:
        """This unit as a layer of lathe's int8 conv chain; None while an ONNX export traces."""
        if not self.chain_ready():
            return None
        if self._packed is None or self._wsum is None:
            from lathe.kernels import cpu_conv
            self._packed, self._wsum = cpu_conv.pack(self.weight, self.depthwise)
        return {"depthwise": self.depthwise, "C": self.in_channels, "N": self.out_channels,
                "k": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "packed": self._packed, "wsum": self._wsum, "w_scale": self.weight_scale, "bias": self.bias,
                "act": self.act, "in_scale": self.in_scale, "in_zp": self.in_zp, "out_scale": self.out_scale,
                "out_zp": self.out_zp, "out_hw": self._out_hw}

    def wrap_output(self, y: torch.Tensor, bad: torch.Tensor | None):
        """The chain's NHWC result as this unit's forward returns it."""
        if self.out_scale > 0:
            return QAct(y, self.out_channels, self.out_scale, self.out_zp, bad)
        y = y.permute(0, 3, 1, 2)  # NCHW view of the NHWC result (channels_last memory)
        return y if bad is None else y.masked_fill(bad[:, None, None, None], float("nan"))

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"groups={self.groups}, act={self.act}, out={'u8' if self.out_scale > 0 else 'fp32'}")


register_module(QConv2dInt8)

