"""int8 W8A8: int8 per-channel weights (Int8PerChannel) with per-token dynamic int8
activations, run by torch.ops.lathe.linear_w8a8 (QLinearW8A8)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.compress.formats.base import (Format, check_finite, concat_into, copy_bias, register_format, same_smooth,
                                         store_dtype)


class QLinearW8A8(nn.Module):
    """Linear with int8 per-channel weights and per-token dynamic int8 activations.

    Buffers: weight int8 [N, K], weight_scale fp32 [N], bias fp32 [N] (optional). `act` is an
    activation fused into the kernel's epilogue ("none", "gelu", "silu").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "none",
                 smooth: bool = False, act_asym: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self.act_asym = act_asym  # per-token asymmetric (zero point) or symmetric activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # SmoothQuant: x is quantized as x * smooth (smooth = 1/s; W was multiplied by s).
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        # The CPU kernel's pre-packed copy: derived state, rebuilt by prepare(), never saved.
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_colsum", None, persistent=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str = "linear", act: str = "none", smooth=None,
                    act_asym: bool = True):
        """smooth: SmoothQuant's per-input-channel s [K] (W*s is quantized, x/s at run time)."""
        check_finite(f"weight of {name}", lin.weight)
        w = lin.weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]
        q, s = cls.format.quantize(w)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, smooth is not None,
                act_asym)
        if smooth is not None:
            m.smooth.copy_(1.0 / smooth)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        copy_bias(m, lin, name)
        return m.prepare()

    @classmethod
    def concat(cls, parts):
        """One module computing the parts' outputs side by side (exact: weights are quantized
        per output channel and the parts share the input's quantization)."""
        p0 = parts[0]
        same = all(p.act == p0.act and p.act_asym == p0.act_asym for p in parts)
        if not same or not same_smooth(parts):
            raise ValueError("cannot concatenate quantized linears with different input quantization")
        m = cls(p0.in_features, sum(p.out_features for p in parts), p0.bias is not None, p0.act,
                p0.smooth is not None, p0.act_asym, device=p0.weight.device)
        concat_into(m, parts, ("weight", "weight_scale"))
        return m.prepare() if m.weight.device.type != "meta" else m

    def prepare(self, dtype=None):
        """Lay the weight out for the backend the dispatcher picks on its device, once, at
        load time. dtype: the activation dtype; bias and smooth are stored in it (the scale
        stays fp32: every backend's epilogue multiplies the int32 accumulator in fp32)."""
        from lathe.kernels.dispatch import backend_for
        dev = self.weight.device
        backend = None if dev.type == "meta" else backend_for("linear_w8a8", dev)
        self._packed = self._colsum = None
        if backend == "cpu":  # the C++ kernel: VNNI layout, fp32 scale/bias/smooth
            from lathe.kernels import cpu
            self._packed, self._colsum = cpu.int8_pack(self.weight)
            dtype = torch.float32
        elif backend in ("torch", "triton"):  # torch._int_mm: the row sums give the zero point
            self._colsum = self.weight.sum(1, dtype=torch.int32)
        store_dtype(self, dtype, "bias", "smooth")
        return self

    def manifest_args(self) -> dict:
        """Constructor arguments that rebuild this module (empty) on the meta device."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act": self.act, "smooth": self.smooth is not None,
                "act_asym": self.act_asym}

    def forward(self, x):
        exporting = torch.compiler.is_exporting()
        return torch.ops.lathe.linear_w8a8(
            x, self.weight, self.weight_scale, self.bias, self.act, self.smooth,
            self.act_asym, None if exporting else self._packed, None if exporting else self._colsum)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}, act_asym={self.act_asym}, format={self.format.name}"


@register_format(QLinearW8A8)
@dataclass(frozen=True)
class Int8PerChannel(Format):
    """Symmetric int8, one fp32 scale per output channel: W ~ q * s, q in [-127, 127].
    Consumed by torch.ops.lathe.linear_w8a8 (with per-token dynamic int8 activations)."""

    name: str = "int8_per_channel_sym"
    op: str = "linear_w8a8"
    activations: str = "int8_per_token_dynamic_sym"

    def quantize(self, w: torch.Tensor):
        w = w.detach().float()
        amax = w.abs().amax(dim=1)
        # An all-zero channel gets scale 1 (its codes are 0), never a 0 that would divide.
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return q, scale.contiguous()

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return q.float() * scale[:, None]

    act_int8: ClassVar[bool] = True

    def precision(self, target, int8_mode, accuracy_level):
        return 0, "int8-static" if target == "tensorrt" else {"exact": "int8", "fused": "int8"}.get(int8_mode, "int8-" + int8_mode)

    def manifest(self) -> dict:
        return asdict(self) | {"dtype": "int8", "granularity": "per_channel", "symmetric": True,
                               "layout": "[N, K] row-major, nn.Linear order"}


QLinearW8A8.format = Int8PerChannel()
