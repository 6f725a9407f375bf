"""Calibration observers: streaming statistics of a module's inputs (never the activations
themselves), all with one protocol: update(x, where) adds a batch, all_reduce() combines the
ranks (a collective every rank calls; a no-op in one process) and returns the observer.
lathe.compress.calibration.driver feeds them.

Observers (make_observer): minmax, percentile, mse and entropy (histogram based, see
lathe.compress.histogram), per tensor, channel, group or token. AbsMaxObserver is
SmoothQuant's per-channel statistic; RowSample keeps a bounded sample of input rows (the
SmoothQuant alpha search scores candidates on it).

Under torch.distributed each rank observes its share of the batches and the statistics are
reduced across ranks (amax: MAX, counts: SUM), so every rank ends with the statistics of all
the data; in a single process the reduction is a no-op (bit-identical)."""
from __future__ import annotations

import math

import torch

from lathe.compress import histogram
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


GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")


class Observer:
    """Streams statistics of activations into rows chosen by the granularity:
    per_tensor one row (amax shape []), per_channel one row a channel of the last dim ([C]),
    per_group one row a group of `group_size` channels along the last dim ([C // g]),
    per_token one row of the tokens' own max |x| (amax shape []: a statistic of that dynamic
    distribution, for reporting; lathe's kernels quantize per token at run time).

    update(x, where) -> self; amax() -> tensor; all_reduce() combines ranks (a collective).
    real_tokens: observe_inputs passes only the non-padding tokens."""

    real_tokens = True

    def __init__(self, granularity: str = "per_tensor", group_size: int | None = None, name: str = "tensor"):
        if granularity not in GRANULARITIES:
            raise BadInput(f"unknown observer granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        if granularity == "per_group" and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                           or group_size <= 0):
            raise BadInput(f"per_group observers need a positive integer group_size, got {group_size!r}")
        self.granularity, self.group_size, self.name = granularity, group_size, name
        self.batches = 0

    def _rows(self, x: torch.Tensor, where: str) -> torch.Tensor:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise BadInput(f"calibration activations entering {where} hold NaN/Inf")
        C = x.shape[-1] if x.dim() else 1
        x = x.reshape(-1, C)
        g = self.granularity
        if g == "per_tensor":
            return x.reshape(1, -1)
        if g == "per_channel":
            return x.t()
        if g == "per_token":
            return x.abs().amax(1)[None, :]
        if C % self.group_size:
            raise BadInput(f"{where}: {C} channels are not a multiple of the observer group_size {self.group_size}")
        return x.reshape(-1, C // self.group_size, self.group_size).transpose(0, 1).reshape(C // self.group_size, -1)

    def update(self, x: torch.Tensor, where: str | None = None):
        rows = self._rows(x, where or self.name)
        if rows.shape[1]:
            self._observe(rows)
        self.batches += 1
        return self

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.granularity in ("per_tensor", "per_token") else t.reshape(-1)

    def _need_data(self, state):
        if state is None:
            raise BadInput(f"no calibration data reached {self.name}")

    def all_reduce(self):
        """Every rank ends with the statistics of all ranks' data; a no-op in one process."""
        from lathe.compress import distributed as dist

        if not dist.is_distributed():
            return self
        meta = torch.tensor([self.batches, self._width()], dtype=torch.float64)
        dist.all_reduce_sum_(meta[:1])
        dist.all_reduce_max_(meta[1:])
        self.batches, width = int(meta[0]), int(meta[1])
        if width:
            self._reduce_rows(width, dist)
        return self

    reduce_ = all_reduce  # its earlier name


class MinMaxObserver(Observer):
    """Running min and max (signed) per row; amax = max(|min|, |max|)."""

    method = "minmax"

    def __init__(self, granularity="per_tensor", group_size=None, name="tensor"):
        super().__init__(granularity, group_size, name)
        self.lo = self.hi = None

    def _observe(self, rows):
        lo, hi = rows.amin(1), rows.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def min_max(self):
        self._need_data(self.hi)
        return self._shape(self.lo), self._shape(self.hi)

    def amax(self) -> torch.Tensor:
        self._need_data(self.hi)
        return self._shape(torch.maximum(self.lo.abs(), self.hi.abs()))

    def _width(self):
        return 0 if self.hi is None else self.hi.numel()

    def _reduce_rows(self, width, dist):
        # a rank without data contributes -inf to both maxima
        neg_lo = torch.full((width,), -math.inf) if self.lo is None else -self.lo
        hi = torch.full((width,), -math.inf) if self.hi is None else self.hi
        self.hi = dist.all_reduce_max_(hi.contiguous())
        self.lo = -dist.all_reduce_max_(neg_lo.contiguous())


class HistogramObserver(Observer):
    """A streaming histogram of |x| per row (lathe.compress.histogram) and a rule that picks
    the clipping amax from it: percentile, mse or entropy. bins: a power of two (default 2048
    per tensor or token, 256 per channel or group). start, stride: the candidate clips of mse
    and entropy (bins kept; default 1 for mse, `levels` for entropy); levels: entropy's quantized bins (128, TensorRT's)."""

    def __init__(self, method: str, granularity="per_tensor", group_size=None, name="tensor",
                 bins: int | None = None, percentile: float = 99.99, start: int | None = None, stride: int = 1,
                 levels: int = 128):
        super().__init__(granularity, group_size, name)
        if bins is None:  # one histogram a channel or group: fewer bins keep mse/entropy quick
            bins = 2048 if granularity in ("per_tensor", "per_token") else 256
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 8 or bins & (bins - 1):
            raise BadInput(f"observer bins must be a power of two >= 8, got {bins!r}")
        if not isinstance(percentile, (int, float)) or not 0.0 < percentile <= 100.0:
            raise BadInput(f"observer percentile must be in (0, 100], got {percentile!r}")
        if method == "entropy" and bins < levels:
            raise BadInput(f"entropy calibration needs bins ({bins}) >= levels ({levels})")
        if granularity == "per_token" and method in ("mse", "entropy"):
            raise BadInput(f"{method} picks a clip for a static scale; per_token scales are dynamic "
                           "(use minmax or percentile to describe them)")
        if start is None:  # mse: any bin edge; entropy: TensorRT's first candidate, `levels` bins
            start = levels if method == "entropy" else 1
        self.method, self.bins, self.p = method, bins, float(percentile)
        self.start, self.stride, self.levels = start, stride, levels
        self.hist = self.range = None

    def _observe(self, rows):
        a = rows.abs().double()
        if self.hist is None:
            self.hist = torch.zeros(a.shape[0], self.bins, dtype=torch.float64)
            self.range = torch.zeros(a.shape[0], dtype=torch.float64)
        histogram.grow_(self.hist, self.range, a.amax(1))
        histogram.add(self.hist, self.range, a)

    def bin_width(self) -> torch.Tensor:
        self._need_data(self.hist)
        return self._shape(self.range / self.bins)

    def quantile(self, p: float) -> torch.Tensor:
        """The p-th percentile of |x| per row (e.g. of the per-token amax, for a report)."""
        self._need_data(self.hist)
        return self._shape(histogram.percentile(self.hist, self.range, p).float())

    def amax(self) -> torch.Tensor:
        self._need_data(self.hist)
        if self.method == "percentile":
            a = histogram.percentile(self.hist, self.range, self.p)
        elif self.method == "mse":
            a = histogram.mse_amax(self.hist, self.range, start=self.start, stride=self.stride)
        else:
            a = histogram.entropy_amax(self.hist, self.range, self.levels, self.start, self.stride)
        return self._shape(a.float())

    def merge_(self, other: "HistogramObserver"):
        """Add another observer's histogram (same rows) into this one, ranges aligned."""
        if other.hist is None:
            return self
        if self.hist is None:
            self.hist, self.range = other.hist.clone(), other.range.clone()
        else:
            new = torch.maximum(self.range, other.range)
            self.hist = self._aligned(new) + other._aligned(new)
            self.range = new
        self.batches += other.batches
        return self

    def _aligned(self, new_range):
        """This histogram over new_range (>= range), rows already there left untouched."""
        grow = new_range > self.range
        if not grow.any():
            return self.hist
        h = self.hist.clone()
        h[grow] = histogram.rebin(self.hist[grow], self.range[grow], new_range[grow])
        return h

    def _width(self):
        return 0 if self.hist is None else self.hist.shape[0]

    def _reduce_rows(self, width, dist):
        # ranges first (MAX), then every rank re-expresses its counts over them, then SUM
        if self.hist is None:
            self.hist = torch.zeros(width, self.bins, dtype=torch.float64)
            self.range = torch.zeros(width, dtype=torch.float64)
        new = dist.all_reduce_max_(self.range.clone())
        self.hist = dist.all_reduce_sum_(self._aligned(new).contiguous())
        self.range = new


METHODS = ("minmax", "percentile", "mse", "entropy")


def make_observer(method: str, granularity: str = "per_tensor", **kw) -> Observer:
    """An observer by name: minmax | percentile | mse | entropy, at granularity per_tensor |
    per_channel | per_group (group_size=) | per_token. Histogram options: bins, percentile,
    start, stride, levels; all take name (used in error messages)."""
    if method not in METHODS:
        raise BadInput(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    allowed = {"group_size", "name"} | ({"bins", "percentile", "start", "stride", "levels"}
                                         if method != "minmax" else set())
    bad = sorted(set(kw) - allowed)
    if bad:
        raise BadInput(f"{method} observer: unknown option {bad[0]!r}; expected one of {sorted(allowed)}")
    if method == "minmax":
        return MinMaxObserver(granularity, **kw)
    return HistogramObserver(method, granularity, **kw)


class ChannelSum:
    """Per-input-channel sum of |x|^power over the real tokens, and their count, in float64
    (AWQ: power 1, the mean |x|; Wanda and low-rank: power 2, the norm / RMS)."""

    real_tokens = True

    def __init__(self, in_features: int, power: int = 2):
        self.sum, self.n, self.power = torch.zeros(in_features, dtype=torch.float64), 0, power

    def update(self, x: torch.Tensor, where: str | None = None):
        x = x.detach().reshape(-1, x.shape[-1])
        a = x.float().abs().sum(dim=0, dtype=torch.float64) if self.power == 1 else x.double().pow(self.power).sum(0)
        self.sum = self.sum + a
        self.n += x.shape[0]
        return self

    def all_reduce(self) -> "ChannelSum":
        from lathe.compress import distributed as dist

        if dist.is_distributed():  # a copy: the driver made the sum under inference_mode
            self.sum = dist.all_reduce_sum_(self.sum.clone())
            self.n = int(dist.all_reduce_count(self.n))
        return self

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.n, 1)).float()

    @property
    def norm(self) -> torch.Tensor:
        return self.sum.sqrt().float()


class RowSample:
    """A uniform sample of at most n input rows (tokens) over all batches, streaming:
    each row draws a random key and the n smallest keys are kept (bottom-k sampling)."""

    real_tokens = True

    def __init__(self, n: int = 2048, seed: int = 0):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.rows = self.keys = None

    def update(self, x: torch.Tensor, where: str = "tensor"):
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise BadInput(f"calibration activations entering {where} hold NaN/Inf")
        x = x.reshape(-1, x.shape[-1])
        k = torch.rand(x.shape[0], generator=self.gen)
        if self.rows is not None:
            x, k = torch.cat([self.rows, x]), torch.cat([self.keys, k])
        if x.shape[0] > self.n:
            keep = k.topk(self.n, largest=False).indices.sort().values
            x, k = x[keep], k[keep]
        self.rows, self.keys = x, k
        return self


class Scaled:
    """Feeds x * mul to an observer (e.g. the smoothed input x / s SmoothQuant quantizes)."""

    def __init__(self, obs, mul: torch.Tensor):
        self.obs, self.mul = obs, mul
        self.real_tokens = getattr(obs, "real_tokens", False)

    def update(self, x, where=None):
        self.obs.update(x.float() * self.mul, where)


def smoothquant_scales(act_amax: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the Linears that read X (SmoothQuant).
    Channels that never fire, or whose weights are all zero, keep s = 1."""
    w_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    for w in weights:
        check_finite("weight", w)
    s = act_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    ok = (act_amax > 0) & (w_amax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)
