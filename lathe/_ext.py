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
    if not _cache.get("_C_isa_ok"):
        _check_isa_env(mod)
    return mod


def _check_isa_env(mod):
    """An unknown LATHE_ISA, or a level this CPU lacks, is bad input (one line, exit 2), never a
    silent fallback to another path."""
    err = mod.isa_env_error() if hasattr(mod, "isa_env_error") else ""
    if err:
        from lathe.errors import BadInput

        raise BadInput(err)
    _cache["_C_isa_ok"] = True


def require_cuda():
    mod = cuda()
    if mod is None:
        raise RuntimeError(
            "lathe's CUDA extension lathe._C_cuda is not built "
            f"({_errors.get('_C_cuda', 'unknown reason')}); install with nvcc present and LATHE_CUDA=1"
        )
    return mod
