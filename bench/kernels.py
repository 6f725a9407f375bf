"""`lathe bench kernels`: lathe's CPU kernels against their anchors, measured in the same run.
int8 GEMM vs onnxruntime MatMulInteger / torch._int_mm, int4 GEMM vs onnxruntime MatMulNBits
(accuracy_level 4), int8 weight-only (W8A16) GEMM vs torch fp32 / onnxruntime, fused attention vs
torch SDPA (fp32 and bf16).

int8 GEMM: lathe's W8A8 linear (per-token activation quantization included) against the
faster of onnxruntime MatMulInteger (u8 x s8, MLAS; activations already quantized) and
torch._int_mm (int8 x int8; activations already quantized). Records: op, backend, M, K, N,
median_ms, gops (int ops counted as 2 per MAC), and, for lathe, the ratio to the best anchor
and the fraction of the machine's measured int8 peak.
"""
from __future__ import annotations

import sys
import time

import torch

INT8_SHAPES = [(m, k, n) for m in (1, 16, 128, 1024)
               for k, n in ((384, 1536), (1536, 384), (4096, 4096), (4096, 11008))]


def median_ms(fn, min_runs: int = 10, min_seconds: float = 0.3) -> float:
    from lathe.bench.stats import percentile, time_fn

    return percentile(sorted(time_fn(fn, warmup=2, min_runs=min_runs, min_seconds=min_seconds)), 50)


def _ort_matmul_integer(M, K, N, w_q):
    import numpy as np
    from lathe.export.validate import ort_session
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])
    b = helper.make_tensor("B", TensorProto.INT8, [K, N], w_q.t().contiguous().numpy().tobytes(), raw=True)
    y = helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mm", [a], [y], [b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_session(model)
    x = np.random.randint(0, 255, (M, K), dtype=np.uint8)
    return lambda: sess.run(None, {"A": x})


def int8_peak_gops() -> float | None:
    """This machine's int8 peak, from a VPDPBUSD loop with no memory traffic (if built)."""
    from lathe import _ext

    C = _ext.cpu()
    if C is None or not hasattr(C, "vnni_peak_gops"):
        return None
    return max(C.vnni_peak_gops(torch.get_num_threads()) for _ in range(3))


def amx_peak_gops() -> float | None:
    """This machine's AMX int8 peak, from a tile TDPBUSD loop with no memory traffic (None
    without AMX)."""
    from lathe import _ext
    from lathe.kernels import cpu

    C = _ext.cpu()
    if C is None or not hasattr(C, "amx_peak_gops") or cpu.isa_missing("amx"):
        return None
    return max(C.amx_peak_gops(torch.get_num_threads()) for _ in range(3))


def bench_int8(shapes=INT8_SHAPES, min_seconds: float = 0.3, progress=None) -> list[dict]:
    from lathe.kernels import cpu

    recs = []
    for i, (M, K, N) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(M, K, generator=g)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        ws = torch.rand(N, generator=g)
        p, c = cpu.int8_pack(w)
        ops = 2.0 * M * K * N
        runs = {"lathe": lambda: cpu.int8_linear(x, p, c, ws, None, N, "none", None, True),
                "onnxruntime MatMulInteger": _ort_matmul_integer(M, K, N, w)}
        if M > 16:  # torch._int_mm needs M > 16
            xi = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
            wt = w.t()
            runs["torch._int_mm"] = lambda: torch._int_mm(xi, wt)
        shape_recs = []
        for backend, fn in runs.items():
            ms = median_ms(fn, min_seconds=min_seconds)
            shape_recs.append({"op": "int8_gemm", "backend": backend, "M": M, "K": K, "N": N,
                               "median_ms": ms, "gops": ops / ms / 1e6})
        best = min(r["median_ms"] for r in shape_recs if r["backend"] != "lathe")
        for r in shape_recs:
            if r["backend"] == "lathe":
                r["ratio_vs_best_anchor"] = best / r["median_ms"]
        recs += shape_recs
        if progress:
            progress(i + 1, len(shapes))
    return recs


