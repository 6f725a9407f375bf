"""lathe's GPU kernels against their anchors, timed in the same run (needs a CUDA GPU).

    python -m lathe.bench.gpu_kernels --out bench/results [--quick] [--only w4a16 ...]

Writes <out>/gpu-<device>.json and .md (atomically). Each row times lathe's kernel and its
anchor alternately (two rounds of triton.testing.do_bench medians, the lower kept), after a
warm-up that brings the GPU to its clocks, and names the kernel path that ran. Targets (issue
#15, one H200):
  copy       torch copy_ of 1 GiB: the measured bandwidth the GEMV figures are set against
  w4a16      int4 g128 vs fp16 cuBLAS (x @ w16.T): M <= 16 >= 3.0x and >= 70% of copy
             bandwidth; 16 < M <= 256 >= 1.5x; M >= 1024 >= 0.95x
  w8a8       per-token x per-channel int8, x quantization counted, vs fp16 cuBLAS >= 1.6x, and
             vs torch._int_mm + the same scaling >= 1.0x
  fp8        e4m3 rowwise (x pre-quantized) vs bf16 cuBLAS >= 1.5x, vs torch._scaled_mm
             rowwise >= 0.9x
  attention  bf16 vs SDPA >= 1.0x at every shape, >= 500 TFLOP/s at hd128 S >= 4k; decode
             q = 1 against 4k-32k keys vs SDPA
Without a CUDA GPU it prints one line and returns 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _pair(lathe_fn, anchor_fn):
    """(lathe ms, anchor ms): interleaved, two rounds, the lower median of each."""
    a, b = [], []
    for _ in range(2):
        b.append(_bench(anchor_fn))
        a.append(_bench(lathe_fn))
    return min(a), min(b)


def _warm_up(seconds=1.0):
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()


def _row(op, shape, kernel, anchor, ms, anchor_ms, target=None, **extra):
    r = {"op": op, **shape, "kernel": kernel, "anchor": anchor, "ms": ms, "anchor_ms": anchor_ms,
         "speedup": anchor_ms / ms, **extra}
    if target is not None:
        r["target"] = target
        r["meets"] = r["speedup"] >= target
    return r


def bench_copy(quick):
    n = (256 if quick else 1024) << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    yield {"op": "copy", "bytes": n, "kernel": "torch copy_", "ms": ms, "gbps": 2 * n / ms / 1e6}


W4_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # (K, N)


def bench_w4a16(quick, copy_gbps):
    from lathe.kernels import cuda_ops
    from lathe.kernels.triton_kernels import qmatmul as Q

    g, dt = 128, torch.float16
    has_cuda_ext = _has_cuda_ext()
    for K, N in W4_SHAPES[:2] if quick else W4_SHAPES:
        qw = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
        sc = (torch.rand(N, K // g, device="cuda") * 0.01).to(dt)
        z = torch.randint(0, 16, (N, K // g), device="cuda", dtype=torch.uint8)
        w16 = Q.dequantize_int4(qw, sc, z, g, dt)
        for M in ([1, 16, 256, 4096] if quick else [1, 4, 16, 64, 256, 1024, 4096]):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            shape = {"M": M, "K": K, "N": N}
            target = 3.0 if M <= 16 else 1.5 if M <= 256 else 0.95 if M >= 1024 else None
            w_bytes = N * K // 2 + N * (K // g) * 3
            chosen = Q.weight_only_path(M, N, 4, x.device)
            runs = [(f"triton:{chosen}", lambda: Q.w4a16_linear(x, qw, sc, z, g))]
            if M >= 256:  # both large-M paths, to place DEQUANT_MIN_M
                other = "gemm" if chosen == "dequant+cublas" else "dequant+cublas"
                runs.append((f"triton:{other} (forced)",
                             lambda other=other: Q.w4a16_linear(x, qw, sc, z, g, path=other)))
            if has_cuda_ext and M <= 16:
                runs.append(("cuda:w4a16_gemv", lambda: cuda_ops.w4a16_linear(x, qw, sc, z, g)))
            for kernel, fn in runs:
                ms, base = _pair(fn, lambda: x @ w16.t())
                yield _row("w4a16", shape, kernel, "fp16 cuBLAS", ms, base, target,
                           weight_gbps=w_bytes / ms / 1e6,
                           copy_fraction=(w_bytes / ms / 1e6) / copy_gbps if copy_gbps else None)


def bench_w8a8(quick):
    from lathe.kernels.triton_kernels import qmatmul as Q

    dt = torch.float16
    for K, N in [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008), (8192, 8192)]:
        w_q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        w_s = torch.rand(N, device="cuda") * 0.01
        w16 = torch.randn(N, K, device="cuda", dtype=dt)
        for M in [512, 8192] if quick else [512, 2048, 8192]:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            shape = {"M": M, "K": K, "N": N}
            lathe = lambda: Q.w8a8_linear(x, w_q, w_s)  # noqa: E731 - quantizes x per token

            def int_mm():
                q, s = Q.quantize_per_token_int8(x)
                return (torch._int_mm(q, w_q.t()).float() * s[:, None] * w_s).to(dt)

            ms, base = _pair(lathe, lambda: x @ w16.t())
            yield _row("w8a8", shape, "triton:quant+scaled_mm", "fp16 cuBLAS", ms, base, 1.6,
                       tflops=2 * M * N * K / ms / 1e9)
            ms, base = _pair(lathe, int_mm)
            yield _row("w8a8", shape, "triton:quant+scaled_mm", "lathe quant + torch._int_mm + scaling",
                       ms, base, 1.0)


def bench_fp8(quick):
    from lathe.kernels.triton_kernels import qmatmul as Q

    if torch.cuda.get_device_capability() < (8, 9):
        return
    for K, N in [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008), (8192, 8192)]:
        w8, sw = Q.quantize_fp8(torch.randn(N, K, device="cuda"))
        wbf = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        for M in [512, 8192] if quick else [512, 2048, 8192]:
            x8, sx = Q.quantize_fp8(torch.randn(M, K, device="cuda"))
            xbf = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            shape = {"M": M, "K": K, "N": N}
            lathe = lambda: Q.fp8_linear(x8, w8, sx, sw, out_dtype=torch.bfloat16)  # noqa: E731
            ms, base = _pair(lathe, lambda: xbf @ wbf.t())
            yield _row("fp8", shape, "triton:scaled_mm", "bf16 cuBLAS", ms, base, 1.5,
                       tflops=2 * M * N * K / ms / 1e9)
            sa, sb = sx[:, None].contiguous(), sw[None, :].contiguous()
            try:
                ms, base = _pair(lathe, lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb,
                                                                  out_dtype=torch.bfloat16))
            except RuntimeError as e:  # rowwise scaling needs a recent torch + sm_90
                print(f"  fp8 {shape}: torch._scaled_mm rowwise unavailable ({str(e).splitlines()[0]})")
                continue
            yield _row("fp8", shape, "triton:scaled_mm", "torch._scaled_mm rowwise", ms, base, 0.9)


def bench_attention(quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lathe.kernels.triton_kernels import attention as A

    B, H, dt = 4, 16, torch.bfloat16
    for D in [128] if quick else [64, 128]:
        for S in [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]:
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dt) for _ in range(3))
            for causal in (False, True):
                flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)

                def sdpa():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                ms, base = _pair(lambda: A.flash_attention(q, k, v, causal=causal), sdpa)
                shape = {"B": B, "H": H, "S": S, "D": D, "causal": causal}
                yield _row("attention", shape, "triton:flash_fwd", "SDPA", ms, base, 1.0,
                           tflops=flops / ms / 1e9, tflops_target=500 if D == 128 and S >= 4096 else None)
    # Decode: one query per head against a long cache (GQA 32/8, hd128).
    Hq, Hkv, D = 32, 8, 128
    for Sk in [4096, 32768] if quick else [4096, 16384, 32768]:
        for Bd in (1, 4):
            q = torch.randn(Bd, Hq, 1, D, device="cuda", dtype=dt)
            k, v = (torch.randn(Bd, Hkv, Sk, D, device="cuda", dtype=dt) for _ in range(2))
            kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)

            anchors = {"SDPA (KV repeated to Hq)":
                       lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr)}
            try:  # GQA inside SDPA reads each KV head once (torch >= 2.5)
                torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                anchors["SDPA enable_gqa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, enable_gqa=True)
            except (TypeError, RuntimeError):
                pass
            best = min(anchors, key=lambda n: _bench(anchors[n]))  # the faster anchor
            kv_bytes = 2 * Bd * Hkv * Sk * D * 2
            for kernel, fn in (("triton:flash_decode (split-K)", lambda: A.flash_attention(q, k, v)),
                               ("cuda:decode_attention", _cuda_decode(q, k, v))):
                if fn is None:
                    continue
                ms, base = _pair(fn, anchors[best])
                yield _row("attention-decode", {"B": Bd, "Hq": Hq, "Hkv": Hkv, "Sk": Sk, "D": D},
                           kernel, best, ms, base, 1.0, kv_gbps=kv_bytes / ms / 1e6)


def _cuda_decode(q, k, v):
    """lathe's CUDA decode kernel on q [B, Hq, 1, D], or None without the extension."""
    if not _has_cuda_ext():
        return None
    from lathe.kernels import cuda_ops

    q3 = q[:, :, 0].contiguous()
    return lambda: cuda_ops.decode_attention(q3, k, v)


