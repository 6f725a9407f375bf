"""Loader of the compiled extensions. Never raises at import: a missing extension is reported
by `require_cpu()` / `require_cuda()` when a feature needs it."""
from __future__ import annotations

import importlib

_cache: dict[str, object] = {}
_errors: dict[str, str] = {}


def _load(name: str):
    if name in _cache:
        return _cache[name]
    try:
        mod = importlib.import_module(f"lathe.{name}")
    except ImportError as e:  # not built, or built for another machine
        _errors[name] = str(e)
        mod = None
    _cache[name] = mod
    return mod


def cpu():
    """lathe._C or None."""
    return _load("_C")


def cuda():
    """lathe._C_cuda or None (it is built only where nvcc was found)."""
    return _load("_C_cuda")


def require_cpu():
    mod = cpu()
    if mod is None:
        raise RuntimeError(
            "lathe's CPU extension lathe._C is not built "
            f"({_errors.get('_C', 'unknown reason')}); reinstall with `pip install -e .`"
        )
    return mod


def require_cuda():
    mod = cuda()
    if mod is None:
        raise RuntimeError(
            "lathe's CUDA extension lathe._C_cuda is not built "
            f"({_errors.get('_C_cuda', 'unknown reason')}); install with nvcc present and LATHE_CUDA=1"
        )
    return mod
