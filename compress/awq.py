"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration") for lathe's int4 group format.

For a group of Linears that read the same input x (q/k/v of an attention, ...), the salient
input channels are those with large mean |x|. Scaling W's input channel k up by s_k before
quantization (and x_k down by 1/s_k at run time) shrinks their relative rounding error:

    y = (x / s) @ Q(W * s)^T,    s = mean|x| ^ alpha  (normalised: s / sqrt(max(s) min(s)))

alpha is searched on a grid of `awq_grid` points i / awq_grid in [0, 1) (alpha = 0 is plain
RTN, so the search never does worse than RTN on its sample); the loss is the MSE of the
group's outputs (all its Linears, concatenated) on a calibration sample of tokens, against
the fp32 outputs. Input channels that never fire (mean |x| = 0) keep s = 1.

Then, with awq_clip (default), AWQ's clipping search (the reference's auto_clip): for each
(output row, group) of the scaled weight, the clipping bound max|w| * r, r in (0.5, 1], whose
RTN minimises that group's contribution to the output error on the sample (awq_clip()).

Where 1/s goes: AWQ's reference folds it into the previous op (a LayerNorm's weight, the
previous Linear's rows). That is model-specific (and impossible after a residual add), so
lathe always keeps it as an explicit per-input-channel multiplier, QLinearW4A16's `smooth`
buffer [K] (= 1/s), multiplied into x before the matmul: simple and always correct.
"""
from __future__ import annotations

import math

import torch

from lathe.compress.formats import Int4Group
from lathe.compress.gptq import fake_quant, few_threads


class TokenSample:
    """Up to `max_tokens` tokens, evenly spaced within each of `n_batches` batches (the
    search's calibration sample; everything else is streamed)."""

    def __init__(self, max_tokens: int, n_batches: int):
        self.per_batch = max(1, math.ceil(max_tokens / max(n_batches, 1)))
        self.max_tokens = max_tokens
        self.parts = []
        self.n = 0

    def update(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        room = self.max_tokens - self.n
        if room <= 0 or x.shape[0] == 0:
            return
        take = min(self.per_batch, room, x.shape[0])
        idx = torch.linspace(0, x.shape[0] - 1, take).round().long()
        self.parts.append(x[idx].clone())
        self.n += take

    def tensor(self, width: int | None = None) -> torch.Tensor:
        """The sample [T, K]; under torch.distributed every rank's, gathered (the same on all
        ranks) and thinned evenly back to max_tokens. width: K, for a rank with no tokens."""
        from lathe.compress import distributed as dist

        x = torch.cat(self.parts) if self.parts else torch.empty(0, width or 0)
        if not dist.is_distributed():
            return x
        x = dist.all_gather_rows(x)
        if x.shape[0] > self.max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, self.max_tokens).round().long()]
        return x


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised by sqrt(max * min) over the live channels; dead ones 1."""
    live = x_mean > 0
    s = torch.ones_like(x_mean)
    if not bool(live.any()):
        return s
    v = x_mean[live].clamp(min=1e-8).pow(alpha).clamp(min=1e-4)
    v = v / torch.sqrt(v.max() * v.min())
    s[live] = v
    return s


def _fake_quant_rtn(w: torch.Tensor, fmt: Int4Group) -> torch.Tensor:
    """RTN on the format's grid (its own scale/zero), dequantized, without unpacking codes."""
    N, K = w.shape
    _, s, z = fmt.quantize(w)
    return fake_quant(w.view(N, -1, fmt.group_size), s[..., None], z.float()[..., None]).view(N, K)


@torch.no_grad()
def awq_search(weights: list, x_mean: torch.Tensor, sample: torch.Tensor, fmt: Int4Group,
               grid: int = 20):
    """Best s for the group. weights: [N_i, K] tensors of the Linears reading x; sample [T, K].

    Returns (s [K], info {"alpha", "loss", "loss_rtn"}).
    """
    W = torch.cat([w.detach().float() for w in weights])
    with few_threads(*W.shape):  # small tensors, many ops: see gptq.few_threads
        return _search(W, x_mean, sample.float(), fmt, grid)


def _search(W, x_mean, X, fmt, grid):
    Y = X @ W.t()
    best = None
    losses = []
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha)
        Wq = _fake_quant_rtn(W * s[None, :], fmt)
        loss = float(((X / s) @ Wq.t() - Y).pow(2).mean())
        losses.append(loss)
        if math.isfinite(loss) and (best is None or loss < best[0]):
            best = (loss, alpha, s)
    if best is None:  # every candidate overflowed: keep RTN
        best = (float("nan"), 0.0, torch.ones_like(x_mean))
    return best[2], {"alpha": best[1], "loss": best[0], "loss_rtn": losses[0]}


@torch.no_grad()
def awq_clip(weight: torch.Tensor, sample: torch.Tensor, fmt: Int4Group, grid: int = 20,
             max_shrink: float = 0.5, max_tokens: int = 512) -> tuple:
    """AWQ's weight clipping search (the reference's auto_clip): for every (output row, group)
    the clipping bound m = r * max|w| (r from 1 down to 1 - max_shrink in `grid` steps) whose
    RTN minimises that group's contribution to the output error on the sample,
    ||X_g (w_g - Q(clamp(w_g, -m, m)))||^2, is kept. weight [N, K] and sample [T, K] are the
    scaled ones (W * s, X / s). Returns (clipped weight [N, K], info)."""
    W = weight.detach().float()
    N, K = W.shape
    g = fmt.group_size
    G = K // g
    X = sample.float()
    if X.shape[0] > max_tokens:
        X = X[torch.linspace(0, X.shape[0] - 1, max_tokens).round().long()]
    Xg = X.view(-1, G, g)  # [T, G, g]
    Wg = W.view(N, G, g)
    amax = Wg.abs().amax(-1, keepdim=True)  # [N, G, 1]
    best_m = amax.clone()
    rows = max(1, (1 << 24) // max(1, Xg.shape[0] * G))  # bound the [rows, T, G] temporaries
    with few_threads(N, K):
        for r0 in range(0, N, rows):
            wg, am = Wg[r0:r0 + rows], amax[r0:r0 + rows]
            n = wg.shape[0]
            ref = torch.einsum("tjk,njk->ntj", Xg, wg)  # each group's contribution to y
            best_err = torch.full((n, G), float("inf"), device=W.device)
            for i in range(grid):
                m = am * (1.0 - max_shrink * i / grid)
                wq = _fake_quant_rtn(torch.clamp(wg, -m, m).reshape(n, K), fmt).view(n, G, g)
                err = (torch.einsum("tjk,njk->ntj", Xg, wq) - ref).pow(2).mean(1)  # [n, G]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_m[r0:r0 + n] = torch.where(better[..., None], m, best_m[r0:r0 + n])
    clipped = torch.clamp(Wg, -best_m, best_m).view(N, K)
    shrunk = float((best_m < amax).float().mean())
    return clipped, {"clipped_groups": round(shrunk, 4)}


__all__ = ["TokenSample", "awq_scales", "awq_search", "awq_clip"]
