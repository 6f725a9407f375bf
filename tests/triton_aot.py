"""Ahead-of-time compile of every lathe Triton kernel, with every autotune config it can pick,
for GPU targets, on a machine without a GPU (triton ships its own ptxas).

Run as a script in a fresh process (the kernel modules read TRITON_INTERPRET and
LATHE_TRITON_AUTOTUNE once, at import, to choose their config lists):
    python tests/triton_aot.py --arch 90 [--only qmatmul]
It prints one JSON object: {"compiled": n, "failed": [{"case", "config", "error"}...]}.
tests/test_triton_aot.py runs it per arch (and under another python with LATHE_AOT_PYTHON,
e.g. a venv holding the triton that the GPU image ships).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
# Every config; --fixed checks the one config each kernel runs under pytest instead (it must
# fit the shared memory of every arch).
os.environ["LATHE_TRITON_AUTOTUNE"] = "0" if "--fixed" in sys.argv else "1"

ARCHS = (80, 89, 90)
# Shared memory a block may use (opt-in maximum), bytes: A100, Ada (L4/4090), H100/H200.
SMEM_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _unwrap(kernel):
    """(JITFunction, autotuner or None)."""
    import triton

    fn, tuner = kernel, None
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if tuner is None and hasattr(fn, "configs"):
            tuner = fn
        fn = fn.fn
    return fn, tuner


def configs_of(kernel, consts: dict, launches=None, arch: int = 90):
    """[(constexpr overrides, num_warps, num_stages)]: the autotuner's configs after its early
    prune (which sees the constexprs as named args), or the given launches of a plain kernel."""
    _, tuner = _unwrap(kernel)
    if tuner is None:
        return [({}, w, s) for w, s in (launches or [(4, 1)])]
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if prune:
        configs = prune(configs, {**consts, "__smem_limit__": SMEM_LIMIT[arch]})
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def compile_one(kernel, sig: dict, consts: dict, arch: int, warps: int, stages: int):
    """Compile to a cubin for sm_<arch>. Pointers (and stride_* ints) are marked 16-divisible,
    as the runtime specialises them for torch allocations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, _ = _unwrap(kernel)
    full = {n: "constexpr" if n in consts else sig.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if full[n].startswith("*") or n.startswith("stride_")}
    k = triton.compile(ASTSource(fn, full, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps, "num_stages": stages})
    assert k.asm["cubin"], "empty cubin"
    return k


