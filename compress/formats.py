"""Weight formats, defined once: how to quantize, the reference dequantization, the manifest
entry, and the op that consumes them. compress packs with these, kernels consume them,
checkpoints store them, export lowers them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lathe.errors import BadInput


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise BadInput(f"{name} holds {bad} NaN/Inf values; fix the checkpoint or skip this layer")


@dataclass(frozen=True)
class Int8PerChannel:
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

    def manifest(self) -> dict:
        return asdict(self) | {"dtype": "int8", "granularity": "per_channel", "symmetric": True,
                               "layout": "[N, K] row-major, nn.Linear order"}


@dataclass(frozen=True)
class Int4Group:
    """int4 weights in groups of `group_size` along K, asymmetric (zero point) or symmetric
    (zero = 8). qweight uint8 [N, K/2], low nibble = even k (onnxruntime MatMulNBits order);
    scales [N, K/g]; zeros uint8 [N, K/g] codes 0..15. W = (code - zero) * scale."""

    group_size: int = 128
    symmetric: bool = False
    name: str = "int4_group"
    op: str = "linear_w4a16"

    def __post_init__(self):
        if self.group_size not in (32, 64, 128):
            raise BadInput(f"int4 group_size must be 32, 64 or 128, got {self.group_size}")

    def quantize(self, w: torch.Tensor, scales=None, zeros=None):
        """RTN unless scales/zeros are given (GPTQ/AWQ pass their own)."""
        w = w.detach().float()
        N, K = w.shape
        g = self.group_size
        if K % g:
            raise BadInput(f"in_features {K} is not a multiple of the int4 group size {g}")
        wg = w.view(N, K // g, g)
        if scales is None:
            if self.symmetric:
                amax = wg.abs().amax(-1)
                scales = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
                zeros = torch.full_like(scales, 8.0)
            else:
                lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
                scales = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
                zeros = torch.clamp(torch.round(-lo / scales), 0, 15)
        codes = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 15)
        codes = codes.to(torch.uint8).view(N, K)
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        return qweight, scales.float().contiguous(), zeros.to(torch.uint8).contiguous()

    def dequantize(self, qweight, scales, zeros, K: int):
        from lathe.kernels.reference import dequant_int4
        return dequant_int4(qweight, scales, zeros, self.group_size, K)

    def manifest(self) -> dict:
        return asdict(self) | {"dtype": "uint4", "granularity": f"group{self.group_size}"}


FORMATS = {f.name: f for f in (Int8PerChannel(),)}


@dataclass(frozen=True)
class Int8WeightOnly:
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

    def manifest(self) -> dict:
        gran = "per_channel" if self.group_size is None else f"group{self.group_size}"
        return asdict(self) | {"dtype": "int8", "granularity": gran, "symmetric": True,
                               "activations": "fp (weight-only)"}


FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8E4M3:
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

    def manifest(self) -> dict:
        return asdict(self) | {"dtype": "float8_e4m3fn", "symmetric": True}
