"""What every kernel wrapper here shares: the guarded triton import, interpreter detection and
the device check. Imports only torch, and never touches CUDA at import time."""
from __future__ import annotations

import os

import torch

MISSING_TRITON = ("lathe's Triton kernels need the `triton` package "
                  "(pip install 'lathe[triton]', or triton>=3.0)")


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels then run on CPU tensors through numpy (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def autotune_enabled() -> bool:
    """False under LATHE_TRITON_AUTOTUNE=0 (tests/conftest.py sets it for pytest): each kernel
    then runs one fixed config instead of benchmarking its whole list on first call."""
    return os.environ.get("LATHE_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")


def pick_configs(configs: list, fixed, interpreter):
    """The configs a kernel's autotuner gets: all of them for real GPU runs, `fixed` (a good
    default for the target GPU) when autotuning is off, `interpreter` (tiny blocks) under
    TRITON_INTERPRET=1. Read once, when the kernel module is imported."""
    if interpreting():
        return [interpreter]
    if not autotune_enabled():
        return [fixed]
    return list(configs)


def import_triton():
    """(triton, triton.language), or an ImportError that says what to install."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError(MISSING_TRITON) from e
    return triton, tl


def check_device(*tensors) -> torch.device:
    """All tensors on one device, and one a Triton kernel can run on here."""
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device
    for t in ts[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device: got {dev} and {t.device}")
    if dev.type == "cuda" or (dev.type == "cpu" and interpreting()):
        return dev
    raise RuntimeError(f"lathe's Triton kernels need CUDA tensors, got {dev.type} "
                       "(set TRITON_INTERPRET=1 to run them on the CPU, slowly, for tests)")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def bucket(n: int) -> int:
    """Autotune key for a size: the next power of two, so tuning runs once per size class
    rather than once per sequence length."""
    return 1 << max(0, int(n) - 1).bit_length()
