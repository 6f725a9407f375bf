"""The timing core every benchmark uses: one timed call, a median over repeats, backends timed
alternately (so the noise of a shared machine hits each alike), and the run-until-enough loop
of `lathe bench` (bench.stats.time_fn). Wall clock: time.perf_counter."""
from __future__ import annotations

import statistics
import time


def seconds(fn, sync=None) -> float:
    """Wall time of one call of fn (sync, e.g. torch.cuda.synchronize, counts queued work)."""
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median ms of `reps` calls after `warmup` untimed ones (packing caches, allocator)."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(reps)) * 1e3


def alternating(fns: dict, reps: int, rounds: int = 3, pause_s: float = 0.0) -> dict:
    """{name: [seconds]} of each fn in fns ({name: fn or (fn, reps)}), timed in blocks of reps,
    round by round: a short pause lets another runtime's spinning threads go idle before a
    block, and one untimed call warms each block up."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            fn, n = f if isinstance(f, tuple) else (f, reps)
            time.sleep(pause_s)
            fn()
            times[name].extend(seconds(fn) for _ in range(n))
    return times


def paired(fa, fb, n: int) -> tuple[list, list]:
    """n alternating calls of fa then fb: their times side by side (seconds)."""
    ta, tb = [], []
    for _ in range(n):
        ta.append(seconds(fa))
        tb.append(seconds(fb))
    return ta, tb
