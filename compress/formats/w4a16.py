"""int4 W4A16: int4 weights in groups along K (Int4Group) with fp activations, run by
torch.ops.lathe.linear_w4a16 (QLinearW4A16)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.compress.formats.base import (Format, check_finite, concat_into, copy_bias, register_format, store_dtype,
                                         same_smooth)
from lathe.errors import BadInput


class QLinearW4A16(nn.Module):
    """Linear with int4 group-quantized weights (lathe's Int4Group format) and fp activations.

    Buffers: qweight uint8 [N, K/2] (low nibble = even k), scales fp32 [N, K/g], zeros uint8
    [N, K/g] (codes 0..15; 8 everywhere when symmetric), bias fp32 [N] (optional), smooth fp32
    [K] (optional: AWQ's 1/s, multiplied into x before the matmul; W*s was quantized).
    forward = torch.ops.lathe.linear_w4a16, so the dispatcher picks the kernel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = False, smooth: bool = False, device=None):
        super().__init__()
        self.format = Int4Group(group_size, symmetric)
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        G = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, device=device))
        self.register_buffer("zeros", torch.full((out_features, G), 8 if symmetric else 0,
                                                 dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.backend = None  # set by prepare()

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str = "linear", group_size: int = 128,
                    symmetric: bool = False, weight=None, scales=None, zeros=None, smooth=None):
        """RTN of lin.weight, unless `weight` (e.g. GPTQ's already-quantized values) and its
        scales/zeros [N, K/g] are given. smooth: AWQ's per-input-channel s [K]: the (given or
        own) weight is multiplied by s before quantization and x by 1/s at run time."""
        check_finite(f"weight of {name}", lin.weight)
        w = (lin.weight if weight is None else weight).detach().float()
        if smooth is not None:
            w = w * smooth[None, :].float()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, symmetric,
                smooth is not None)
        qw, s, z = m.format.quantize(w, scales, zeros)
        m.qweight.copy_(qw)
        m.scales.copy_(s)
        m.zeros.copy_(z)
        if smooth is not None:
            m.smooth.copy_(1.0 / smooth.float())
        copy_bias(m, lin, name)
        return m.prepare()

    @classmethod
    def concat(cls, parts):
        """Output channels side by side (exact: rows are quantized independently); the parts
        must share group size, symmetry and smooth vector (AWQ gives one per input group)."""
        p0 = parts[0]
        same = all(p.group_size == p0.group_size and p.symmetric == p0.symmetric for p in parts)
        if not same or not same_smooth(parts):
            raise ValueError("cannot concatenate int4 linears with different group size, symmetry or smooth")
        m = cls(p0.in_features, sum(p.out_features for p in parts), p0.bias is not None,
                p0.group_size, p0.symmetric, p0.smooth is not None, device=p0.qweight.device)
        return concat_into(m, parts, ("qweight", "scales", "zeros")).prepare()

    def prepare(self, dtype=None):
        """Lay the weight out for the backend the dispatcher picks, once, at load time: the
        CPU kernel's own layout (lathe.kernels.cpu_int4.int4_pack, non-persistent); on the
        GPU, scales, bias and smooth in the activation dtype `dtype` (the kernels read them
        in x's dtype)."""
        from lathe.kernels.dispatch import backend_for
        dev = self.qweight.device
        self.backend = None if dev.type == "meta" else backend_for("linear_w4a16", dev)
        self._packed = None  # derived state, never saved
        if self.backend == "cpu":
            from lathe.kernels import cpu_int4
            p = cpu_int4.int4_pack(self.qweight, self.scales, self.zeros, self.group_size, self.in_features)
            self._packed = [p["codes"], p["scales"], p["zeros"]]
            store_dtype(self, dtype, "smooth")
        elif self.backend is not None:
            store_dtype(self, dtype, "scales", "bias", "smooth")
        return self

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this module multiplies by (x * smooth) @ W^T (reference)."""
        return self.format.dequantize(self.qweight, self.scales, self.zeros, self.in_features).float()

    def manifest_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "group_size": self.group_size,
                "symmetric": self.symmetric, "smooth": self.smooth is not None}

    def forward(self, x):
        if self.smooth is not None:
            x = x * self.smooth  # stored in the activation dtype by prepare()
        packed = None if torch.compiler.is_exporting() else getattr(self, "_packed", None)
        return torch.ops.lathe.linear_w4a16(x, self.qweight, self.scales, self.zeros,
                                            self.group_size, self.bias, *(packed or (None, None, None)))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"smooth={self.smooth is not None}, format={self.format.name}")


@register_format(QLinearW4A16)
@dataclass(frozen=True)
class Int4Group(Format):
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

    def min_opset(self, target):
        return 21 if target == "tensorrt" else 18  # blocked INT4 DequantizeLinear

    def precision(self, target, int8_mode, accuracy_level):
        if target == "onnxruntime" and accuracy_level >= 2:
            return 2, "int4-a8"  # MatMulNBits computes in fp16/bf16/int8 (4: int8 activations per block)
        return 3, "weight-only"

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        q, s, z = self.quantize(w)
        return self.dequantize(q, s, z, w.shape[1]).to(w.dtype)

    def manifest(self) -> dict:
        return asdict(self) | {"dtype": "uint4", "granularity": f"group{self.group_size}"}
