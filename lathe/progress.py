"""A small progress line for long work (calibration, distillation) on stderr: rewritten in place
on a terminal, one line every 10% otherwise (CI logs)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0, self.n, self.last = None, None, -1

    def __call__(self, i: int, n: int):
        now = time.perf_counter()
        if n != self.n or i == 1 or self.t0 is None:  # a new phase
            if self.n is not None and self.tty and self.last < self.n:
                self.stream.write("\n")
            self.t0, self.n, self.last = now, n, -1
        done = i / max(n, 1)
        eta = (now - self.t0) / max(i, 1) * (n - i)
        line = f"  {i}/{n} ({100 * done:.0f}%, {now - self.t0:.0f} s, about {eta:.0f} s left)"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if i >= n else ""))
        elif int(10 * done) > int(10 * max(self.last, 0) / max(n, 1)) or i >= n:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last = i
