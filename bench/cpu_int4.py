"""lathe's int4 CPU GEMM against onnxruntime's com.microsoft.MatMulNBits and torch fp32, in one run.

    python -m lathe.bench.cpu_int4 [--quick] [--sym] [--exact] [--reps R]

For each (K, N, block) one set of 4-bit codes, scales and zero points feeds all three: lathe
(int4_pack + int4_linear), a one-node ONNX model (A fp32 [M, K]; B uint8 [N, k_blocks,
block/2]; scales fp32 [N * k_blocks]; zero_points uint8 [N * ceil(k_blocks/2)] when asymmetric;
bits=4, accuracy_level=4, intra_op_num_threads=2) and torch.nn.functional.linear on the
dequantized fp32 weight. Timings are interleaved in blocks (a few rounds of: lathe reps, ORT
reps, torch reps, with a short pause before each block) so machine noise hits all of them
alike while neither runtime's spin-waiting worker threads steal the cores from the other
(ORT's pool and libgomp both spin after a call; rep-by-rep interleaving measured that
contention, not the kernels); the median (or --stat min) is reported. GOP/s counts 2*M*N*K. The SQNR columns
check both int4 kernels against the fp32 result (same codes, so they must agree).
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch

SHAPES = [(4096, 4096), (4096, 11008)]
BLOCKS = [32, 128]
MS = [1, 16, 128]


def make_weights(N: int, K: int, block: int, sym: bool, seed: int = 0):
    """Random lathe-int4 weights: qweight uint8 [N, K/2], scales fp32 [N, K/b], zeros [N, K/b]."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = torch.rand(N, K // block, generator=g) * 0.02 + 0.001
    zeros = (torch.full((N, K // block), 8, dtype=torch.uint8) if sym
             else torch.randint(0, 16, (N, K // block), dtype=torch.uint8, generator=g))
    return qweight, scales, zeros


def ort_session(qweight, scales, zeros, K: int, N: int, block: int, sym: bool, threads: int = 2):
    """One MatMulNBits node, built in memory; A has a symbolic row count."""
    from lathe.export.validate import ort_session as cpu_session
    from onnx import TensorProto, helper

    kb = K // block
    B = qweight.numpy().reshape(N, kb, block // 2)
    inits = [helper.make_tensor("B", TensorProto.UINT8, B.shape, B.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [N * kb],
                                scales.numpy().astype(np.float32).tobytes(), raw=True)]
    names = ["A", "B", "scales"]
    if not sym:
        z = zeros.numpy()
        if kb % 2:
            z = np.concatenate([z, np.zeros((N, 1), np.uint8)], axis=1)
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)  # low nibble = even block
        inits.append(helper.make_tensor("zero_points", TensorProto.UINT8, [zp.size],
                                        zp.tobytes(), raw=True))
        names.append("zero_points")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=K, N=N,
                            bits=4, block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return cpu_session(model, threads)


ROUNDS = 3  # blocks of reps a runtime, interleaved round by round
PAUSE_S = 0.05


def bench_case(M, K, N, block, sym, exact, reps, state, stat=statistics.median):
    from lathe.bench.timing import alternating
    from lathe.compress.formats import sqnr_db
    from lathe.kernels.cpu_int4 import int4_linear

    packed, sess, w = state
    x = torch.randn(M, K)
    xn = x.numpy()
    lathe_fn = lambda: int4_linear(x, packed, N, K, block, exact=exact)  # noqa: E731
    ort_fn = lambda: sess.run(None, {"A": xn})[0]  # noqa: E731
    torch_fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    ref = torch_fn()
    q_lathe = sqnr_db(ref, lathe_fn())
    q_ort = sqnr_db(ref, torch.from_numpy(ort_fn()))
    # blocks, a pause before each: the other runtime's spinning worker threads go idle
    t = alternating({"lathe": lathe_fn, "ort": ort_fn, "torch": (torch_fn, max(2, reps // 4))}, reps,
                    ROUNDS, PAUSE_S)
    tl, to, tt = t["lathe"], t["ort"], t["torch"]
    return {"M": M, "K": K, "N": N, "block": block,
            "lathe_ms": stat(tl) * 1e3, "ort_ms": stat(to) * 1e3,
            "torch_ms": stat(tt) * 1e3, "sqnr_lathe": q_lathe, "sqnr_ort": q_ort}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K=N=4096 only, fewer reps")
    ap.add_argument("--sym", action="store_true", help="symmetric weights (no zero_points input)")
    ap.add_argument("--exact", action="store_true", help="lathe's exact fp32 route")
    ap.add_argument("--reps", type=int, default=0, help="timed reps a case (default by size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic over the timed reps (min filters other processes' noise)")
    args = ap.parse_args(argv)

    from lathe.kernels import cpu
    from lathe.kernels.cpu_int4 import int4_pack
    from lathe.kernels.reference import dequant_int4

    torch.set_num_threads(args.threads)
    print(f"lathe int4 ({'exact fp32' if args.exact else 'int8 activations'}, ISA {cpu.active_isa()}) "
          f"vs onnxruntime MatMulNBits (accuracy_level=4) vs torch fp32; threads={args.threads}, "
          f"{'symmetric' if args.sym else 'asymmetric'} weights, {args.stat} of the reps; "
          f"load average {os.getloadavg()[0]:.2f}")
    hdr = (f"{'M':>4} {'K':>5} {'N':>6} {'blk':>4} | {'lathe ms':>9} {'GOP/s':>7} | {'ORT ms':>9} "
           f"{'GOP/s':>7} | {'torch ms':>9} {'GOP/s':>7} | {'lathe/ORT':>9} {'lathe/torch':>11} | "
           f"{'SQNR lathe':>10} {'ORT':>5}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for K, N in shapes:
        for block in BLOCKS:
            qw, sc, z = make_weights(N, K, block, args.sym)
            packed = int4_pack(qw, sc, None if args.sym else z, block)
            sess = ort_session(qw, sc, z, K, N, block, args.sym, args.threads)
            w = dequant_int4(qw, sc, z, block, K).float().contiguous()
            for M in MS:
                reps = args.reps or (max(3, 20 // M) if args.quick else max(4, 100 // max(M, 4)))
                r = bench_case(M, K, N, block, args.sym, args.exact, reps, (packed, sess, w),
                               min if args.stat == "min" else statistics.median)
                ops = 2.0 * M * N * K
                g = {k: ops / (r[k] * 1e-3) / 1e9 for k in ("lathe_ms", "ort_ms", "torch_ms")}
                r["ratio_ort"] = r["ort_ms"] / r["lathe_ms"]
                r["ratio_torch"] = r["torch_ms"] / r["lathe_ms"]
                rows.append(r)
                print(f"{M:>4} {K:>5} {N:>6} {block:>4} | {r['lathe_ms']:>9.3f} {g['lathe_ms']:>7.1f} | "
                      f"{r['ort_ms']:>9.3f} {g['ort_ms']:>7.1f} | {r['torch_ms']:>9.3f} "
                      f"{g['torch_ms']:>7.1f} | {r['ratio_ort']:>8.2f}x {r['ratio_torch']:>10.2f}x | "
                      f"{r['sqnr_lathe']:>10.1f} {r['sqnr_ort']:>5.1f}", flush=True)
            del sess, packed, w
    worst = min(rows, key=lambda r: r["ratio_ort"])
    print(f"lathe/ORT speed ratio: min {worst['ratio_ort']:.2f}x (M={worst['M']}, K={worst['K']}, "
          f"N={worst['N']}, block={worst['block']}), geomean "
          f"{float(np.exp(np.mean([np.log(r['ratio_ort']) for r in rows]))):.2f}x; "
          f"load average {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()
