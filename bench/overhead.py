"""Per-op Python overhead: what a lathe op call costs on top of the kernel it runs, measured on
tiny tensors (the kernel's own time is then a few microseconds) so the dispatch, argument
checks and wrappers dominate. For each op: the module's forward (QLinear*), the op
(torch.ops.lathe.*), and the backend's kernel function called directly with the same
prepared arguments, timed alternately in blocks (the machine may be shared), the fastest block
kept (timeit's rule: noise only adds time); overhead = op - kernel. Target: <= 10 us an op (issue #16).

    lathe bench overhead [--json FILE] [--blocks 30] [--calls 200]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from typing import Optional

import torch

TARGET_US = 10.0


def _cases(M: int = 1, K: int = 128, N: int = 128):
    """(name, module forward, op call, direct kernel call) on tiny CPU tensors, fp32."""
    from lathe.compress.modules import QLinearFP8, QLinearW4A16, QLinearW8A8, QLinearW8A16
    from lathe.kernels import cpu, cpu_attention, cpu_int4, cpu_w8a16, reference
    from lathe.kernels.dispatch import backend_for

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / K ** 0.5)
    x = torch.randn(1, M, K, generator=g)
    ops = torch.ops.lathe
    out = []

    m = QLinearW8A8.from_linear(lin).prepare(torch.float32)
    direct = (lambda: cpu.int8_linear(x, m._packed, m._colsum, m.weight_scale, m.bias, N, "none", None, True)) \
        if backend_for("linear_w8a8", "cpu") == "cpu" else None
    out.append(("linear_w8a8", lambda: m(x), lambda: ops.linear_w8a8(
        x, m.weight, m.weight_scale, m.bias, "none", None, True, m._packed, m._colsum), direct))

    m4 = QLinearW4A16.from_linear(lin, group_size=128).prepare(torch.float32)
    direct = None
    if m4._packed is not None:
        p = dict(zip(("codes", "scales", "zeros"), m4._packed))
        direct = lambda: cpu_int4.int4_linear(x, p, N, K, 128, m4.bias)  # noqa: E731
    out.append(("linear_w4a16", lambda: m4(x), lambda: ops.linear_w4a16(
        x, m4.qweight, m4.scales, m4.zeros, 128, m4.bias, *m4._packed), direct))

    m8 = QLinearW8A16.from_linear(lin).prepare(torch.float32)
    direct = (lambda: cpu_w8a16.w8a16_linear(x, m8._packed, N, 0, m8.bias)) if m8._packed is not None else None
    out.append(("linear_w8a16", lambda: m8(x), lambda: ops.linear_w8a16(
        x, m8.qweight, m8.scales, m8.bias, 0, m8._packed), direct))

    mf = QLinearFP8.from_linear(lin).prepare(torch.float32)
    out.append(("linear_fp8", lambda: mf(x), lambda: ops.linear_fp8(
        x, mf.weight, mf.weight_scale, mf.bias, "per_token"),
        lambda: reference.linear_fp8(x, mf.weight, mf.weight_scale, mf.bias, "per_token")))

    q = torch.randn(1, 4, 1, 32, generator=g)
    k = torch.randn(1, 2, 16, 32, generator=g)
    mask = torch.ones(1, 16, dtype=torch.bool)
    direct = (lambda: cpu_attention.attention(q, k, k, mask, False, None)) \
        if backend_for("attention", "cpu") == "cpu" else None
    out.append(("attention", None, lambda: ops.attention(q, k, k, mask, False, None), direct))
    return out


_NOOP = None


def _noop_op():
    """An empty torch.library.custom_op with a lathe-like signature: the floor every lathe op
    pays for the custom-op machinery (autograd wrapper, redispatch, aliasing check)."""
    global _NOOP
    if _NOOP is None:
        @torch.library.custom_op("lathe_bench::noop", mutates_args=())
        def noop(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, b: Optional[torch.Tensor],
                 act: str) -> torch.Tensor:
            return torch.empty(0)
        _NOOP = noop
    return _NOOP


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e6 / calls


def measure(blocks: int = 30, calls: int = 200, threads: int = 1) -> list[dict]:
    """One thread by default: the overhead is single-threaded Python, and the kernels' thread
    pool on a busy machine would only add noise."""
    rows = []
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(blocks, calls, rows)
    finally:
        torch.set_num_threads(prev)


def _measure(blocks, calls, rows):
    x1 = torch.ones(4)
    noop = _noop_op()
    with torch.inference_mode():
        for name, module, op, direct in _cases():
            fns = {"module": module, "op": op, "kernel": direct}
            fns = {k: f for k, f in fns.items() if f is not None}
            for f in fns.values():  # warm-up (first-call caches, lazy imports)
                _per_call_us(f, 20)
            samples = {k: [] for k in fns}
            for _ in range(blocks):  # interleaved: each block times every variant once
                for k, f in fns.items():
                    samples[k].append(_per_call_us(f, calls))
            med = {k: min(v) for k, v in samples.items()}
            med["torch_add"] = min(  # one tiny eager torch op: the machine's unit
                _per_call_us(lambda: torch.add(x1, x1), calls) for _ in range(blocks))
            med["custom_op_floor"] = min(
                _per_call_us(lambda: noop(x1, x1, x1, None, "none"), calls) for _ in range(blocks))
            row = {"op": name, **{f"{k}_us": v for k, v in med.items()}}
            if "kernel" in med:
                row["overhead_us"] = med["op"] - med["kernel"]
                row["meets_target"] = row["overhead_us"] <= TARGET_US
                row["overhead_in_torch_ops"] = row["overhead_us"] / med["torch_add"]
            rows.append(row)
    return rows


def table(rows) -> str:
    lines = [f"{'op':14} {'module us':>10} {'op us':>8} {'kernel us':>10} {'overhead us':>12} "
             f"{'= torch ops':>11}  target <= {TARGET_US:g} us"]
    for r in rows:
        def f(k):
            return f"{r[k]:.1f}" if k in r else "-"
        ok = "" if "meets_target" not in r else ("ok" if r["meets_target"] else "MISSED")
        unit = f"{r['overhead_in_torch_ops']:.1f}x" if "overhead_in_torch_ops" in r else "-"
        lines.append(f"{r['op']:14} {f('module_us'):>10} {f('op_us'):>8} {f('kernel_us'):>10} "
                     f"{f('overhead_us'):>12} {unit:>11}  {ok}")
    lines.append("(= torch ops: the overhead in units of one tiny eager torch.add on this machine, "
                 f"{rows[0]['torch_add_us']:.1f} us here; an empty torch.library.custom_op costs "
                 f"{rows[0]['custom_op_floor_us']:.1f} us here: the floor of every op's overhead)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lathe bench overhead", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args(argv)
    rows = measure(a.blocks, a.calls)
    print(table(rows))
    if a.json:
        from lathe.bench.machine import describe
        from lathe.io import atomic_file

        with atomic_file(Path(a.json)) as tmp:
            tmp.write_text(json.dumps({"kind": "overhead", "machine": describe(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