def _has_cuda_ext() -> bool:
    from lathe import _ext

    return _ext.cuda() is not None


def _device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _fmt(r) -> str:
    skip = {"op", "kernel", "anchor", "ms", "anchor_ms", "speedup", "target", "meets"}
    shape = " ".join(f"{k}={v}" for k, v in r.items()
                     if k not in skip and v is not None and not isinstance(v, float))
    rates = " ".join(f"{k}={v:.3g}" for k, v in r.items() if k not in skip and isinstance(v, float))
    if r["op"] == "copy":
        return f"| copy | {shape} | {r['kernel']} | | {r['ms']:.4f} | | | {rates} |"
    meets = "" if "target" not in r else ("yes" if r["meets"] else "**no**")
    tgt = f">= {r['target']}x {meets}" if "target" in r else ""
    return (f"| {r['op']} | {shape} | {r['kernel']} | {r['anchor']} | {r['ms']:.4f} | "
            f"{r['anchor_ms']:.4f} | {r['speedup']:.2f}x | {tgt} {rates} |")


def write(records, meta, out: Path):
    from lathe.io import atomic_file

    slug = meta["device_slug"]
    with atomic_file(out / f"gpu-{slug}.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    lines = [f"# lathe GPU kernels on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
             f"{meta['seconds']:.0f} s. Timings: triton.testing.do_bench medians, lathe and its "
             "anchor alternately in one run (two rounds, lower median kept).", "",
             "| op | shape | lathe kernel | anchor | ms | anchor ms | speed-up | target / rates |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_fmt(r) for r in records]
    missed = [r for r in records if r.get("meets") is False]
    lines += ["", f"{len(missed)} of {sum('meets' in r for r in records)} rows miss their target."]
    with atomic_file(out / f"gpu-{slug}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for gpu-<device>.{json,md}")
    p.add_argument("--quick", action="store_true", help="a few shapes per op (a smoke run)")
    p.add_argument("--only", action="append", choices=["w4a16", "w8a8", "fp8", "attention"],
                   help="run only these (repeatable); copy always runs")
    p.add_argument("--budget", type=float, default=0, metavar="S",
                   help="stop starting new rows after S seconds (0: no limit); what ran is written")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA GPU found; nothing was run")
        return 2
    import triton

    t0 = time.time()
    meta = {"device": torch.cuda.get_device_name(), "device_slug": _device_slug(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability())}
    print(f"# {meta}", flush=True)
    _warm_up()
    records = list(bench_copy(a.quick))
    copy_gbps = records[0]["gbps"]
    print(_fmt(records[0]), flush=True)
    benches = {"w4a16": lambda: bench_w4a16(a.quick, copy_gbps), "w8a8": lambda: bench_w8a8(a.quick),
               "fp8": lambda: bench_fp8(a.quick), "attention": lambda: bench_attention(a.quick)}
    cut = False
    for name in a.only or list(benches):
        if cut:
            break
        try:
            for r in benches[name]():
                if a.budget and time.time() - t0 > a.budget:
                    print(f"budget of {a.budget:.0f} s spent: stopping at {name}", flush=True)
                    meta["cut_at"] = name
                    cut = True
                    break
                print(_fmt(r), flush=True)
                records.append(r)
        except Exception as e:  # noqa: BLE001 - one broken op must not hide the others' numbers
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            records.append({"op": name, "error": f"{type(e).__name__}: {e}"[:2000]})
    meta["seconds"] = time.time() - t0
    write([r for r in records if "error" not in r], {**meta, "errors": [r for r in records if "error" in r]}, a.out)
    print(f"wrote {a.out}/gpu-{meta['device_slug']}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
