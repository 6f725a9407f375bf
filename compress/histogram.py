"""Histograms of |x| for calibration, and the clipping thresholds chosen from them.

One histogram per row (a tensor, a channel or a group of channels): counts [G, B] (float64)
over [0, range_g], B equal bins. Streaming: when new data exceeds a row's range, the range is
doubled until it fits and every 2^k old bins merge into one new bin (exact: the old edges are
new edges), so memory stays G x B however much data goes by. Aligning histograms of unrelated
ranges (ranks of a distributed run) interpolates the piecewise-linear CDF instead.

The thresholds (per row): percentile (the CDF reaches p%), MSE (the clip minimising the
expected symmetric int8 quantization error of the bin centres) and entropy (TensorRT's KL
calibration: the clip minimising KL(P || Q) between the clipped reference histogram P and its
quantization Q into `levels` bins). Same ideas as onnxruntime's HistogramCalibrater and
ModelOpt's HistogramCalibrator, written for rows of a torch tensor."""
from __future__ import annotations

import math

import torch


def add(hist: torch.Tensor, rng: torch.Tensor, a: torch.Tensor) -> None:
    """Count a [G, n] (|x| values, all <= rng[:, None]) into hist [G, B] in place."""
    G, B = hist.shape
    width = torch.where(rng > 0, rng / B, torch.ones_like(rng))
    idx = (a.double() / width[:, None]).floor().clamp_(0, B - 1).long()
    idx += torch.arange(G, dtype=torch.long)[:, None] * B
    hist.view(-1).add_(torch.bincount(idx.reshape(-1), minlength=G * B).to(hist.dtype))


def grow_(hist: torch.Tensor, rng: torch.Tensor, need: torch.Tensor) -> None:
    """Double each row's range until it covers `need`, merging bins exactly (in place). A row
    whose range is still 0 holds only zeros (all in bin 0) and takes `need` as it is."""
    B = hist.shape[1]
    fresh = (rng <= 0) & (need > 0)
    rng[fresh] = need[fresh]
    k = torch.zeros_like(rng, dtype=torch.long)
    grow = (rng > 0) & (need > rng)
    k[grow] = torch.ceil(torch.log2(need[grow] / rng[grow])).long().clamp(min=1)
    # floating point: 2^k * rng can still fall a hair short of need
    short = grow & (rng * torch.pow(2.0, k.double()) < need)
    k[short] += 1
    for kk in k.unique().tolist():
        if kk == 0:
            continue
        rows = (k == kk).nonzero().view(-1)
        f = 2 ** kk
        h = hist[rows]
        if f >= B:  # everything collapses into the first bin
            merged = torch.zeros_like(h)
            merged[:, 0] = h.sum(1)
        else:
            merged = torch.zeros_like(h)
            merged[:, :B // f] = h.view(len(rows), B // f, f).sum(-1)
        hist[rows] = merged
        rng[rows] = rng[rows] * f


def rebin(hist: torch.Tensor, rng: torch.Tensor, new_rng: torch.Tensor) -> torch.Tensor:
    """hist over [0, rng] re-expressed over [0, new_rng] (new_rng >= rng), assuming counts
    spread evenly within a bin (linear interpolation of the CDF); totals are kept."""
    G, B = hist.shape
    cdf = torch.cat([torch.zeros(G, 1, dtype=hist.dtype), hist.cumsum(1)], 1)  # at old edges
    pos = torch.linspace(0, 1, B + 1, dtype=torch.float64)[None, :] * new_rng[:, None]
    old = torch.where(rng > 0, rng, torch.ones_like(rng))[:, None]
    t = (pos / old * B).clamp(0, B)  # new edges in units of old bins
    lo = t.floor().long().clamp(max=B - 1)
    frac = t - lo
    at = cdf.gather(1, lo) + frac * (cdf.gather(1, lo + 1) - cdf.gather(1, lo))
    at[rng <= 0] = cdf[rng <= 0, -1:].expand(-1, B + 1)  # all zeros: bin 0 only
    out = at.diff(dim=1)
    out[:, 0] += at[:, 0]
    return out


def percentile(hist: torch.Tensor, rng: torch.Tensor, p: float) -> torch.Tensor:
    """Per row, the |x| below which p percent of the counts lie (interpolated in its bin)."""
    G, B = hist.shape
    cdf = hist.cumsum(1)
    total = cdf[:, -1:]
    target = total * (p / 100.0)
    i = torch.searchsorted(cdf, target).clamp(max=B - 1)  # first bin reaching the target
    below = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(target))
    inbin = hist.gather(1, i)
    frac = torch.where(inbin > 0, (target - below) / inbin, torch.ones_like(inbin))
    return ((i + frac.clamp(0, 1)) * (rng[:, None] / B)).view(-1)


