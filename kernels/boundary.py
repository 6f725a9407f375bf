"""Checks and argument shaping at the kernel boundary, shared by the C++/CUDA wrappers. Every bad
argument raises lathe.errors.BadInput (CLI exit 2) naming the op and the problem."""
from __future__ import annotations

import torch

from lathe.errors import BadInput


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise BadInput(msg)


def fp32_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the bias as contiguous fp32 (callers have checked its shape/device)."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return bias


def linear_args(x: torch.Tensor, K: int, N: int, bias):
    """(x2, M, row stride, fp32 bias, out [M, N] in x's dtype): what a C++ linear kernel takes."""
    x2, M, ldx = rows(x, K)
    return x2, M, ldx, fp32_bias(bias), torch.empty(M, N, dtype=x.dtype)


def rows(x: torch.Tensor, K: int) -> tuple[torch.Tensor, int, int]:
    """x [..., K] as a 2-D [M, K] view with unit inner stride: (x2, M, row stride)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    if x2.stride(-1) != 1 or (M > 1 and x2.stride(0) < K):
        x2 = x2.contiguous()
    return x2, M, x2.stride(0) if M > 1 else K


class _Checked:
    """An extension module whose functions raise BadInput where the C++ boundary check raises
    ValueError (pybind11's std::invalid_argument): one kind of error for every bad argument."""

    def __init__(self, mod):
        self._mod, self._fns = mod, {}

    def __getattr__(self, name):
        fn = self._fns.get(name)
        if fn is None:
            raw = getattr(self._mod, name)
            if not callable(raw):
                return raw

            def fn(*args, _raw=raw):
                try:
                    return _raw(*args)
                except BadInput:
                    raise
                except ValueError as e:
                    raise BadInput(str(e)) from None
            self._fns[name] = fn
        return fn


_checked: dict = {}


def checked(mod):
    """`mod` (lathe._C or lathe._C_cuda) with BadInput for its argument errors."""
    c = _checked.get(id(mod))
    if c is None or c._mod is not mod:
        c = _checked[id(mod)] = _Checked(mod)
    return c
