"""What every quantized weight format shares: the Format protocol and its registry, the
QLinear module registry checkpoints rebuild from, and the checks and helpers formats use.

A format is one file in this folder (w8a8.py, w4a16.py, w8a16.py, fp8.py): a frozen dataclass
(quantize, the reference dequantize, its manifest entry, the hooks below) and the nn.Module
that holds its tensors and calls its torch.ops.lathe op. Code elsewhere asks
`module.format.<hook>`, never the module's class. Hooks that belong to a higher layer are
keyed by the format's `name` there: the ONNX lowering (lathe.export.lowerings), the vLLM scheme
(lathe.compress.vllm_config.SCHEMES), the ModelOpt converter
(lathe.compress.modelopt_backend.CONVERTERS).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from lathe.errors import BadInput


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise BadInput(f"{name} holds {bad} NaN/Inf values; fix the checkpoint or skip this layer")


def store_dtype(m: nn.Module, dtype, *names):
    """Buffers `names` of m converted to dtype once, at load (None: left as they are), so
    that forward never converts them (each format's prepare(dtype))."""
    if dtype is None:
        return
    for n in names:
        t = getattr(m, n)
        if t is not None and t.dtype != dtype:
            setattr(m, n, t.to(dtype))


def copy_bias(m: nn.Module, lin: nn.Linear, name: str):
    """lin's bias (checked finite) into the quantized module's fp32 bias buffer."""
    if lin.bias is not None:
        check_finite(f"bias of {name}", lin.bias)
        m.bias.copy_(lin.bias.detach().float())


class Format:
    """The hooks of a quantized weight format (subclasses are frozen dataclasses with at least
    the fields `name` and `op`).

    module          the nn.Module class holding this format's tensors (set by register_format)
    act_int8        activations are quantized to int8 at run time: a static-activation export
                    (TensorRT QDQ) records a scale for them
    exact_lowering  its ONNX lowering computes the same math as the module (dequantize + MatMul)
    min_opset(target)                         the lowest ONNX opset its lowering needs
    precision(target, int8_mode, accuracy)    (rank, lathe.export.validate.TOLERANCE key): the
                                              model validates at the key of the lowest rank
    roundtrip(w)                              w quantized and dequantized (QAT's fake quant)
    """

    module: ClassVar[type] = None
    act_int8: ClassVar[bool] = False
    exact_lowering: ClassVar[bool] = False

    def min_opset(self, target: str) -> int:
        return 18

    def precision(self, target: str, int8_mode: str, accuracy_level: int) -> tuple[int, str]:
        return 3, "weight-only"

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        return self.dequantize(*self.quantize(w)).to(w.dtype)


FORMATS: dict[str, type] = {}  # format name -> Format class
QUANT_MODULES: dict[str, type] = {}  # class name -> module class (what a manifest records)


def register_module(cls):
    """Let checkpoints record and rebuild `cls` (a module with manifest_args(); e.g. the
    low-rank factorised Linear of lathe.compress.lowrank)."""
    QUANT_MODULES[cls.__name__] = cls
    return cls


def module_class(name, where: str) -> type:
    """The module class a manifest entry names (a plugin's, such as low-rank, imported on
    demand); BadInput "<where> names unknown module class" when none is registered."""
    cls = QUANT_MODULES.get(name)
    if cls is None:
        from lathe.compress.config import ensure_registered

        ensure_registered()
        cls = QUANT_MODULES.get(name)
    if cls is None:
        raise BadInput(f"{where} names unknown module class {name!r}")
    return cls


def register_format(module_cls):
    """Class decorator of a Format: registers it under its name with its module."""
    def deco(fmt_cls):
        fmt_cls.module = module_cls
        FORMATS[fmt_cls.name] = fmt_cls
        register_module(module_cls)
        return fmt_cls
    return deco


def format_of(m: nn.Module):
    """The Format of a quantized module, or None for any other module."""
    f = getattr(m, "format", None)
    return f if isinstance(f, Format) else None


def quantized_modules(model: nn.Module):
    """(name, module) of every module of `model` that holds a quantized format."""
    return [(n, m) for n, m in model.named_modules() if format_of(m) is not None]


def same_smooth(parts) -> bool:
    """The parts share their input multiplier (SmoothQuant/AWQ smooth vector), or none has one."""
    s0 = parts[0].smooth
    return all((p.smooth is None) == (s0 is None) and (s0 is None or torch.equal(p.smooth, s0)) for p in parts)


def concat_into(m: nn.Module, parts, buffers) -> nn.Module:
    """m's `buffers` (and bias) are the parts' stacked along the output rows; smooth is shared."""
    p0 = parts[0]
    for b in buffers + (("bias",) if p0.bias is not None else ()):
        setattr(m, b, torch.cat([getattr(p, b) for p in parts]))
    if p0.smooth is not None:
        m.smooth = p0.smooth.clone()
    return m


def from_linear_rtn(cls, lin: nn.Linear, name: str, *args):
    """A `cls` module from `lin`, its weight rounded to nearest by the module's format into the
    buffers cls.QUANT_BUFFERS (in the order format.quantize returns them)."""
    check_finite(f"weight of {name}", lin.weight)
    m = cls(lin.in_features, lin.out_features, lin.bias is not None, *args)
    for buf, t in zip(cls.QUANT_BUFFERS, m.format.quantize(lin.weight)):
        getattr(m, buf).copy_(t)
    copy_bias(m, lin, name)
    return m.prepare()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's habit)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).mean() / noise))
