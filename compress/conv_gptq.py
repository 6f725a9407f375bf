"""Error-aware rounding of int8 conv weights (GPTQ, Frantar et al. 2022, on lathe's conv
format: symmetric int8 per output channel, scale = max|w| / 127, the format QConv2dInt8 packs).

Each output channel's weights are rounded one input tap at a time and the rounding error of
each tap is spread over the taps not yet rounded through the inverse Hessian of the layer's
inputs (H = E[p p^T], p: the im2col patch a weight row multiplies), so the row's output error
on the calibration images is minimised instead of each weight's own error. Dense convolutions
share one H [K, K] (K = C_in * k * k) for all rows; a depthwise conv has one H [k*k, k*k] per
channel (its row sees only its own channel), solved batched over the channels.

The patch means E[p] come from the same pass and give the bias correction: the expected
output shift of the rounded weights, -(W_q - W) E[p], is subtracted from the bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PatchStats:
    """Streaming E[p p^T] and E[p] of a conv's input patches (the input as the conv sees it,
    already padded). Dense: H [K, K]; depthwise: H [C, k*k, k*k]."""

    ROWS = 1024  # output positions sampled an image (a regular grid; all of them when fewer)

    def __init__(self, conv: torch.nn.Conv2d):
        self.k, self.stride = conv.kernel_size, conv.stride
        self.depthwise = conv.groups != 1
        C, kk = conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]
        K = kk if self.depthwise else C * kk
        self.H = torch.zeros((C, K, K) if self.depthwise else (K, K), dtype=torch.float64)
        self.mean = torch.zeros((C, K) if self.depthwise else (K,), dtype=torch.float64)
        self.n = 0

    def update(self, x: torch.Tensor):
        for xb in x.detach().float().split(4):  # im2col of a few images at a time: bounded memory
            self._update(xb)

    def _update(self, x: torch.Tensor):
        B, C, H, W = x.shape
        kh, kw = self.k
        sh, sw = self.stride
        oh, ow = (H - kh) // sh + 1, (W - kw) // sw + 1
        # patches on a regular grid of at most ~ROWS output positions an image: H is a small
        # matrix, a few thousand samples an image estimate it as well as 12544 do, at a
        # fraction of the im2col cost
        t = max(1, int((oh * ow / self.ROWS) ** 0.5))
        if self.k == (1, 1):
            p = x[:, :, ::sh * t, ::sw * t]
            p = p.permute(0, 2, 3, 1).reshape(-1, C)[None].transpose(1, 2)  # [1, C, rows]
        else:
            p = F.unfold(x, self.k, stride=(sh * t, sw * t))  # [B, C*k*k, L], channel-major like the weight
        if self.depthwise:
            kk = kh * kw
            p = p.reshape(p.shape[0], C, kk, -1).permute(1, 0, 3, 2).reshape(C, -1, kk)
            n = p.shape[1]
            self.H += torch.bmm(p.transpose(1, 2), p).double()
            self.mean += p.sum(1).double()
        else:
            p = p.transpose(1, 2).reshape(-1, p.shape[1])
            n = p.shape[0]
            self.H += (p.t() @ p).double()
            self.mean += p.sum(0).double()
        self.n += n

    def finish(self):
        """H and mean as averages (float32)."""
        n = max(self.n, 1)
        return (self.H / n).float(), (self.mean / n).float()


def int8_scale(w: torch.Tensor) -> torch.Tensor:
    """QConv2dInt8's per-output-channel scale of w [N, ...]: max|w| / 127 (1 for a zero row)."""
    amax = w.abs().flatten(1).amax(1)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def _inv_chol_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean diag)^-1, batched over leading dims, float64;
    the dampening grows tenfold where a factorisation fails."""
    H = H.double()
    K = H.shape[-1]
    eye = torch.eye(K, dtype=H.dtype)
    md = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    lam = (damp * md)[..., None, None]
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        ok = info == 0
        if bool(ok.all()):
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if bool((info == 0).all()) and torch.isfinite(U).all():
                return U
        lam = lam * 10.0
    raise RuntimeError("conv GPTQ: the input Hessian is not positive definite even after dampening")


@torch.no_grad()
def gptq_int8(w: torch.Tensor, H: torch.Tensor, damp: float = 0.01,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] fp32 weight rows; H: [K, K] (shared) or [N, K, K] (one per row).
    -> (q int8 [N, K], scale [N]) on QConv2dInt8's grid (scale = max|w| / 127 per row)."""
    W = w.detach().float().clone()
    N, K = W.shape
    scale = int8_scale(W)
    H = H.detach().double().clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0  # an input tap that never fired: keep H invertible, its weight as RTN rounds it
    diag.masked_fill_(dead, 1.0)
    U = _inv_chol_upper(H, damp).float()
    q = torch.zeros(N, K, dtype=torch.int8)
    for i1 in range(0, K, block):  # GPTQ's lazy batch updates: rank-1 updates inside a block only
        i2 = min(i1 + block, K)
        W1, E1 = W[:, i1:i2], torch.zeros(N, i2 - i1)
        U1 = U[..., i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            c = torch.clamp(torch.round(col / scale), -127, 127)
            q[:, i1 + i] = c.to(torch.int8)
            err = (col - c * scale) / U1[..., i, i]
            W1[:, i:] -= err[:, None] * U1[..., i, i:]
            E1[:, i] = err
        if i2 < K:
            W[:, i2:] -= (E1 @ U[i1:i2, i2:]) if U.dim() == 2 else torch.einsum("nb,nbk->nk", E1, U[:, i1:i2, i2:])
    return q, scale


def bias_shift(w: torch.Tensor, wq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """E[(Wq - W) p] per output channel: the output shift the rounding causes on average.
    w, wq: [N, K]; mean: [K] (dense) or [N, K] (depthwise)."""
    d = (wq - w).double()
    m = mean.double()
    return ((d * m).sum(1) if m.dim() == 2 else d @ m).float()
