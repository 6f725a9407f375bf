"""SmoothQuant's migration strength alpha, searched per linear group.

For each candidate alpha the group's weights are smoothed and quantized as lathe stores them
(Int8PerChannel on W * s) and its input rows as the kernel quantizes them (per token, with a
zero point unless symmetric: lathe.kernels.reference.quantize_rows_u8 on x / s); the
objective is the relative squared error of the group's outputs against fp32 on a bounded
sample of calibration rows (calibrate.RowSample). Under torch.distributed the error sums are
reduced across ranks, so every rank picks the same alpha."""
from __future__ import annotations

import torch

from lathe.compress.calibration import smoothquant_scales
from lathe.compress.formats import Int8PerChannel
from lathe.kernels.reference import quantize_rows_u8


def group_error(x: torch.Tensor, weights: list, s: torch.Tensor, asym: bool, ref=None):
    """(sum ||y_q - y||^2, sum ||y||^2) over the group's linears, y = x W^T (no bias: it
    cancels), y_q from int8 W * s and int8 x / s. ref: the fp32 outputs, if already known."""
    fmt = Int8PerChannel()
    q, sx, zp = quantize_rows_u8(x * (1.0 / s), asym)
    xd = (q - zp) * sx
    err = energy = 0.0
    for j, w in enumerate(weights):
        w = w.detach().float()
        y = x @ w.t() if ref is None else ref[j]
        wd = fmt.dequantize(*fmt.quantize(w * s[None, :]))
        err += float((xd @ wd.t() - y).double().pow(2).sum())
        energy += float(y.double().pow(2).sum())
    return err, energy


def search_alpha(x: torch.Tensor, act_amax: torch.Tensor, weights: list, grid, asym: bool):
    """(best alpha, {alpha: relative error}) for one group; ties go to the earlier alpha."""
    from lathe.compress import distributed as dist

    x = x.float()
    ref = [x @ w.detach().float().t() for w in weights]
    sums = torch.tensor([group_error(x, weights, smoothquant_scales(act_amax, weights, a), asym, ref)
                         for a in grid], dtype=torch.float64)
    dist.all_reduce_sum_(sums)
    rel = sums[:, 0] / sums[:, 1].clamp(min=1e-300)
    best = int(torch.argmin(rel))
    return float(grid[best]), {float(a): float(r) for a, r in zip(grid, rel)}
