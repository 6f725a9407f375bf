"""GPU benchmark of lathe's Triton kernels against PyTorch (needs a CUDA GPU).

    python -m lathe.kernels.triton_kernels.bench_gpu [--json out.json] [--quick]

  attention  lathe flash_attention vs torch SDPA (flash backend), bf16, B=4, H=16, D 64/128,
             S 1k..16k, causal and not: TFLOP/s with FLOPs = 4*B*H*S*S*D (halved when causal)
  w4a16      lathe int4 (g=128) vs torch fp16 matmul, M 1..16, (K, N) 4096x4096, 4096x11008,
             8192x8192: GB/s of each one's own traffic, and the speed-up over fp16
  w8a8       lathe int8 (with and without the dynamic quantization of x) vs torch fp16 matmul
             (and torch._int_mm), M 256..4096: TFLOP/s (TOP/s for int8)
Timings are triton.testing.do_bench medians (L2 flushed between runs). Without a CUDA GPU it
prints one line and returns 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list here")
    p.add_argument("--quick", action="store_true", help="a few shapes only (a smoke run)")
    p.add_argument("--only", choices=["attention", "w4a16", "w8a8"], action="append",
                   help="run only these benchmarks (repeatable)")
    return p.parse_args(argv)


def _bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _attention(quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .attention import flash_attention

    B, H, dtype = 4, 16, torch.bfloat16
    seqs = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    for D in ([128] if quick else [64, 128]):
        for S in seqs:
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
            for causal in (False, True):
                flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)

                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                for backend, fn in (("lathe_triton", lambda: flash_attention(q, k, v, causal=causal)),
                                    ("torch_sdpa_flash", sdpa)):
                    ms = _bench(fn)
                    yield {"op": "attention", "backend": backend, "B": B, "H": H, "S": S, "D": D,
                           "causal": causal, "dtype": str(dtype)[6:], "median_ms": ms,
                           "tflops": flops / ms / 1e9}


_MATMUL_SHAPES = [(4096, 4096), (4096, 11008), (8192, 8192)]  # (K, N)


def _w4a16(quick):
    from .qmatmul import w4a16_linear

    g, dtype = 128, torch.float16
    for K, N in (_MATMUL_SHAPES[:1] if quick else _MATMUL_SHAPES):
        qweight = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
        scales = torch.rand(N, K // g, device="cuda", dtype=dtype) * 0.01
        zeros = torch.randint(0, 16, (N, K // g), device="cuda", dtype=torch.uint8)
        w16 = torch.randn(N, K, device="cuda", dtype=dtype)
        for M in ([1, 16] if quick else [1, 2, 4, 8, 16]):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            io = 2 * M * K + 2 * M * N
            b_int4 = N * K // 2 + N * (K // g) * 3 + io  # codes + fp16 scales + uint8 zeros
            b_fp16 = 2 * N * K + io
            t_fp16 = _bench(lambda: x @ w16.t())
            t_int4 = _bench(lambda: w4a16_linear(x, qweight, scales, zeros, g))
            shape = {"M": M, "N": N, "K": K, "group_size": g, "dtype": "float16"}
            yield {"op": "w4a16", "backend": "torch_fp16_matmul", **shape, "median_ms": t_fp16,
                   "gbps": b_fp16 / t_fp16 / 1e6}
            yield {"op": "w4a16", "backend": "lathe_triton", **shape, "median_ms": t_int4,
                   "gbps": b_int4 / t_int4 / 1e6, "speedup_vs_fp16": t_fp16 / t_int4}


def _w8a8(quick):
    from .qmatmul import quantize_per_token_int8, w8a8_linear

    dtype = torch.float16
    for K, N in (_MATMUL_SHAPES[:1] if quick else _MATMUL_SHAPES):
        w_q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        w_s = torch.rand(N, device="cuda") * 0.01
        w16 = torch.randn(N, K, device="cuda", dtype=dtype)
        for M in ([256, 4096] if quick else [256, 512, 1024, 2048, 4096]):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            q, s = quantize_per_token_int8(x)
            runs = [("torch_fp16_matmul", lambda: x @ w16.t()),
                    ("lathe_triton", lambda: w8a8_linear(x, w_q, w_s)),
                    ("lathe_triton_prequantized", lambda: w8a8_linear(q, w_q, w_s, x_scale=s,
                                                                      out_dtype=dtype))]
            if hasattr(torch, "_int_mm"):
                runs.append(("torch_int_mm", lambda: torch._int_mm(q, w_q.t())))
            t_fp16 = None
            for backend, fn in runs:
                try:
                    ms = _bench(fn)
                except RuntimeError as e:  # e.g. _int_mm shape limits
                    print(f"  {backend} M={M} N={N} K={K}: skipped ({str(e).splitlines()[0]})")
                    continue
                t_fp16 = ms if t_fp16 is None else t_fp16
                yield {"op": "w8a8", "backend": backend, "M": M, "N": N, "K": K, "dtype": "float16",
                       "median_ms": ms, "tflops": 2 * M * N * K / ms / 1e9,
                       "speedup_vs_fp16": t_fp16 / ms}


def _fmt(r) -> str:
    keys = [k for k in r if k not in ("op", "backend", "median_ms", "tflops", "gbps", "speedup_vs_fp16")]
    shape = " ".join(f"{k}={r[k]}" for k in keys)
    rate = f"{r['tflops']:8.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:8.1f} GB/s"
    sp = f"  x{r['speedup_vs_fp16']:.2f}" if "speedup_vs_fp16" in r else ""
    return f"{r['op']:9s} {r['backend']:26s} {shape:48s} {r['median_ms']:9.4f} ms {rate}{sp}"


def main(argv=None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU found; these benchmarks need one (nothing was run)")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_gpu: triton is not installed (pip install 'lathe[triton]')")
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    wanted = args.only or ["attention", "w4a16", "w8a8"]
    benches = {"attention": _attention, "w4a16": _w4a16, "w8a8": _w8a8}
    records = []
    for name in wanted:
        for rec in benches[name](args.quick):
            print(_fmt(rec), flush=True)
            records.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
