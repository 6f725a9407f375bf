"""Triton attention (lathe.kernels.triton_kernels.attention) against reference.attention.

Without a CUDA GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below
before triton is imported) on CPU tensors: shapes are tiny, and only fp32 and fp16 are tested
there because the interpreter mishandles bf16. bf16, large shapes and autotuning are the
`gpu`-marked tests.

Accuracy criterion (no hand-picked atol): against an fp64 evaluation of the reference math,
lathe's max error must be at most 2x the max error of the same math done by PyTorch at the
kernel's precision (reference.attention itself for fp32; matmuls and softmax in fp16/bf16 for
the half types), plus one ulp of the output's largest magnitude.
"""
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton", exc_type=ImportError)  # missing or broken triton

from lathe.kernels import reference  # noqa: E402
from lathe.kernels.triton_kernels import attention as A  # noqa: E402
from testkit import attention_inputs, attention_at  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _baseline(q, k, v, causal, mask, scale=None):
    """PyTorch at the kernel's precision: the fp32 reference, or the math in fp16/bf16."""
    if q.dtype == torch.float32:
        return reference.attention(q, k, v, causal, mask, scale=scale)
    return attention_at(q, k, v, causal, mask, q.dtype, scale=scale)


def assert_close_to_truth(out, q, k, v, causal, mask, scale=None):
    truth = attention_at(q, k, v, causal, mask, torch.float64, scale=scale)
    base = _baseline(q, k, v, causal, mask, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err = (out.double() - truth).abs().max().item()
    base_err = (base.double() - truth).abs().max().item()
    eps = torch.finfo(q.dtype).eps * truth.abs().max().item()
    assert err <= 2 * base_err + eps, f"lathe err {err:.3g} vs PyTorch {q.dtype} err {base_err:.3g}"


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask, seed=0):
    return attention_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask, seed, DEV)


# b<B> h<Hq> kv<Hkv> q<Sq> k<Sk> d<D>, m: a key mask, then the dtype (each string is its test's id):
# odd lengths, GQA ratios 1/2/4, D 32/64/96.
DENSE = """b1h2kv2q1k1d32-float32 b2h2kv2q3k3d32-float16 b1h2kv1q17k17d64-float16
           b2h4kv2q17k65d32m-float32 b2h4kv1q65k65d32m-float16 b2h2kv2q65k17d64-float32
           b2h2kv1q3k65d96m-float16 b2h4kv4q17k3d64m-float16 b2h8kv2q1k17d64-float32
           b2h4kv2q65k1d32m-float32 b2h8kv2q65k65d64m-float32 b1h4kv1q33k17d64-float16""".split()


def _dense(case):
    """B, Hq, Hkv, Sq, Sk, D, mask, dtype of a DENSE case."""
    pattern = r"b(\d+)h(\d+)kv(\d+)q(\d+)k(\d+)d(\d+)(m?)-(\w+)"
    *sizes, mask, dtype = re.fullmatch(pattern, case).groups()
    return (*map(int, sizes), mask == "m", getattr(torch, dtype))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", DENSE)
def test_dense(case, causal):
    B, Hq, Hkv, Sq, Sk, D, mask, dtype = _dense(case)
    q, k, v, m = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask)
    out = A.flash_attention(q, k, v, causal=causal, key_padding_mask=m, decode=False)
    assert_close_to_truth(out, q, k, v, causal, m)
    if m is not None:
        assert (out[-1] == 0).all()  # the all-padding batch row


def test_causal_more_queries_than_keys_gives_zero_rows():
    q, k, v, _ = _inputs(1, 2, 2, 17, 5, 32, torch.float32, False)
    out = A.flash_attention(q, k, v, causal=True)
    assert (out[:, :, : 17 - 5] == 0).all()  # query i < Sq - Sk sees no key
    assert_close_to_truth(out, q, k, v, True, None)


def test_scale_and_noncontiguous_inputs():
    q, k, v, _ = _inputs(1, 4, 2, 17, 33, 32, torch.float32, False)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] memory, same values
    out = A.flash_attention(qt, k, v, causal=True, scale=0.3)
    assert_close_to_truth(out, q, k, v, True, None, scale=0.3)


