"""Calibration: run batches through the model and stream statistics of the inputs of chosen
modules (never holding the activations themselves). Ctrl-C stops cleanly between batches.

Under torch.distributed each rank observes its share of the batches and the statistics are
reduced across ranks (amax: MAX, counts: SUM), so every rank ends with the statistics of all
the data; in a single process the reduction is a no-op (bit-identical)."""
from __future__ import annotations

import torch

from lathe.compress.formats import check_finite
from lathe.errors import BadInput


class AbsMaxObserver:
    """Running per-channel max |x| over the last dim (SmoothQuant's statistic)."""

    def __init__(self):
        self.amax = None
        self.batches = 0

    def update(self, x: torch.Tensor, where: str):
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise BadInput(f"calibration activations entering {where} hold NaN/Inf")
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        self.batches += 1

    def all_reduce(self):
        """Combine the observers of all ranks (a collective: every rank calls it). A rank that
        saw no batch contributes zeros (max |x| >= 0, so the max is unchanged)."""
        from lathe.compress import distributed as dist

        if not dist.is_distributed():
            return self
        meta = torch.tensor([self.batches, 0 if self.amax is None else self.amax.numel()],
                            dtype=torch.float64)
        dist.all_reduce_sum_(meta[:1])
        dist.all_reduce_max_(meta[1:])
        self.batches, width = int(meta[0]), int(meta[1])
        if width:
            a = torch.zeros(width) if self.amax is None else self.amax
            self.amax = dist.all_reduce_max_(a.contiguous())
        return self


def observe_inputs(model, names, batches, progress=None) -> dict:
    """Per-channel |x| max of the input of each module in `names`, over `batches`
    (a list of dicts of model inputs)."""
    if not batches:
        raise BadInput("the calibration set is empty: give --calib FILE with at least one line")
    modules = dict(model.named_modules())
    obs, hooks = {}, []
    for n in names:
        obs[n] = AbsMaxObserver()
        hooks.append(modules[n].register_forward_pre_hook(
            lambda mod, args, n=n: obs[n].update(args[0], n)))
    try:
        with torch.inference_mode():
            for i, b in enumerate(batches):
                model(**b)
                if progress:
                    progress(i + 1, len(batches))
    finally:
        for h in hooks:
            h.remove()
    return {n: o.all_reduce().amax for n, o in obs.items()}


def smoothquant_scales(act_amax: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the Linears that read X (SmoothQuant).
    Channels that never fire, or whose weights are all zero, keep s = 1."""
    w_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    for w in weights:
        check_finite("weight", w)
    s = act_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    ok = (act_amax > 0) & (w_amax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)
