"""Triton quantized matmuls (lathe.kernels.triton_kernels.qmatmul) against lathe.kernels.reference.

Without a CUDA GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below
before triton is imported): tiny shapes, fp32 and fp16 only (the interpreter mishandles bf16).
bf16, large shapes, autotuning and speed are the `gpu`-marked tests.

Accuracy criterion (no hand-picked atol): against an fp64 evaluation of the same quantized
math, lathe's max error must be at most 2x the max error of PyTorch doing that math at the
kernel's precision (the fp32 reference, or a fp16/bf16 matmul for half outputs), plus one ulp
of the largest output. The int8 quantization itself must match the reference bit for bit, and
the FP8 path is also checked by SQNR against the unquantized product.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton", exc_type=ImportError)  # missing or broken triton

from lathe.kernels import reference  # noqa: E402
from testkit import compile_ahead  # noqa: E402
from lathe.kernels.triton_kernels import packing  # noqa: E402
from lathe.kernels.triton_kernels import qmatmul as Q  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HALF = torch.float16  # the half type the interpreter handles


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_within_baseline(out, truth, base, out_dtype):
    """|out - truth| <= 2 |base - truth| + 1 ulp(max |truth|), maxima over all elements."""
    assert out.dtype == out_dtype and out.shape == truth.shape
    assert torch.isfinite(out).all()
    err = (out.double() - truth).abs().max().item()
    base_err = (base.double() - truth).abs().max().item()
    eps = torch.finfo(out_dtype).eps * truth.abs().max().item()
    assert err <= 2 * base_err + eps, f"lathe err {err:.3g} vs PyTorch err {base_err:.3g}"


def _cpu(*ts):
    return [t.cpu() if t is not None else None for t in ts]


def _act64(y, act):
    return reference.apply_act(y, act)  # gelu/silu exist for float64 too


# ----------------------------------------------------------------------------- int8 W8A8


@pytest.mark.parametrize("M,K", [(1, 96), (3, 160), (17, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_quantize_per_token_matches_reference_exactly(M, K, dtype):
    x = (torch.randn(M, K, generator=_gen(M)) * 3).to(DEV, dtype)
    if M > 2:
        x[1] = 0  # an all-zero row: scale 1, codes 0
    smooth = (torch.rand(K, generator=_gen(1)) + 0.5).to(DEV)
    for sm in (None, smooth):
        q, s = Q.quantize_per_token_int8(x, sm)
        # Reference on the CPU: CUDA PyTorch computes amax / 127 as amax * (1/127), which can
        # differ by an ulp; the kernel divides exactly, as the CPU does.
        rq, rs = reference.quantize_rows_s8((x.float() * sm if sm is not None else x).cpu())
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs[:, 0])


def test_quantize_rounds_half_to_even():
    x = torch.tensor([[127.0, 2.5, 3.5, -0.5, -1.5, 0.5, 1.5, -2.5, 126.5]], device=DEV)  # s = 1
    q, s = Q.quantize_per_token_int8(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 2, 4, 0, -2, 0, 2, -2, 126]]


W8A8_CASES = [  # (M, N, K, bias, act, out_dtype)
    (1, 17, 96, False, "none", torch.float32),
    (3, 40, 160, True, "none", torch.float32),
    (17, 40, 96, True, "gelu", torch.float32),
    (17, 17, 160, False, "silu", torch.float32),
    (1, 40, 160, True, "none", HALF),
    (3, 17, 96, False, "gelu", HALF),
    (17, 40, 160, True, "silu", HALF),
]


@pytest.mark.parametrize("M,N,K,bias,act,out_dtype", W8A8_CASES)
def test_w8a8(M, N, K, bias, act, out_dtype):
    g = _gen(M * N)
    x = torch.randn(M, K, generator=g).to(DEV)
    w_q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEV)
    w_s = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    out = Q.w8a8_linear(x, w_q, w_s, b, act, out_dtype=out_dtype).cpu()
    x, w_q, w_s, b = _cpu(x, w_q, w_s, b)  # reference quantization on the CPU (exact division)
    qx, sx = reference.quantize_rows_s8(x)
    truth = (qx.double() @ w_q.double().t()) * sx.double() * w_s.double()
    if b is not None:
        truth = truth + b.double()
    truth = _act64(truth, act)
    base = reference.linear_w8a8(x, w_q, w_s, b, act).to(out_dtype)
    assert_within_baseline(out, truth, base, out_dtype)


def test_w8a8_prequantized_int8_input_and_leading_dims():
    g = _gen(7)
    x = torch.randn(2, 3, 96, generator=g).to(DEV)
    w_q = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8).to(DEV)
    w_s = (torch.rand(40, generator=g) * 0.02).to(DEV)
    q, s = Q.quantize_per_token_int8(x)
    out = Q.w8a8_linear(q, w_q, w_s, x_scale=s, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="x_scale"):
        Q.w8a8_linear(q, w_q, w_s)
    out, x, w_q, w_s, q, s = _cpu(out, x, w_q, w_s, q, s)
    ref = reference.linear_w8a8(x.reshape(6, 96), w_q, w_s).reshape(2, 3, 40)
    assert out.shape == (2, 3, 40)
    truth = ((q.double() @ w_q.double().t()) * s.double()[..., None] * w_s.double())
    assert_within_baseline(out, truth, ref, torch.float32)


# ----------------------------------------------------------------------------- W4A16 / W8A16


def _int4_weight(N, K, g, sym, scale_dtype, seed):
    gen = _gen(seed)
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, K // g, generator=gen) * 0.05 + 0.01).to(scale_dtype)
    zeros = (torch.full((N, K // g), 8, dtype=torch.uint8) if sym
             else torch.randint(0, 16, (N, K // g), generator=gen, dtype=torch.uint8))
    return packing.pack_int4(codes).to(DEV), scales.to(DEV), zeros.to(DEV)


W4_CASES = [  # (M, N, K, g, sym, scale dtype, x dtype, bias)
    (1, 17, 96, 32, False, HALF, torch.float32, True),
    (3, 40, 160, 32, True, torch.float32, torch.float32, False),
    (17, 40, 96, 32, False, HALF, torch.float32, True),
    (1, 40, 128, 64, False, HALF, HALF, False),
    (3, 17, 256, 128, True, HALF, HALF, True),
    (17, 24, 160, 32, False, torch.float32, HALF, True),
]


@pytest.mark.parametrize("M,N,K,g,sym,sdtype,xdtype,bias", W4_CASES)
def test_w4a16(M, N, K, g, sym, sdtype, xdtype, bias):
    qw, sc, z = _int4_weight(N, K, g, sym, sdtype, seed=M + N)
    gen = _gen(5)
    x = torch.randn(M, K, generator=gen).to(DEV, xdtype)
    b = torch.randn(N, generator=gen).to(DEV, xdtype) if bias else None
    # Symmetric weights may also come without zeros (the kernel then uses 8).
    out = Q.w4a16_linear(x, qw, sc, None if sym else z, g, b)
    w = reference.dequant_int4(qw, sc, z, g, K)  # the reference's W (in the scales' dtype)
    truth = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    if xdtype == torch.float32:
        base = reference.linear_w4a16(x, qw, sc, z, g, b)
    else:  # the same math in PyTorch's half matmul
        base = x @ w.to(xdtype).t() + (b if b is not None else 0)
    assert_within_baseline(out, truth, base, xdtype)


@pytest.mark.parametrize("M,N,K,g,xdtype", [(1, 17, 96, None, torch.float32), (3, 40, 160, 32, torch.float32),
                                           (17, 40, 96, None, HALF), (3, 17, 128, 64, HALF)])
def test_w8a16(M, N, K, g, xdtype):
    gen = _gen(M + K)
    qw = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(DEV)
    G = 1 if g is None else K // g
    sc = (torch.rand(N, G, generator=gen) * 0.01 + 1e-3).to(DEV, HALF)
    x = torch.randn(M, K, generator=gen).to(DEV, xdtype)
    out = Q.w8a16_linear(x, qw, sc, g)
    w = (qw.float() * sc.float().repeat_interleave(K // G, dim=1)).to(sc.dtype)  # W in the scales' dtype
    truth = x.double() @ w.double().t()
    base = (x.float() @ w.float().t()) if xdtype == torch.float32 else x @ w.to(xdtype).t()
    assert_within_baseline(out, truth, base, xdtype)


def test_weight_only_validation():
    qw, sc, z = _int4_weight(16, 96, 32, False, HALF, seed=0)
    x = torch.randn(2, 96, device=DEV)
    with pytest.raises(ValueError, match="group_size"):
        Q.w4a16_linear(x, qw, sc, z, 40)
    with pytest.raises(ValueError, match="scales/zeros"):
        Q.w4a16_linear(x, qw, sc[:, :2], z, 32)
    with pytest.raises(ValueError, match="qweight"):
        Q.w4a16_linear(torch.randn(2, 64, device=DEV), qw, sc, z, 32)


# ----------------------------------------------------------------------------- FP8


def _fp8_or_skip(fn):
    try:
        return fn()
    except (NotImplementedError, RuntimeError) as e:  # e.g. an interpreter without fp8 dots
        if DEV == "cpu":
            pytest.skip(f"FP8 does not run under this Triton interpreter: {e}")
        raise


def _sqnr_db(y, ref):
    return 10 * torch.log10(ref.double().pow(2).sum() / (y.double() - ref.double()).pow(2).sum()).item()


@pytest.mark.parametrize("M,N,K,per_row,out_dtype,bias", [
    (1, 17, 96, False, torch.float32, True),
    (3, 40, 160, True, torch.float32, False),
    (17, 40, 96, True, HALF, True),
])
def test_fp8(M, N, K, per_row, out_dtype, bias):
    if DEV == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    gen = _gen(M * K)
    xf = torch.randn(M, K, generator=gen).to(DEV)
    wf = torch.randn(N, K, generator=gen).to(DEV)
    x8, sx = Q.quantize_fp8(xf, per_row=per_row)
    w8, sw = Q.quantize_fp8(wf, per_row=True)
    b = torch.randn(N, generator=gen).to(DEV) if bias else None
    out = _fp8_or_skip(lambda: Q.fp8_linear(x8, w8, sx, sw, b, out_dtype=out_dtype))
    sxc = sx.double()[:, None] if per_row else sx.double()
    truth = (x8.double() @ w8.double().t()) * sxc * sw.double() + (b.double() if bias else 0)
    base = ((x8.float() @ w8.float().t()) * (sx[:, None] if per_row else sx) * sw
            + (b if bias else 0)).to(out_dtype)
    assert_within_baseline(out, truth, base, out_dtype)
    # And the quantization error is that of PyTorch's fp8 dequantize-then-matmul.
    exact = xf.double() @ wf.double().t() + (b.double() if bias else 0)
    assert _sqnr_db(out, exact) >= _sqnr_db(base, exact) - 0.1


def test_fp8_rejects_other_dtypes():
    x = torch.randn(2, 32, device=DEV)
    w8, sw = Q.quantize_fp8(torch.randn(8, 32, device=DEV))
    if DEV == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        Q.fp8_linear(x, w8, torch.ones(()), sw)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_w4a16_large(M, dtype):
    N, K, g = 4096, 4096, 128
    qw, sc, z = _int4_weight(N, K, g, False, dtype, seed=M)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    out = Q.w4a16_linear(x, qw, sc, z, g)
    w = reference.dequant_int4(qw, sc, z, g, K)
    truth = x.double() @ w.double().t()
    assert_within_baseline(out, truth, x @ w.to(dtype).t(), dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_w8a8_large(M, dtype):
    N, K = 4096, 4096
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    w_q = torch.randint(-127, 128, (N, K), device=DEV, dtype=torch.int8)
    w_s = torch.rand(N, device=DEV) * 0.01
    out = Q.w8a8_linear(x, w_q, w_s).cpu()
    # The reference runs on the CPU: on CUDA, PyTorch divides by a Python scalar (amax / 127)
    # through a reciprocal multiply, which can move the scale by an ulp; the kernel, like the
    # CPU, divides exactly (IEEE div_rn).
    xc, wc, sc = x.cpu(), w_q.cpu(), w_s.cpu()
    qx, sx = reference.quantize_rows_s8(xc)
    q_dev, s_dev = Q.quantize_per_token_int8(x)
    assert torch.equal(q_dev.cpu(), qx) and torch.equal(s_dev.cpu(), sx[:, 0])
    truth = (qx.double() @ wc.double().t()) * sx.double() * sc.double()
    assert_within_baseline(out, truth, reference.linear_w8a8(xc, wc, sc).to(dtype), dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_needs_sm89():
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has FP8: nothing to reject")
    x8, sx = Q.quantize_fp8(torch.randn(4, 64, device=DEV))
    with pytest.raises(RuntimeError, match="sm_89"):
        Q.fp8_linear(x8, x8, sx, sx)


@pytest.mark.gpu
@needs_cuda
def test_gpu_w4a16_decode_beats_fp16_matmul():
    import triton
    N, K, g = 11008, 4096, 128
    qw, sc, z = _int4_weight(N, K, g, False, HALF, seed=0)
    w = reference.dequant_int4(qw, sc, z, g, K).half()
    x = torch.randn(1, K, device=DEV, dtype=HALF)
    t_w4 = triton.testing.do_bench(lambda: Q.w4a16_linear(x, qw, sc, z, g))
    t_fp16 = triton.testing.do_bench(lambda: x @ w.t())
    assert t_w4 < t_fp16, f"W4A16 {t_w4:.4f} ms vs fp16 {t_fp16:.4f} ms"


# ----------------------------------------------------------------------------- GPU lowering, no GPU

_AOT = r'''
from lathe.kernels.triton_kernels import qmatmul as Q

for cap in (80, 89, 90):
    for xt in ("*i8", "*fp8e4nv") if cap >= 89 else ("*i8",):
        sig = dict(X=xt, W=xt, SX="*fp32", SW="*fp32", Bias="*bf16", Y="*bf16")
        build(Q._scaled_mm_kernel, sig, dict(HAS_BIAS=True, ACT=1, IS_FP8=xt != "*i8", BLOCK_M=128,
                                             BLOCK_N=128, BLOCK_K=128, GROUP_M=8), cap, 8, 3)
    build(Q._quant_rows_s8_kernel, dict(X="*bf16", Smooth="*fp32", Q="*i8", S="*fp32"),
          dict(HAS_SMOOTH=True, BLOCK_K=4096), cap, 8, 1)
    for bits, split in ((4, 4), (4, 1), (8, 1)):
        sig = dict(X="*fp16", QW="*u8" if bits == 4 else "*i8", S="*fp16", Z="*u8", Bias="*fp16",
                   Y="*fp32" if split > 1 else "*fp16")
        build(Q._wo_small, sig, dict(BITS=bits, HAS_ZERO=bits == 4, HAS_BIAS=True, GROUP_SIZE=128,
                                     DOT_PREC="tf32", BLOCK_M=16 if split > 1 else 64, BLOCK_N=64,
                                     BLOCK_K=128, GROUP_M=8, SPLIT_K=split), cap, 4, 4)
'''


@pytest.mark.slow
def test_kernels_lower_to_gpu_cubin():
    """Compile (not run) the kernels for sm_80/89/90 (FP8 on 89/90) with triton's bundled ptxas:
    catches lowering errors that the interpreter cannot see, on machines without a GPU."""
    compile_ahead(_AOT)
