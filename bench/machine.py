"""The machine and versions that travel with every result."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform


def _version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def describe() -> dict:
    import torch

    cpu, flags = platform.processor() or "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu.strip(" x86_64"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(have & {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                           "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16"})
                    break
    except OSError:
        pass
    try:
        from lathe.kernels import cpu as kcpu
        isa = kcpu.active_isa()
    except Exception:  # extension missing: still describe the machine
        isa = None
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu, "isa_flags": flags, "lathe_isa": isa, "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "gpu": gpu, "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("lathe", "torch", "onnxruntime", "onnx", "triton",
                                              "tensorrt", "transformers")},
    }
