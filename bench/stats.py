"""Timing statistics over kept per-run times (milliseconds)."""
from __future__ import annotations

import math
import time


def percentile(sorted_ms: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted data."""
    if not sorted_ms:
        raise ValueError("no samples")
    k = (len(sorted_ms) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


def summarize(ms: list[float]) -> dict:
    s = sorted(ms)
    n = len(s)
    mean = sum(s) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1)) if n > 1 else 0.0
    return {
        "n": n, "min_ms": s[0], "mean_ms": mean, "p50_ms": percentile(s, 50),
        "p90_ms": percentile(s, 90), "p95_ms": percentile(s, 95), "p99_ms": percentile(s, 99),
        "max_ms": s[-1], "stdev_ms": std, "cv": std / mean if mean else 0.0,
    }


def time_fn(fn, warmup: int = 3, min_runs: int = 100, min_seconds: float = 10.0,
            max_seconds: float | None = None, sync=None) -> list[float]:
    """MLPerf SingleStream style: warm up, then run until both `min_runs` and `min_seconds`
    are met (or max_seconds passes). Returns every run's time in ms. `sync` (e.g.
    torch.cuda.synchronize) is called after each run so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    from lathe.bench.timing import seconds

    times = []
    start = time.perf_counter()
    while True:
        times.append(seconds(fn, sync) * 1e3)
        elapsed = time.perf_counter() - start
        if len(times) >= min_runs and elapsed >= min_seconds:
            break
        if max_seconds is not None and elapsed >= max_seconds and len(times) >= 3:
            break
    return times
