"""FloatConvAct: a conv unit the int8 recipe keeps in fp32 (the one reading the image, see
lathe.compress.conv_quant's float_first), lean: BatchNorm folded into the weight and bias, the
activation applied in place, channels_last so the output is already NHWC, and, when its
consumers are int8 units, the output quantized straight to the u8 NHWC codes they read (a
QAct), so the next unit quantizes nothing: then it runs on torch.ops.lathe.conv2d_f32_u8 (fp32
images in, codes out, csrc/cpu/conv_f32_u8.h) and joins lathe's int8 conv chain as its first layer."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.compress.modules import register_module
from lathe.compress.qconv import ChainUnit, QAct
from lathe.errors import BadInput


class FloatConvAct(ChainUnit, nn.Module):
    """Buffers: weight fp32 [N, C/groups, k, k] and bias [N] (BN folded). out_scale 0: fp32
    NCHW output (channels_last memory); > 0: QAct with (out_scale, out_zp)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding="same", groups: int = 1, act: str = "none", out_scale: float = 0.0, out_zp: int = 0):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.groups, self.act = stride, padding, groups, act
        self.out_scale, self.out_zp = out_scale, out_zp
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(out_channels))
        self.register_buffer("_packed", None, persistent=False)  # the CPU kernel's layout, made once

    @classmethod
    def from_unit(cls, unit, out_qparams=None):
        """unit: a ConvBNAct (conv + BN + act, lathe.models.convnet)."""
        from lathe.compress.conv_quant import fold_bn

        c = unit.conv
        out_scale, out_zp = out_qparams if out_qparams is not None else (0.0, 0)
        m = cls(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], unit.padding, c.groups, unit.act,
                float(out_scale), int(out_zp))
        w, b = fold_bn(c, unit.bn)
        m.weight.copy_(w)
        m.bias.copy_(b)
        return m

    def manifest_args(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "groups": self.groups, "act": self.act, "out_scale": self.out_scale, "out_zp": self.out_zp}

    def prepare(self, dtype=None):
        return self

    def forward(self, x, residual=None):
        from lathe.compress import qconv
        from lathe.models.convnet import conv_geometry

        if qconv.GRAPH_HOOK is not None:  # an ONNX export is tracing: lathe.export.vision
            return qconv.GRAPH_HOOK(self, x, residual)
        if residual is not None:
            raise BadInput("FloatConvAct takes no residual")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BadInput(f"fp32 conv expects [B, {self.in_channels}, H, W], got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        H, W = x.shape[-2:]
        k, s = self.kernel_size, self.stride
        pt, pl, oh, ow = conv_geometry(H, W, k, s, self.padding)
        if self._codes_op() and x.device.type == "cpu":  # lathe's fp32-in, u8-out kernel (or its reference)
            q, bad = torch.ops.lathe.conv2d_f32_u8(x, self.weight, self.bias, s, pt, pl, oh, ow, self.act,
                                                    self.out_scale, self.out_zp, self._cpu_packed(x))
            return QAct(q, self.out_channels, self.out_scale, self.out_zp, bad if bad.any() else None)
        pb, pr = (oh - 1) * s + k - H - pt, (ow - 1) * s + k - W - pl
        x = x.float().contiguous(memory_format=torch.channels_last)
        if pt or pl or pb > 0 or pr > 0:
            x = F.pad(x, (pl, max(pr, 0), pt, max(pb, 0)))
        y = F.conv2d(x, self.weight, self.bias, s, 0, 1, self.groups)
        if self._act_in_codes():
            return self._quantize(y)
        if self.act == "relu":
            y = y.relu_()
        elif self.act == "relu6":
            y = y.clamp_(0.0, 6.0)
        if self.out_scale <= 0:
            return y
        return self._quantize(y)

    def _codes_op(self) -> bool:
        return self.out_scale > 0 and self.groups == 1 and self.kernel_size <= 8 and self.out_channels <= 4096

    def _pack(self):
        if self._packed is None:
            from lathe.kernels import cpu_conv
            self._packed = cpu_conv.pack_f32(self.weight)
        return self._packed

    def _cpu_packed(self, x):
        from lathe.kernels.dispatch import backend_for
        return self._pack() if backend_for("conv2d_int8", x.device) == "cpu" else None

    # the first layer of lathe's int8 conv chain (lathe.kernels.conv_chain)
    def chain_layer(self) -> dict | None:
        if not self.chain_ready() or not self._codes_op():
            return None
        self._pack()
        return {"depthwise": False, "C": self.in_channels, "N": self.out_channels, "k": self.kernel_size,
                "stride": self.stride, "padding": self.padding, "packed": None, "wsum": None, "w_scale": None,
                "fpacked": self._packed, "bias": self.bias, "act": self.act, "in_scale": 1.0, "in_zp": 0,
                "out_scale": self.out_scale, "out_zp": self.out_zp, "out_hw": self._out_hw}

    def _act_in_codes(self) -> bool:
        """The u8 clamp [0, 255] already is the ReLU/ReLU6 (zero point 0, 255 codes within 6):
        the same codes without a pass over the fp32 output."""
        if self.out_scale <= 0 or self.out_zp != 0:
            return False
        return self.act == "relu" or (self.act == "relu6" and 255 * self.out_scale <= 6.0)

    def _quantize(self, y):
        """NHWC u8 codes of y (channels_last), padded to a multiple of 4 channels; NaN images
        flagged as quantize_input flags them."""
        from lathe.compress.qconv import ChainUnit, QAct

        B, C = y.shape[:2]
        bad = ~torch.isfinite(y.sum((1, 2, 3)))
        t = y.permute(0, 2, 3, 1)  # NHWC view, contiguous for a channels_last y
        if bad.any():
            t = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
        q = t.mul(1.0 / self.out_scale).round_().add_(self.out_zp).clamp_(0, 255).to(torch.uint8)
        C4 = -(-C // 4) * 4
        if C4 != C:
            q = torch.cat([q, q.new_full((*q.shape[:3], C4 - C), self.out_zp)], -1)
        return QAct(q.contiguous(), C, self.out_scale, self.out_zp, bad if bad.any() else None)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, fp32, "
                f"act={self.act}, out={'u8' if self.out_scale > 0 else 'fp32'}")


register_module(FloatConvAct)