# ----------------------------------------------------------------------------- W8A16
# MiniLM's FFN (in, out) and a 7B-class decoder projection; M = decode (1), small batch,
# prefill-sized.
W8A16_SHAPES = [(384, 1536), (1536, 384), (4096, 4096)]
W8A16_MS = (1, 16, 128, 1024)


def _ort_session(nodes, inits, K: int, N: int, domains=("",)):
    from lathe.export.validate import ort_session
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "w8a16", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, 17 if d == "" else 1) for d in domains])
    return ort_session(model)


def _ort_matmul_fp32(w):
    """MatMul with the dequantized fp32 weight as an initializer (ORT's fp32 MLAS GEMM)."""
    from onnx import TensorProto, helper

    N, K = w.shape
    b = helper.make_tensor("B", TensorProto.FLOAT, [K, N], w.t().contiguous().numpy().tobytes(), raw=True)
    return _ort_session([helper.make_node("MatMul", ["A", "B"], ["Y"])], [b], K, N)


def _ort_matmulnbits8(q, scales):
    """com.microsoft MatMulNBits with bits=8 (u8 codes = q + 128, its default zero point), the
    per-channel scale repeated over blocks; accuracy_level=4 quantizes the activations to int8
    (different numerics from lathe's fp32 activations: an anchor for speed, not accuracy)."""
    import numpy as np
    from onnx import TensorProto, helper

    N, K = q.shape
    block = 128 if K % 128 == 0 else 32
    kb = -(-K // block)
    codes = np.full((N, kb * block), 128, np.uint8)
    codes[:, :K] = (q.numpy().astype(np.int16) + 128).astype(np.uint8)
    sc = np.repeat(scales.numpy().astype(np.float32).reshape(N, 1), kb, axis=1)
    inits = [helper.make_tensor("B", TensorProto.UINT8, [N, kb, block], codes.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [N * kb], sc.tobytes(), raw=True)]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=K, N=N,
                            bits=8, block_size=block, accuracy_level=4)
    return _ort_session([node], inits, K, N, domains=("", "com.microsoft"))


