"""Quantized modules: plain nn.Modules holding packed tensors as buffers. They save to and load
from state dicts (no pickle) and call only torch.ops.lathe.*."""
from __future__ import annotations

import torch
import torch.nn as nn

import lathe.kernels  # noqa: F401
from lathe.compress.formats import Int8PerChannel, check_finite


class QLinearW8A8(nn.Module):
    """Linear with int8 per-channel weights and per-token dynamic int8 activations.

    Buffers: weight int8 [N, K], weight_scale fp32 [N], bias fp32 [N] (optional). `act` is an
    activation fused into the kernel's epilogue ("none", "gelu", "silu").
    """

    format = Int8PerChannel()

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
        _copy_bias(m, lin, name)
        return m.prepare()

    @classmethod
    def concat(cls, parts):
        """One module computing the parts' outputs side by side (exact: weights are quantized
        per output channel and the parts share the input's quantization)."""
        p0 = parts[0]
        same = all(p.act == p0.act and p.act_asym == p0.act_asym and (p.smooth is None) == (p0.smooth is None)
                   and (p.smooth is None or torch.equal(p.smooth, p0.smooth)) for p in parts)
        if not same:
            raise ValueError("cannot concatenate quantized linears with different input quantization")
        m = cls(p0.in_features, sum(p.out_features for p in parts), p0.bias is not None, p0.act,
                p0.smooth is not None, p0.act_asym, device=p0.weight.device)
        m.weight = torch.cat([p.weight for p in parts])
        m.weight_scale = torch.cat([p.weight_scale for p in parts])
        if p0.bias is not None:
            m.bias = torch.cat([p.bias for p in parts])
        if p0.smooth is not None:
            m.smooth = p0.smooth.clone()
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
        _store_dtype(self, dtype, "bias", "smooth")
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


QUANT_MODULES = {"QLinearW8A8": QLinearW8A8}


def _store_dtype(m: nn.Module, dtype, *names):
    """Buffers `names` of m converted to dtype once, at load (None: left as they are), so
    that forward never converts them."""
    if dtype is None:
        return
    for n in names:
        t = getattr(m, n)
        if t is not None and t.dtype != dtype:
            setattr(m, n, t.to(dtype))


def _copy_bias(m: nn.Module, lin: nn.Linear, name: str):
    """lin's bias (checked finite) into the quantized module's fp32 bias buffer."""
    if lin.bias is not None:
        check_finite(f"bias of {name}", lin.bias)
        m.bias.copy_(lin.bias.detach().float())


def register_module(cls):
    """Let checkpoints record and rebuild `cls` (a module with manifest_args(); e.g. the
    low-rank factorised Linear of lathe.compress.lowrank)."""
    QUANT_MODULES[cls.__name__] = cls
    return cls


# ----------------------------------------------------------------------------- weight-only

from lathe.compress.formats import FP8E4M3, Int4Group, Int8WeightOnly  # noqa: E402


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
        _copy_bias(m, lin, name)
        return m.prepare()

    @classmethod
    def concat(cls, parts):
        """Output channels side by side (exact: rows are quantized independently); the parts
        must share group size, symmetry and smooth vector (AWQ gives one per input group)."""
        p0 = parts[0]
        same = all(p.group_size == p0.group_size and p.symmetric == p0.symmetric
                   and (p.smooth is None) == (p0.smooth is None)
                   and (p.smooth is None or torch.equal(p.smooth, p0.smooth)) for p in parts)
        if not same:
            raise ValueError("cannot concatenate int4 linears with different group size, symmetry or smooth")
        m = cls(p0.in_features, sum(p.out_features for p in parts), p0.bias is not None,
                p0.group_size, p0.symmetric, p0.smooth is not None, device=p0.qweight.device)
        m.qweight = torch.cat([p.qweight for p in parts])
        m.scales = torch.cat([p.scales for p in parts])
        m.zeros = torch.cat([p.zeros for p in parts])
        if p0.bias is not None:
            m.bias = torch.cat([p.bias for p in parts])
        if p0.smooth is not None:
            m.smooth = p0.smooth.clone()
        return m.prepare()

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
            _store_dtype(self, dtype, "smooth")
        elif self.backend is not None:
            _store_dtype(self, dtype, "scales", "bias", "smooth")
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

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str = "linear", group_size: int | None = None):
        check_finite(f"weight of {name}", lin.weight)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size)
        q, s = m.format.quantize(lin.weight)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        _copy_bias(m, lin, name)
        return m.prepare()

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
            _store_dtype(self, None if dtype is None else torch.float32, "bias")
        else:
            _store_dtype(self, dtype, "scales", "bias")
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

    @classmethod
    def from_linear(cls, lin: nn.Linear, name: str = "linear", granularity: str = "per_channel",
                    act_granularity: str = "per_token"):
        check_finite(f"weight of {name}", lin.weight)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, granularity, act_granularity)
        q, s = m.format.quantize(lin.weight)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        _copy_bias(m, lin, name)
        return m.prepare()

    def prepare(self, dtype=None):
        """bias in the activation dtype `dtype` (torch._scaled_mm adds it in the output's
        dtype); the weight scale stays fp32 (the op's contract). Once, at load time."""
        _store_dtype(self, dtype, "bias")
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


QUANT_MODULES.update({"QLinearW4A16": QLinearW4A16, "QLinearW8A16": QLinearW8A16, "QLinearFP8": QLinearFP8})
