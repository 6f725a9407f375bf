"""lathe's fused CPU attention (lathe.kernels.cpu_attention) against reference.attention, on
every ISA path (scalar, avx2, avx512_vnni, reached through cpu.force_isa).

Accuracy criterion (no hand-picked atol): against an fp64 evaluation of the reference math on
the same inputs (bf16 inputs upcast exactly), lathe's max error must be at most 2x the max
error of PyTorch doing the same job at the inputs' precision -- reference.attention for fp32,
torch's scaled_dot_product_attention on the bf16 tensors for bf16 -- plus one unit of the
dtype's epsilon at the output's largest magnitude.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lathe import _ext
from lathe.errors import BadInput
from lathe.kernels import cpu, reference
from lathe.kernels.cpu_attention import attention
from testkit import ISAS, cpu_lacks, isa_or_skip, attention_inputs, allowed_mask, attention_at

f32, bf16 = torch.float32, torch.bfloat16


def _baseline(q, k, v, causal, mask, scale=None):
    """PyTorch at the inputs' precision: the fp32 reference, or SDPA on the bf16 tensors."""
    if q.dtype == f32:
        return reference.attention(q, k, v, causal, mask, scale=scale)
    rep = q.shape[1] // k.shape[1]
    allowed = allowed_mask(q.shape[0], q.shape[2], k.shape[2], causal, mask)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=allowed, scale=scale)
    return torch.nan_to_num(out, nan=0.0)  # rows with no visible key: 0, as the reference


def assert_close_to_truth(out, q, k, v, causal, mask, scale=None):
    truth = attention_at(q, k, v, causal, mask, torch.float64, scale)
    base = _baseline(q, k, v, causal, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    base_err = (base.double() - truth).abs().max().item() if out.numel() else 0.0
    eps = torch.finfo(q.dtype).eps * (truth.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * base_err + eps, f"lathe err {err:.3g} vs PyTorch {q.dtype} err {base_err:.3g}"


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask, seed=0):
    return attention_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask, seed, "cpu")


def check_case(isa, B, Hq, Hkv, Sq, Sk, D, causal, mask, dtype):
    """One case at one ISA level against the fp64 truth (test_cpu_attention_bf16 shares it)."""
    q, k, v, m = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask, seed=Sq * 1000 + Sk + D)
    with cpu.force_isa(isa):
        out = attention(q, k, v, m, causal)
    assert_close_to_truth(out, q, k, v, causal, m)
    if m is not None and B > 1:
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the all-padding batch row


def views(dtype):
    """q/k/v as the [B, H, S, D] views of a model's [B, S, H, D] projections (q and k out of a
    packed qkv buffer), and a key mask."""
    B, S, Hq, Hkv, D = 2, 37, 6, 2, 48
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, generator=g).to(dtype)
    q = qkv[:, :, :Hq].transpose(1, 2)
    k = qkv[:, :, Hq:Hq + Hkv].transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    m = torch.rand(B, S, generator=g) > 0.2
    return q, k, v, m


def check_views(isa, q, k, v, m):
    """Strided inputs give the contiguous inputs' bits, close to the truth."""
    with cpu.force_isa(isa):
        out = attention(q, k, v, m, causal=True)
        ref = attention(q.contiguous(), k.contiguous(), v.contiguous(), m, causal=True)
    assert torch.equal(out, ref)
    assert_close_to_truth(out, q, k, v, True, m)


