"""lathe's Triton GPU kernels: fused attention (attention.py), quantized matmuls (qmatmul.py) and
the int4 packing converters (packing.py, pure PyTorch).

Importing this package imports neither triton nor the kernel modules, and never initialises
CUDA: each function below imports its module on first call, so a missing triton is reported
(with what to install) only when a kernel is used. Under TRITON_INTERPRET=1 the kernels also
run on CPU tensors (slowly; that is how the tests run without a GPU).
"""
from __future__ import annotations

import importlib
import importlib.util

# public name -> submodule that defines it
_EXPORTS = {
    "flash_attention": "attention",
    "flash_attention_varlen": "attention",
    "flash_decode": "attention",
    "quantize_per_token_int8": "qmatmul",
    "quantize_per_token_fp8": "qmatmul",
    "w8a8_linear": "qmatmul",
    "fp8_linear": "qmatmul",
    "quantize_fp8": "qmatmul",
    "w4a16_linear": "qmatmul",
    "w8a16_linear": "qmatmul",
    "pack_int4": "packing",
    "unpack_int4": "packing",
    "gptq_to_lathe": "packing",
    "awq_to_lathe": "packing",
}

__all__ = sorted(_EXPORTS) + ["is_available"]


def _lazy(name: str, module: str):
    def entry(*args, **kwargs):
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Imports {__name__}.{module} on call and runs its `{name}` (see its docstring)."
    return entry


for _name, _module in _EXPORTS.items():
    globals()[_name] = _lazy(_name, _module)
del _name, _module


def is_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None
