"""Low-rank factorisation of Linear layers: W [N, K] ~ U_r S_r V_r^T, stored as two Linears
(`down` = V_r^T [r, K], no bias; `up` = U_r S_r [N, r], with the bias). A layer is factored
only when r (N + K) < N K (1 - min_saving), i.e. when it really gets smaller and cheaper.

rank: a fixed r; energy: the smallest r whose singular values keep that fraction of
sum(s_i^2) (the squared Frobenius norm). whiten (activation-aware, like ASVD, Yuan et al.
2023): factor W diag(a) instead, a = the per-input-channel RMS of the calibration
activations, then undo the scaling in `down`; the truncation then drops what matters least
for the actual inputs rather than for a white input.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from lathe.compress.config import CONFIGS, _check_bool, _check_skip, register_handler
from lathe.compress.modules import register_module
from lathe.errors import BadInput


@register_module
class LowRankLinear(nn.Module):
    """y = up(down(x)): down [rank, in_features] without bias, up [out_features, rank]."""

    factored = True  # lets model adapters' linear_groups see the two inner Linears

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device)

    def manifest_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None}

    def forward(self, x):
        return self.up(self.down(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class LowRankConfig:
    """rank (int) or energy (fraction in (0, 1]) per layer; skip: fnmatch names kept dense;
    min_saving: required fraction of parameters saved for a layer to be factored; whiten:
    activation-aware SVD (needs calibration)."""

    method: ClassVar[str] = "lowrank"
    rank: int | None = None
    energy: float | None = None
    skip: list = field(default_factory=lambda: ["lm_head"])
    min_saving: float = 0.1
    whiten: bool = False

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise BadInput("lowrank needs exactly one of rank (an integer) or energy (a fraction)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise BadInput(f"lowrank.rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None:
            e = self.energy
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < float(e) <= 1.0:
                raise BadInput(f"lowrank.energy must be a fraction in (0, 1], got {e!r}")
            self.energy = float(e)
        m = self.min_saving
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= float(m) < 1.0:
            raise BadInput(f"lowrank.min_saving must be a fraction in [0, 1), got {m!r}")
        self.min_saving = float(m)
        _check_skip("lowrank", self.skip)
        _check_bool("lowrank", "whiten", self.whiten)


CONFIGS[LowRankConfig.method] = LowRankConfig


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest r with sum(s[:r]^2) >= energy * sum(s^2) (s sorted descending)."""
    e = s.double().pow(2)
    cum = torch.cumsum(e, 0)
    r = int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)).item()) + 1
    return min(r, len(s))


def factorize(lin: nn.Linear, rank: int | None = None, energy: float | None = None,
              scale: torch.Tensor | None = None):
    """-> (LowRankLinear, rank, kept energy fraction). SVD in float64; scale: per-input-channel
    activation RMS for whitening (W diag(scale) is factored, down absorbs 1/scale)."""
    W = lin.weight.detach().double()
    if scale is not None:
        scale = scale.double().clamp(min=1e-6 * float(scale.max().clamp(min=1e-30)))
        W = W * scale[None, :]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = min(rank, len(S)) if rank is not None else energy_rank(S, energy)
    kept = float(S[:r].pow(2).sum() / S.pow(2).sum().clamp(min=1e-300))
    down = Vh[:r]
    if scale is not None:
        down = down / scale[None, :]
    m = LowRankLinear(lin.in_features, lin.out_features, r, lin.bias is not None, device=W.device)
    dt = lin.weight.dtype
    with torch.no_grad():
        m.down.weight.copy_(down.to(dt))
        m.up.weight.copy_((U[:, :r] * S[:r][None, :]).to(dt))
        if lin.bias is not None:
            m.up.bias.copy_(lin.bias.detach())
    return m, r, kept


def _rms(model, names, calib):
    """Per-input-channel RMS of each named Linear's calibration inputs (one pass; under
    torchrun every rank's share summed, a rank may have seen none)."""
    from lathe.compress.calibration import ChannelSum, observe

    obs = observe(model, {n: [ChannelSum(model.get_submodule(n).in_features, power=2)] for n in names}, calib)
    out = {}
    for n in names:
        acc = obs[n][0].all_reduce()
        if acc.n:
            out[n] = (acc.sum / acc.n).sqrt().float()
    return out


@register_handler(LowRankConfig)
def _lowrank(model, cfg: LowRankConfig, calib, progress, ctx=None):
    from lathe.compress.quantize import _set_module
    from lathe.compress.structured import param_count
    from lathe.compress.weight_only import _need_calib

    t0, before = time.perf_counter(), param_count(model)
    names, skipped = [], []
    for n, m in model.named_modules():
        if type(m) is nn.Linear:
            if any(fnmatch.fnmatch(n, p) for p in cfg.skip):
                skipped.append(f"{n}: skip list")
            else:
                names.append(n)
    scales = {}
    if cfg.whiten:
        _need_calib(calib, "lowrank with whiten")
        scales = _rms(model, names, calib)
    layers, done = {}, []
    for i, n in enumerate(names):
        lin = model.get_submodule(n)
        N, K = lin.out_features, lin.in_features
        new, r, kept = factorize(lin, cfg.rank, cfg.energy, scales.get(n))
        if r * (N + K) >= N * K * (1 - cfg.min_saving):
            skipped.append(f"{n}: rank {r} saves less than min_saving {cfg.min_saving:g} "
                           f"({r * (N + K)} vs {N * K} weights)")
        else:
            _set_module(model, n, new)
            done.append(n)
            layers[n] = {"rank": r, "energy": round(kept, 6), "params": r * (N + K),
                         "dense_params": N * K}
        if progress:
            progress(i + 1, len(names))
    return {"method": "lowrank", "factored": done, "layers": layers, "skipped": skipped,
            "whiten": cfg.whiten, "params_before": before, "params_after": param_count(model),
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["LowRankLinear", "LowRankConfig", "energy_rank", "factorize"]