def _interleaved_ms(fns: dict, reps: int, rounds: int = 3, pause_s: float = 0.05) -> dict:
    """Median ms of each fn, timed in blocks of reps, round by round (as bench_cpu_int4: noise
    hits every backend alike, and a short pause lets the other runtime's spinning threads
    go idle before a block)."""
    import statistics

    from lathe.bench.timing import alternating

    times = alternating(fns, reps, rounds, pause_s)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def bench_w8a16(shapes=W8A16_SHAPES, ms=W8A16_MS, progress=None) -> list[dict]:
    """lathe's W8A16 kernel vs torch fp32 F.linear on the dequantized weight, onnxruntime fp32
    MatMul and onnxruntime MatMulNBits 8-bit. Records as bench_int8, plus weight_gbs (weight
    bytes read per second: int8 + scales for lathe and MatMulNBits, fp32 for the others) and,
    for lathe, ratio_vs_torch_fp32 and ratio_vs_best_anchor."""
    import torch.nn.functional as F

    from lathe.kernels.cpu_w8a16 import w8a16_linear, w8a16_pack
    from lathe.kernels.reference import dequant_int8

    recs, cases = [], [(K, N, M) for K, N in shapes for M in ms]
    for i, (K, N) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.rand(N, 1, generator=g) * 0.02 + 1e-3
        packed, w = w8a16_pack(q, s, 0), dequant_int8(q, s).contiguous()
        ort32, ort8 = _ort_matmul_fp32(w), _ort_matmulnbits8(q, s)
        wbytes = {"lathe": N * K + 4 * N, "lathe bf16": N * K + 4 * N, "onnxruntime MatMulNBits 8-bit": N * K + 4 * N}
        for M in ms:
            x = torch.randn(M, K, generator=g)
            xn = x.numpy()
            xb = x.bfloat16()
            fns = {"lathe": lambda: w8a16_linear(x, packed, N, 0),
                   "lathe bf16": lambda: w8a16_linear(xb, packed, N, 0),  # bf16 in/out (AVX512-BF16 body)
                   "torch fp32": lambda: F.linear(x, w),
                   "onnxruntime MatMul fp32": lambda: ort32.run(None, {"A": xn}),
                   "onnxruntime MatMulNBits 8-bit": lambda: ort8.run(None, {"A": xn})}
            res = _interleaved_ms(fns, reps=max(3, min(50, int(2e8 / (M * K * N)))))
            shape_recs = [{"op": "w8a16_gemm", "backend": b, "M": M, "K": K, "N": N, "median_ms": ms_,
                           "gops": 2.0 * M * K * N / ms_ / 1e6,
                           "weight_gbs": wbytes.get(b, 4 * N * K) / ms_ / 1e6} for b, ms_ in res.items()]
            lt = shape_recs[0]
            lt["ratio_vs_torch_fp32"] = res["torch fp32"] / res["lathe"]
            lt["ratio_vs_best_anchor"] = min(v for b, v in res.items() if not b.startswith("lathe")) / res["lathe"]
            shape_recs[1]["ratio_vs_ort_nbits8"] = res["onnxruntime MatMulNBits 8-bit"] / res["lathe bf16"]
            recs += shape_recs
            if progress:
                progress(len(recs) // len(fns), len(cases))
        del ort32, ort8
    return recs


def w8a16_table(recs: list[dict]) -> str:
    by = {}
    for r in recs:
        by.setdefault((r["M"], r["K"], r["N"]), {})[r["backend"]] = r
    names = ["lathe", "torch fp32", "onnxruntime MatMul fp32", "onnxruntime MatMulNBits 8-bit", "lathe bf16"]
    lines = [f"W8A16 GEMM (ms; lathe's speed-up over each; lathe bf16 = bf16 activations, level "
             f"{_active_isa()}; GB/s of weights read at M=1, threads={torch.get_num_threads()})",
             f"{'M':>5} {'K':>5} {'N':>5}  {'lathe':>8} {'torch32':>8} {'ort32':>8} {'ortNB8':>8}  "
             f"{'x torch32':>9} {'x ort32':>8} {'x ortNB8':>8}  {'bf16':>8} {'bf16 x ortNB8':>13}  "
             f"{'GB/s lathe':>10} {'torch32':>8}"]
    for (M, K, N), rs in by.items():
        t = [rs[n]["median_ms"] for n in names]
        gbs = f"{rs['lathe']['weight_gbs']:10.1f} {rs['torch fp32']['weight_gbs']:8.1f}" if M == 1 else ""
        lines.append(f"{M:5d} {K:5d} {N:5d}  {t[0]:8.3f} {t[1]:8.3f} {t[2]:8.3f} {t[3]:8.3f}  "
                     f"{t[1] / t[0]:8.2f}x {t[2] / t[0]:7.2f}x {t[3] / t[0]:7.2f}x  {t[4]:8.3f} {t[3] / t[4]:12.2f}x  {gbs}")
    return "\n".join(lines)


def _active_isa() -> str:
    from lathe.kernels import cpu

    return cpu.active_isa()


def table(recs: list[dict], peak: float | None, peak_loop: str = "a VPDPBUSD loop") -> str:
    lines = [f"{'op':10} {'M':>5} {'K':>5} {'N':>6}  {'lathe GOP/s':>11}  {'best anchor':>26}  {'anchor GOP/s':>12}  {'ratio':>6}  {'% peak':>6}"]
    by = {}
    for r in recs:
        by.setdefault((r["op"], r["M"], r["K"], r["N"]), []).append(r)
    for (op, M, K, N), rs in by.items():
        lt = next(r for r in rs if r["backend"] == "lathe")
        an = max((r for r in rs if r["backend"] != "lathe"), key=lambda r: r["gops"])
        pk = f"{100 * lt['gops'] / peak:5.1f}%" if peak else "   -"
        lines.append(f"{op:10} {M:5d} {K:5d} {N:6d}  {lt['gops']:11.0f}  {an['backend']:>26}  {an['gops']:12.0f}  "
                     f"{lt['ratio_vs_best_anchor']:5.2f}x  {pk:>6}")
    if peak:
        lines.append(f"int8 peak measured with {peak_loop}: {peak:.0f} GOP/s (ISA level {_active_isa()})")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    from lathe.bench.machine import describe

    ap = argparse.ArgumentParser(prog="lathe bench kernels",
                                 description="lathe's CPU kernels vs onnxruntime/torch in one run",
                                 epilog="example:\n  lathe bench kernels --json bench/results/kernels-cpu.json",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--min-seconds", type=float, default=0.3)
    a = ap.parse_args(argv)
    shapes = [s for s in INT8_SHAPES if not a.quick or s[1] * s[2] <= 1536 * 384]
    t0 = time.perf_counter()
    peak = int8_peak_gops()
    try:
        recs = bench_int8(shapes, a.min_seconds,
                          progress=lambda i, n: print(f"\rint8 gemm {i}/{n}", end="", file=sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(file=sys.stderr)
    amx_peak = amx_peak_gops()
    if amx_peak and _active_isa() == "amx":  # M >= amx_min_m runs on the tiles: % of their peak
        print(table(recs, amx_peak, "a tile TDPBUSD loop"))
        print(f"VNNI peak (VPDPBUSD loop): {peak:.0f} GOP/s")
    else:
        print(table(recs, peak))
    print()
    try:
        w8 = bench_w8a16(W8A16_SHAPES[:2] if a.quick else W8A16_SHAPES, W8A16_MS[:3] if a.quick else W8A16_MS,
                         progress=lambda i, n: print(f"\rw8a16 gemm {i}/{n}", end="", file=sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(file=sys.stderr)
    print(w8a16_table(w8))
    recs += w8
    print()
    # int4 weight-only vs onnxruntime MatMulNBits, and attention vs torch SDPA: their own
    # harnesses (alternating blocks of reps so neither runtime's spinning threads are timed).
    from lathe.bench import cpu_attention as bench_cpu_attention, cpu_int4 as bench_cpu_int4

    int4_rows = bench_cpu_int4.main(["--quick"] if a.quick else []) or []
    for r in int4_rows:
        for backend, key in (("lathe", "lathe_ms"), ("onnxruntime MatMulNBits", "ort_ms"), ("torch fp32", "torch_ms")):
            recs.append({"op": "int4_gemm", "backend": backend, "M": r["M"], "K": r["K"], "N": r["N"],
                         "block": r["block"], "median_ms": r[key],
                         "gops": 2.0 * r["M"] * r["K"] * r["N"] / r[key] / 1e6,
                         **({"ratio_vs_best_anchor": r["ort_ms"] / r["lathe_ms"]} if backend == "lathe" else {})})
    print()
    att_rows = bench_cpu_attention.run(reps=10 if a.quick else 30, budget_s=1.0 if a.quick else 3.0)
    print(bench_cpu_attention.format_table(att_rows))
    for name, dt, tl, ts, ratio, _, n in att_rows:
        recs.append({"op": "attention", "backend": "lathe", "shape": name, "dtype": dt, "median_ms": tl,
                     "ratio_vs_best_anchor": ratio, "n": n})
        recs.append({"op": "attention", "backend": "torch sdpa", "shape": name, "dtype": dt, "median_ms": ts, "n": n})
    if a.json:
        from pathlib import Path

        from lathe.io import atomic_file
        doc = {"schema_version": 1, "kind": "kernels", "machine": describe(), "int8_peak_gops": peak, "amx_peak_gops": amx_peak,
               "records": recs, "seconds": time.perf_counter() - t0}
        with atomic_file(Path(a.json)) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    return 0
