"""torchao as a bench anchor (`lathe bench ... --backend torchao-int8,torchao-int4`):
transformers' own fp32 model quantized in place by torchao's `quantize_`, run eagerly on CPU,
so a user sees lathe beside the tool they would otherwise pick, in the same table.

Guarded like the ModelOpt backend: importing lathe never imports torchao; asking for these
backends without it is a BadInput naming the extra to install.

  torchao-int8  Int8DynamicActivationInt8WeightConfig (per-row int8 weights, per-token dynamic
                int8 activations: the same scheme as lathe's int8 without SmoothQuant).
  torchao-int4  Int4WeightOnlyConfig (group 128), with the first packing format whose kernel
                runs on this machine's CPU (probed on a tiny Linear); none: the backend is
                skipped with one line saying why (torchao 0.18's int4 kernels are CUDA-only or
                need the mslk package)."""
from __future__ import annotations

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.integrations import quiet_torchao as _quiet_import

INSTALL_HINT = "pip install 'lathe[torchao]'"
KINDS = {"torchao-int8": "torchao int8 dyn-act (eager)", "torchao-int4": "torchao int4 weight-only (eager)"}


class Unavailable(Exception):
    """The asked-for torchao scheme has no kernel here (the message says why, in one line)."""


def import_torchao():
    """torchao.quantization, or a BadInput that says how to install it."""
    try:
        with _quiet_import():
            import torchao.quantization as tq
    except ImportError as e:
        raise BadInput(f"the torchao backends need torchao ({e.name} is missing): {INSTALL_HINT}") from None
    return tq


def version() -> str:
    import torchao
    return getattr(torchao, "__version__", "?")


def int8_config():
    return import_torchao().Int8DynamicActivationInt8WeightConfig()


def int4_config(group_size: int = 128):
    """Int4WeightOnlyConfig with the first packing format that quantizes and runs a tiny fp32
    or bf16 Linear on this CPU; Unavailable (one line: every format and why) when none does."""
    tq = import_torchao()
    from torchao.quantization import quantize_

    formats = _int4_formats()
    why = []
    for fmt in formats:
        for dtype in (torch.float32, torch.bfloat16):
            lin = nn.Sequential(nn.Linear(group_size, 64)).to(dtype)
            cfg = tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=fmt)
            try:
                quantize_(lin, cfg)
                with torch.inference_mode():
                    lin(torch.randn(2, group_size, dtype=dtype))
                return cfg, dtype
            except Exception as e:  # noqa: BLE001 torchao raises plain errors for a missing kernel
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if dtype == torch.bfloat16 or "bfloat16" not in msg:
                    why.append(f"{getattr(fmt, 'value', fmt)}: {msg[:80]}")
                    break
    raise Unavailable(f"torchao {version()} has no CPU kernel for int4 weight-only on this machine "
                      f"({'; '.join(why)})")


def _int4_formats() -> list:
    try:
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat
    except ImportError:
        return [None]
    return list(Int4PackingFormat)


def check(kind: str):
    """Before any work: torchao importable, and (int4) a CPU kernel. BadInput / Unavailable."""
    if kind not in KINDS:
        raise BadInput(f"unknown torchao backend {kind!r}; expected one of {', '.join(KINDS)}")
    import_torchao()
    if kind == "torchao-int4":
        int4_config()


def quantized(path, kind: str) -> tuple[nn.Module, int]:
    """(transformers' model of the checkpoint quantized by torchao, in lathe's calling
    convention: model(**batch) -> logits or last hidden state; bytes of its weights)."""
    from torchao.quantization import quantize_

    from lathe.models.generic import adapt, reference_model

    m = adapt(reference_model(path))
    if kind == "torchao-int8":
        cfg, dtype = int8_config(), torch.float32
    else:
        cfg, dtype = int4_config()
    m = m.to(dtype)
    with _quiet_import():  # quantize_ takes every Linear (torchao's default filter)
        quantize_(m, cfg)
    return _as_fp32_out(m, dtype), weights_bytes(m)


def _as_fp32_out(m, dtype):
    if dtype == torch.float32:
        return m
    fwd = m.forward

    def run(*args, **kw):
        out = fwd(*args, **kw)
        return out.float() if isinstance(out, torch.Tensor) else out
    m.forward = run
    return m


def nbytes(t: torch.Tensor) -> int:
    """Storage of a tensor, torchao's tensor subclasses counted by their inner tensors."""
    inner = t.data if isinstance(t, nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(nbytes(getattr(inner, n)) for n in names if getattr(inner, n) is not None)
    return inner.numel() * inner.element_size()


def weights_bytes(m: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t)
    return total