def cases(arch: int):
    """(name, kernel, signature, constexprs, launches for plain kernels) for one arch: each
    kernel in the specialisations the wrappers launch."""
    from lathe.kernels.triton_kernels import attention as A
    from lathe.kernels.triton_kernels import qmatmul as Q

    out = []
    types = ["*i8"] + (["*fp8e4nv"] if arch >= 89 else [])
    for xt in types:
        fp8 = xt != "*i8"
        for even in (True, False):
            out.append((f"scaled_mm[{xt[1:]}{'' if even else ',ragged-K'}]", Q._scaled_mm_kernel,
                        dict(X=xt, W=xt, SX="*fp32", SW="*fp32", Bias="*fp32", Y="*bf16"),
                        dict(HAS_BIAS=True, ACT=1, IS_FP8=fp8, EVEN_K=even), None))
    for fp8 in (False, True) if arch >= 89 else (False,):
        qt = "*fp8e4nv" if fp8 else "*i8"
        out.append((f"quant_rows[{qt[1:]}]", Q._quant_rows_kernel,
                    dict(X="*bf16", Smooth="*fp32", Q=qt, S="*fp32"),
                    dict(HAS_SMOOTH=not fp8, BLOCK_K=4096, ONE_PASS=True, FP8=fp8), [(8, 1)]))
        out.append((f"quant_rows[{qt[1:]},two-pass]", Q._quant_rows_kernel,
                    dict(X="*fp16", Smooth="*fp32", Q=qt, S="*fp32"),
                    dict(HAS_SMOOTH=False, BLOCK_K=8192, ONE_PASS=False, FP8=fp8), [(8, 1)]))
    for kname, kern, ydt in (("wo_decode", Q._wo_decode, "*fp16"), ("wo_splitk", Q._wo_splitk, "*fp32"),
                             ("wo_gemm", Q._wo_gemm, "*bf16")):
        # g32 only for the decode kernel: its prune clamps BLOCK_K further than g128 does.
        for bits, g in ((4, 128), (4, 32), (8, 1024)) if kname == "wo_decode" else ((4, 128), (8, 1024)):
            xt = "*bf16" if ydt == "*bf16" else "*fp16"
            sig = dict(X=xt, QW="*i32" if bits == 4 else "*i8", S=xt, Z="*u8", Bias=xt, Y=ydt)
            for even in (True, False) if kname == "wo_decode" and g == 128 else (True,):
                out.append((f"{kname}[int{bits},g{g}{'' if even else ',ragged-K'}]", kern, sig,
                            dict(BITS=bits, HAS_ZERO=bits == 4, HAS_BIAS=True, GROUP_SIZE=g,
                                 DOT_PREC="tf32", GROUP_M=8, EVEN_K=even), None))
    for even in (True, False):
        out.append((f"dequant_int4[{'even' if even else 'ragged'}-K]", Q._dequant_int4_kernel,
                    dict(QW="*i32", S="*fp16", Z="*u8", W="*fp16"),
                    dict(HAS_ZERO=True, GROUP_SIZE=128, BLOCK_N=64, BLOCK_K=256, EVEN_K=even), [(4, 1)]))
    for dt, D, causal, mask, varlen in (("bf16", 128, True, False, False), ("fp16", 64, False, True, False),
                                        ("fp16", 96, True, False, True), ("bf16", 256, False, False, False)):
        sig = dict(Q="*" + dt, K="*" + dt, V="*" + dt, O="*" + dt, Mask="*u8", CuQ="*i32",
                   CuK="*i32", qk_scale="fp32")
        out.append((f"attn_fwd[{dt},d{D},{'causal' if causal else 'full'}{',varlen' if varlen else ''}]",
                    A._attn_fwd_kernel, sig,
                    dict(HEAD_DIM=D, BLOCK_D=A._block_d(D), IS_CAUSAL=causal, HAS_MASK=mask,
                         IS_VARLEN=varlen, DOT_PREC="tf32"), None))
    for D, G in ((128, 16), (64, 16)):
        out.append((f"decode_partial[d{D}]", A._decode_partial_kernel,
                    dict(Q="*bf16", K="*bf16", V="*bf16", Mask="*u8", Opart="*fp32", Lse="*fp32",
                         qk_scale="fp32"),
                    dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_G=G, HAS_MASK=True, DOT_PREC="tf32"), None))
    out.append(("decode_reduce", A._decode_reduce_kernel, dict(Opart="*fp32", Lse="*fp32", O="*bf16"),
                dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16), [(4, 1)]))
    return out


def run(arch: int, only: str | None = None) -> dict:
    """Compile every config of every case. A config whose shared memory exceeds the arch's
    limit compiles but cannot launch (the autotuner skips it there): it is listed under
    `oversized`, and a case where no config fits is a failure."""
    compiled, failed, oversized = 0, [], []
    for name, kernel, sig, consts, launches in cases(arch):
        if only and only not in name:
            continue
        fits = 0
        for over, warps, stages in configs_of(kernel, consts, launches, arch):
            cfg = f"{over} warps={warps} stages={stages}"
            try:
                k = compile_one(kernel, sig, {**consts, **over}, arch, warps, stages)
                compiled += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
                failed.append({"case": name, "config": cfg, "error": f"{type(e).__name__}: {e}"[-1500:]})
                continue
            if k.metadata.shared > SMEM_LIMIT[arch]:
                oversized.append(f"{name} {cfg}: {k.metadata.shared} B")
            else:
                fits += 1
        if fits == 0 and not any(f["case"] == name for f in failed):
            failed.append({"case": name, "config": "all", "error": "no config fits in shared memory"})
    return {"arch": arch, "compiled": compiled, "failed": failed, "oversized": oversized}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, choices=ARCHS, required=True)
    ap.add_argument("--only", help="compile only the cases whose name contains this")
    ap.add_argument("--fixed", action="store_true",
                    help="the fixed configs of LATHE_TRITON_AUTOTUNE=0 (each must fit)")
    a = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        print(json.dumps({"skip": f"this triton has no ASTSource/GPUTarget: {e}"}))
        return 77
    report = run(a.arch, a.only)
    if a.fixed:  # one config per kernel: an oversized one cannot launch at all
        report["failed"] += [{"case": o, "config": "fixed", "error": "exceeds shared memory"}
                             for o in report["oversized"]]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
