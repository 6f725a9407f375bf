"""FP8 E4M3 weights and dynamic FP8 activations (FP8E4M3), run by torch.ops.lathe.linear_fp8
(QLinearFP8): Triton on sm_89+, a PyTorch simulation elsewhere."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.compress.formats.base import Format, from_linear_rtn, register_format, store_dtype


class QLinearFP8(nn.Module):
    """Linear with FP8 E4M3 weights and dynamic FP8 E4M3 activations (W8A8 in fp8).

    Buffers: weight float8_e4m3fn [N, K], weight_scale fp32 [N] (per channel) or [1] (per
    tensor), bias fp32 [N] (optional). Activations are quantized at run time, scale =
    amax / 448 per token (row) or per tensor.

    forward = torch.ops.lathe.linear_fp8. On an sm_89+ GPU (Ada, Hopper) it runs the Triton
    kernel lathe/kernels/triton_kernels/qmatmul.py `fp8_linear` (fp8 x fp8 -> fp32
    accumulation), which takes exactly these buffers. On the CPU (no FP8 units) and older GPUs
    it is the reference simulation: x is quantized to torch.float8_e4m3fn and back in PyTorch,
    then multiplied in fp32 with the dequantized weight; it shows the accuracy of FP8, not its
    speed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 granularity: str = "per_channel", act_granularity: str = "per_token", device=None):
        super().__init__()
        self.format = FP8E4M3(granularity, act_granularity)
        self.in_features, self.out_features = in_features, out_features
        self.granularity, self.act_granularity = granularity, act_granularity
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features if granularity == "per_channel" else 1,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    QUANT_BUFFERS = ("weight", "weight_scale")

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str = "linear", granularity: str = "per_channel",
                    act_granularity: str = "per_token"):
        return from_linear_rtn(cls, lin, name, granularity, act_granularity)

    def prepare(self, dtype=None):
        """bias in the activation dtype `dtype` (torch._scaled_mm adds it in the output's
        dtype); the weight scale stays fp32 (the op's contract). Once, at load time."""
        store_dtype(self, dtype, "bias")
        return self

    def manifest_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "granularity": self.granularity,
                "act_granularity": self.act_granularity}

    def forward(self, x):
        return torch.ops.lathe.linear_fp8(x, self.weight, self.weight_scale, self.bias,
                                          self.act_granularity)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"granularity={self.granularity}, act_granularity={self.act_granularity}")


FP8_E4M3_MAX = 448.0


@register_format(QLinearFP8)
@dataclass(frozen=True)
class FP8E4M3(Format):
    """FP8 E4M3 (torch.float8_e4m3fn) weights and dynamic FP8 activations, scale = amax / 448
    (1 for all-zero rows). Weights: one scale per output channel or one per tensor; activations:
    one scale per token (row) or one per tensor, computed at run time."""

    granularity: str = "per_channel"
    act_granularity: str = "per_token"
    name: str = "fp8_e4m3"
    op: str = "linear_fp8"  # Triton on sm_89+; elsewhere the op's reference simulates it

    def quantize(self, w: torch.Tensor):
        w = w.detach().float()
        amax = w.abs().amax(dim=1) if self.granularity == "per_channel" else w.abs().amax().reshape(1)
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
        s = scale[:, None] if self.granularity == "per_channel" else scale
        q = (w / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return q.contiguous(), scale.contiguous()

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return q.float() * scale.float().reshape(-1, 1)  # [N] or [1]: broadcasts either way

    def min_opset(self, target):
        return 19  # FLOAT8E4M3FN QuantizeLinear / DequantizeLinear

    def precision(self, target, int8_mode, accuracy_level):
        return 1, "fp8"

    def manifest(self) -> dict:
        return asdict(self) | {"dtype": "float8_e4m3fn", "symmetric": True}