@pytest.mark.parametrize("Hq,Hkv,Sk,splits,mask,dtype", [
    (2, 2, 65, 1, False, torch.float32),
    (4, 1, 65, 3, True, torch.float16),
    (8, 2, 100, 4, True, torch.float32),
    (4, 4, 17, 8, False, torch.float16),  # more splits asked than chunks: clamped
])
def test_decode_split_k(Hq, Hkv, Sk, splits, mask, dtype):
    q, k, v, m = _inputs(2, Hq, Hkv, 1, Sk, 64, dtype, mask)
    out = A.flash_decode(q, k, v, key_padding_mask=m, num_splits=splits)
    assert_close_to_truth(out, q, k, v, False, m)
    if m is not None:
        assert (out[-1] == 0).all()


def test_decode_is_chosen_for_long_kv_and_matches_dense():
    q, k, v, m = _inputs(2, 4, 2, 1, A.DECODE_MIN_KEYS, 32, torch.float32, True)
    out = A.flash_attention(q, k, v, causal=True, key_padding_mask=m)  # causal is a no-op here
    assert_close_to_truth(out, q, k, v, True, m)
    dense = A.flash_attention(q, k, v, causal=True, key_padding_mask=m, decode=False)
    assert_close_to_truth(dense, q, k, v, True, m)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hq,Hkv,D,dtype", [(4, 2, 32, torch.float32), (2, 2, 64, torch.float16),
                                             (4, 1, 96, torch.float16)])
def test_varlen(Hq, Hkv, D, dtype, causal):
    lens_q, lens_k = [3, 17, 1, 0, 5], [5, 17, 20, 4, 0]  # incl. an empty query / key sequence
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lens_q), Hq, D, generator=g).to(DEV, dtype)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g).to(DEV, dtype)
    v = torch.randn(sum(lens_k), Hkv, D, generator=g).to(DEV, dtype)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    out = A.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=causal)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for b in range(len(lens_q)):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qs:
            continue
        sub = [t[None].transpose(1, 2) for t in (q[qs:qe], k[ks:ke], v[ks:ke])]
        assert_close_to_truth(out[qs:qe][None].transpose(1, 2), *sub, causal, None)


def test_input_validation(monkeypatch):
    q, k, v, _ = _inputs(1, 3, 2, 3, 3, 32, torch.float32, False)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        A.flash_attention(q, k, v)
    q, k, v, _ = _inputs(1, 2, 2, 3, 3, 32, torch.float32, False)
    with pytest.raises(TypeError):
        A.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="key_padding_mask"):
        A.flash_attention(q, k, v, key_padding_mask=torch.ones(1, 4, dtype=torch.bool, device=DEV))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        A.flash_attention(q.cpu(), k.cpu(), v.cpu())


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large(dtype, D, causal):
    q, k, v, m = _inputs(2, 8, 2, 1000, 1024, D, dtype, True, seed=3)
    out = A.flash_attention(q, k, v, causal=causal, key_padding_mask=m)
    assert_close_to_truth(out, q, k, v, causal, m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_long_cache(dtype):
    q, k, v, m = _inputs(2, 32, 8, 1, 32768, 128, dtype, True, seed=4)
    out = A.flash_attention(q, k, v, key_padding_mask=m)
    assert_close_to_truth(out, q, k, v, False, m)


@pytest.mark.gpu
@needs_cuda
def test_gpu_autotune_is_cached_per_bucket():
    if len(A._attn_fwd_kernel.configs) == 1:
        pytest.skip("one fixed config (LATHE_TRITON_AUTOTUNE=0 under pytest): no tuning to cache")
    q, k, v, _ = _inputs(1, 4, 4, 700, 700, 64, torch.float16, False)
    A.flash_attention(q, k, v, causal=True)
    n = len(A._attn_fwd_kernel.cache)
    q2, k2, v2, _ = _inputs(1, 4, 4, 900, 900, 64, torch.float16, False)  # same 1024 bucket
    out = A.flash_attention(q2, k2, v2, causal=True)
    assert len(A._attn_fwd_kernel.cache) == n
    assert_close_to_truth(out, q2, k2, v2, True, None)


@pytest.mark.gpu
@needs_cuda
def test_gpu_faster_than_math_attention():
    import triton
    q, k, v, _ = _inputs(4, 16, 16, 4096, 4096, 128, torch.bfloat16, False)
    t_lathe = triton.testing.do_bench(lambda: A.flash_attention(q, k, v, causal=True))
    t_math = triton.testing.do_bench(lambda: attention_at(q, k, v, True, None, torch.bfloat16))
    assert t_lathe < t_math

# Ahead-of-time compilation for sm_80/89/90: tests/test_triton_aot.py.