# B, Hq, Hkv, Sq, Sk, D, causal, mask, dtype
CASES = [
    (1, 2, 2, 1, 1, 32, False, False, f32),
    (2, 3, 3, 3, 17, 64, False, True, f32),
    (1, 6, 2, 17, 3, 80, True, False, f32),  # GQA 3; Sq > Sk: the first causal rows see nothing
    (2, 4, 1, 128, 128, 64, True, True, f32),  # MQA
    (1, 8, 2, 257, 257, 128, True, False, f32),  # GQA 4
    (2, 2, 2, 17, 257, 256, False, True, f32),
    (1, 4, 4, 128, 17, 32, False, False, f32),
    (1, 3, 1, 3, 128, 80, True, True, f32),  # 9 rows per kv head: the row-block path
    (2, 4, 1, 2, 300, 64, True, True, f32),  # 8 rows per kv head: the decode path, causal
    (2, 3, 3, 17, 128, 64, True, True, bf16),
    (1, 8, 2, 257, 257, 128, False, False, bf16),
    (2, 6, 2, 3, 17, 80, True, True, bf16),
    (1, 4, 4, 1, 257, 256, False, True, bf16),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal,mask,dtype", CASES)
def test_matches_reference(isa, B, Hq, Hkv, Sq, Sk, D, causal, mask, dtype):
    isa_or_skip(isa)
    check_case(isa, B, Hq, Hkv, Sq, Sk, D, causal, mask, dtype)


@pytest.fixture
def four_threads():
    """More threads than kv heads x blocks, so that decode also splits the keys (flash-decoding)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (8, 2), (12, 1)])
def test_decode_long_kv(isa, dtype, Hq, Hkv, four_threads):
    isa_or_skip(isa)
    B = 1 if Hq == 1 else 2
    q, k, v, m = _inputs(B, Hq, Hkv, 1, 4099, 64, dtype, mask=Hq > 1, seed=Hq)
    with cpu.force_isa(isa):
        out = attention(q, k, v, m, causal=True)  # Sq = 1: causal sees every key
    assert_close_to_truth(out, q, k, v, True, m)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_transposed_views(isa, dtype):
    """q/k/v as the [B, H, S, D] views of a model's [B, S, H, D] projections (and q out of a
    packed qkv buffer): no copy, same result as contiguous inputs."""
    isa_or_skip(isa)
    q, k, v, m = views(dtype)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_views(isa, q, k, v, m)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_rows_without_keys_are_zero(isa, dtype):
    isa_or_skip(isa)
    q, k, v, _ = _inputs(3, 4, 2, 20, 9, 64, dtype, mask=False)
    m = torch.ones(3, 9, dtype=torch.bool)
    m[1] = False  # a batch row of padding only
    m[2, 5:] = False
    with cpu.force_isa(isa):
        out = attention(q, k, v, m, causal=True)  # Sq > Sk: rows 0..10 see no key at all
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[:, :, :11], torch.zeros_like(out[:, :, :11]))
    assert_close_to_truth(out, q, k, v, True, m)
    empty_k = k[:, :, :0]
    with cpu.force_isa(isa):
        out0 = attention(q, empty_k, empty_k, None, False)  # no keys at all
    assert torch.equal(out0, torch.zeros_like(out0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [0.05, -0.1, 0.0, 0.3])
def test_explicit_scale(isa, scale):
    isa_or_skip(isa)
    q, k, v, m = _inputs(2, 4, 2, 33, 70, 40, f32, mask=True, seed=3)
    with cpu.force_isa(isa):
        out = attention(q, k, v, m, False, scale)
    assert_close_to_truth(out, q, k, v, False, m, scale)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 3, 4]),
       Sq=st.integers(1, 70), Sk=st.integers(1, 140), D=st.integers(1, 160),
       causal=st.booleans(), mask=st.booleans(), dtype=st.sampled_from([f32, bf16]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_property_any_shape(B, Hkv, rep, Sq, Sk, D, causal, mask, dtype, isa, seed):
    if cpu_lacks(isa):
        isa = cpu.best_isa()
    q, k, v, m = _inputs(B, Hkv * rep, Hkv, Sq, Sk, D, dtype, mask, seed)
    with cpu.force_isa(isa):
        out = attention(q, k, v, m, causal)
    assert_close_to_truth(out, q, k, v, causal, m)


def _bad(kind, q, k, v, m):
    """One corruption of valid inputs; attention() must answer BadInput."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if kind == "heads":
        k2 = torch.randn(B, Hq + 1, Sk, D)
        return q, k2, k2.clone(), m
    if kind == "dim":
        return q, torch.randn(B, Hkv, Sk, D + 1), torch.randn(B, Hkv, Sk, D + 1), m
    if kind == "dtype":
        return q, k.to(bf16), v, m
    if kind == "unsupported_dtype":
        return q.double(), k.double(), v.double(), m
    if kind == "kv_shape":
        return q, k, torch.randn(B, Hkv, Sk + 1, D), m
    if kind == "batch":
        return q, torch.randn(B + 1, Hkv, Sk, D), torch.randn(B + 1, Hkv, Sk, D), None
    if kind == "mask_shape":
        return q, k, v, torch.ones(B, Sk + 1, dtype=torch.bool)
    if kind == "mask_dtype":
        return q, k, v, torch.ones(B, Sk)
    if kind == "rank":
        return q[0], k, v, m
    if kind == "strided_last_dim":
        return torch.randn(B, Hq, Sq, 2 * D)[..., ::2], k, v, m
    raise AssertionError(kind)


BAD = ["heads", "dim", "dtype", "unsupported_dtype", "kv_shape", "batch", "mask_shape",
       "mask_dtype", "rank", "strided_last_dim"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(kind=st.sampled_from(BAD), B=st.integers(1, 3), Hkv=st.integers(1, 3),
       rep=st.integers(1, 3), Sq=st.integers(1, 9), Sk=st.integers(1, 9), D=st.integers(2, 40))
def test_property_bad_inputs_raise(kind, B, Hkv, rep, Sq, Sk, D):
    q, k, v, m = _inputs(B, Hkv * rep, Hkv, Sq, Sk, D, f32, mask=True)
    q, k, v, m = _bad(kind, q, k, v, m)
    with pytest.raises(BadInput, match="attention: "):
        attention(q, k, v, m, causal=False)


def test_kernel_validates_before_touching_memory():
    """The C++ entry point checks its arguments itself (null pointers are never read)."""
    C = _ext.require_cpu()
    s = [1, 1, 1, 1]

    def call(**kw):
        args = dict(q=0, k=0, v=0, out=0, B=1, Hq=12, Hkv=4, Sq=3, Sk=5, D=64, q_strides=s,
                    k_strides=s, v_strides=s, out_strides=s, dtype=0, mask=0, mask_stride=0,
                    causal=False, scale=0.125, nthreads=1)
        args.update(kw)
        C.attention_fwd(**args)

    with pytest.raises(ValueError, match="q heads 12 not a multiple of kv heads 5"):
        call(Hkv=5)
    with pytest.raises(ValueError, match="dtype code 3"):
        call(dtype=3)
    with pytest.raises(ValueError, match="head dim D=0"):
        call(D=0)
    with pytest.raises(ValueError, match="k must have a contiguous head dim"):
        call(k_strides=[1, 1, 1, 2])
    with pytest.raises(ValueError, match="strides must have 4 entries"):
        call(q_strides=[1, 1, 1])
    with pytest.raises(ValueError, match="scale -?nan is not finite"):
        call(scale=float("nan"))
    with pytest.raises(ValueError, match="null q or out pointer"):
        call()