def _candidates(B: int, start: int, stride: int) -> list[int]:
    """Candidate clips, as counts of bins kept: start, start + stride, ..., always B."""
    c = list(range(min(start, B), B + 1, max(1, stride)))
    return c if c and c[-1] == B else c + [B]


def _rounding_integral(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The integral of (t - s round(t / s))^2 dt from -s/2 to x (x >= -s/2): whole periods of
    s^3 / 12 plus the part of the last one."""
    u = x / s + 0.5
    k = torch.floor(u)
    r = u - k
    return s.pow(3) * (k / 12 + ((r - 0.5).pow(3) + 0.125) / 3)


def mse_amax(hist: torch.Tensor, rng: torch.Tensor, qmax: int = 127, start: int = 1,
             stride: int = 1) -> torch.Tensor:
    """Per row, the clip (a bin edge) minimising the expected squared error of symmetric int8
    with scale clip / qmax, taking each bin's counts as spread evenly over it: a bin past the
    clip saturates (its mean squared distance to the clip), a bin below it rounds (the mean
    rounding error over the bin, exact). Bin centres alone (ModelOpt's estimate) misjudge bins
    as wide as a quantization step."""
    G, B = hist.shape
    w = (rng / B)[:, None]
    j = torch.arange(B, dtype=torch.float64)[None, :]
    lo, hi = j * w, (j + 1) * w
    wd = w.clamp(min=1e-300)
    best = torch.full((G,), math.inf, dtype=torch.float64)
    amax = rng.clone()
    for i in _candidates(B, start, stride):
        clip = w * i
        s = torch.where(clip > 0, clip / qmax, torch.ones_like(clip))
        rounding = (_rounding_integral(hi, s) - _rounding_integral(lo, s)) / wd
        saturate = ((hi - clip).pow(3) - (lo - clip).pow(3)) / (3 * wd)
        err = (hist * torch.where(j < i, rounding, saturate)).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        amax = torch.where(better, clip.view(-1), amax)
    return amax


def entropy_amax(hist: torch.Tensor, rng: torch.Tensor, levels: int = 128, start: int = 128,
                 stride: int = 1) -> torch.Tensor:
    """Per row, TensorRT's entropy calibration: for each candidate clip i (bins kept), the
    reference P = hist[:i] with the clipped counts added to its last bin; Q = hist[:i] merged
    into `levels` bins, each spread back evenly over its non-empty source bins; pick the i
    minimising KL(P || Q) (infinite where Q misses mass that P has)."""
    G, B = hist.shape
    total = hist.sum(1)
    best = torch.full((G,), math.inf, dtype=torch.float64)
    amax = rng.clone()
    for i in _candidates(B, max(start, levels), stride):
        p = hist[:, :i].clone()
        p[:, -1] += hist[:, i:].sum(1)
        idx = (torch.arange(i) * levels // i).expand(G, i)  # source bin -> merged bin
        nz = (hist[:, :i] > 0).double()
        merged = torch.zeros(G, levels, dtype=torch.float64).scatter_add_(1, idx, hist[:, :i])
        count = torch.zeros(G, levels, dtype=torch.float64).scatter_add_(1, idx, nz)
        q = (merged / count.clamp(min=1)).gather(1, idx) * nz
        pn = p / total.clamp(min=1e-300)[:, None]
        qn = q / q.sum(1, keepdim=True).clamp(min=1e-300)
        term = torch.where(pn > 0, pn * (torch.log(pn.clamp(min=1e-300)) - torch.log(qn.clamp(min=1e-300))),
                           torch.zeros_like(pn))
        kl = torch.where(((pn > 0) & (qn <= 0)).any(1), torch.full_like(total, math.inf), term.sum(1))
        better = kl < best
        best = torch.where(better, kl, best)
        amax = torch.where(better, rng / B * i, amax)
    return amax
