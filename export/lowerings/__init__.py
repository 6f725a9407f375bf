"""ONNX lowerings of lathe's ops, one file per quantized format (w8a8.py, w4a16.py, w8a16.py,
fp8.py), each registered under its format's name (lathe.compress.formats.FORMATS), plus
attention.py for the one op that is not a format. The exporter passes the translation table
built here to torch.onnx.export as its custom_translation_table: every lathe module reaches the
graph through its op, and the op's lowering emits ONNX that runtimes execute. Export never
special-cases a model.

A lowering file defines `@register_lowering("<format name>") def lower(ctx)`, returning the
function that lowers the format's op for `ctx` (a Context: target, opset, int8 mode, the
model's buffers, ...) or None when it does not apply. Every module of this package is imported
by translation_table: adding a format's lowering is adding its file here."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

TARGETS = ("onnxruntime", "tensorrt")
INT8_MODES = ("fused", "fast", "hybrid", "exact")
LOWERINGS: dict[str, tuple[str | None, Callable]] = {}  # format (or op) name -> (op name or None, lower)


def register_lowering(name: str, op: str | None = None):
    """Register `lower(ctx)` for the format called `name` (its op: the format's `op`), or for
    the op `op` when the lowering belongs to no format (attention)."""
    def deco(fn):
        LOWERINGS[name] = (op, fn)
        return fn
    return deco


@dataclass(frozen=True)
class Context:
    """What a lowering may depend on. act_scales: {weight name: static scale or None} (target
    tensorrt). exact: int8 weight names kept per token in int8_mode "hybrid". zp_rows: {weight
    name: zero-point rows} (int8_mode "fused"). buffers: common.Buffers of the model (lowerings
    that read packed weights)."""
    target: str = "onnxruntime"
    opset: int = 18
    int8_mode: str = "fused"
    accuracy_level: int = 4
    act_scales: dict | None = None
    exact: frozenset | None = None
    zp_rows: dict | None = None
    buffers: object = None


def _load_all():
    for info in pkgutil.iter_modules(__path__):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")


def translation_table(ctx: Context) -> dict:
    """{torch.ops.lathe.<op>.default: lowering} for every registered format (and op) whose op
    exists and whose lowering applies to ctx."""
    import torch

    from lathe.compress.formats import FORMATS

    if ctx.target not in TARGETS:
        raise ValueError(f"unknown export target {ctx.target!r}: expected one of {', '.join(TARGETS)}")
    if ctx.int8_mode not in INT8_MODES:
        raise ValueError(f"unknown int8 mode {ctx.int8_mode!r}: expected one of {', '.join(INT8_MODES)}")
    _load_all()
    table = {}
    for name, (op, lower) in LOWERINGS.items():
        op = op or (FORMATS[name].op if name in FORMATS else None)
        if op is None or not hasattr(torch.ops.lathe, op):
            continue
        fn = lower(ctx)
        if fn is not None:
            table.setdefault(getattr(torch.ops.lathe, op).default, fn)
    return table


def needs_opset(model, target: str) -> int:
    """The lowest opset the model's modules need (each format's min_opset: 21 for blocked
    DequantizeLinear, int4 on tensorrt and grouped int8 weight-only; 19 for FP8), at least 18."""
    from lathe.compress.formats import quantized_modules

    return max([18] + [m.format.min_opset(target) for _, m in quantized_modules(model)])
