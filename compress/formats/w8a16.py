"""int8 W8A16: symmetric int8 weights per channel or per group (Int8WeightOnly) with fp
activations, run by torch.ops.lathe.linear_w8a16 (QLinearW8A16)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.compress.formats.base import Format, from_linear_rtn, register_format, store_dtype
from lathe.errors import BadInput


class QLinearW8A16(nn.Module):
    """Linear with symmetric int8 weights (per output channel, or per group of `group_size`
    along K) and fp activations (lathe.compress.formats.Int8WeightOnly).

    Buffers: qweight int8 [N, K], scales fp32 [N, G] (G = 1 per channel, K/g per group),
    bias fp32 [N] (optional). forward = torch.ops.lathe.linear_w8a16: the C++ kernel on CPU
    (int8 weights widened in registers), Triton `w8a16_linear` on CUDA.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int | None = None, device=None):
        super().__init__()
        self.format = Int8WeightOnly(group_size)
        if group_size is not None and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = 1 if group_size is None else in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed = None  # the CPU kernel's layout: derived state, made by prepare(), never saved

    QUANT_BUFFERS = ("qweight", "scales")

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str = "linear", group_size: int | None = None):
        return from_linear_rtn(cls, lin, name, group_size)

    def prepare(self, dtype=None):
        """Pack the weight for the CPU kernel when the dispatcher picks it (bias fp32, its
        contract); elsewhere scales and bias in the activation dtype `dtype`. Once, at load."""
        from lathe.kernels.dispatch import backend_for
        dev = self.qweight.device
        self._packed = None
        if dev.type == "meta":
            return self
        if backend_for("linear_w8a16", dev) == "cpu":
            from lathe.kernels.cpu_w8a16 import w8a16_pack
            self._packed = w8a16_pack(self.qweight, self.scales, self.group_size or 0)
            store_dtype(self, None if dtype is None else torch.float32, "bias")
        else:
            store_dtype(self, dtype, "scales", "bias")
        return self

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self.qweight, self.scales)

    def manifest_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "group_size": self.group_size}

    def forward(self, x):
        packed = None if torch.compiler.is_exporting() else self._packed
        return torch.ops.lathe.linear_w8a16(x, self.qweight, self.scales, self.bias,
                                            self.group_size or 0, packed)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, format={self.format.name}")


@register_format(QLinearW8A16)
@dataclass(frozen=True)
class Int8WeightOnly(Format):
    """Symmetric int8 weights with fp activations (W8A16). qweight int8 [N, K], codes in
    [-127, 127]; scales fp32 [N, G]: G = 1 per output channel (group_size None) or K / g per
    group of `group_size` along K. W[n, k] = qweight[n, k] * scales[n, k // g] (g = K per
    channel). Layout of kernels/triton_kernels/qmatmul.py `w8a16_linear`. An all-zero row or
    group gets scale 1 (codes 0), never 0."""

    group_size: int | None = None
    name: str = "int8_weight_only"
    op: str = "linear_w8a16"

    def quantize(self, w: torch.Tensor):
        w = w.detach().float()
        N, K = w.shape
        g = K if self.group_size is None else self.group_size
        if K % g:
            raise BadInput(f"in_features {K} is not a multiple of the int8 group size {g}")
        wg = w.view(N, K // g, g)
        amax = wg.abs().amax(-1)
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(wg / scales[..., None]), -127, 127).to(torch.int8).view(N, K)
        return q.contiguous(), scales.contiguous()

    @staticmethod
    def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        N, K = q.shape
        G = scales.shape[1]
        return (q.float().view(N, G, K // G) * scales.float()[..., None]).view(N, K)

    exact_lowering: ClassVar[bool] = True

    def min_opset(self, target):
        return 21 if self.group_size else 18  # per group: blocked DequantizeLinear

    def manifest(self) -> dict:
        gran = "per_channel" if self.group_size is None else f"group{self.group_size}"
        return asdict(self) | {"dtype": "int8", "granularity": gran, "symmetric": True,
                               "activations": "fp (weight-only)"}
