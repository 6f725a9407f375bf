"""NaN is never hidden, numbers are never invented (#14): the CPU ops against the PyTorch
reference with NaN/Inf/huge values and odd strides, on every ISA path.

The property: the non-finite pattern of lathe's output equals the reference's element for
element (NaN where it has NaN, +-Inf where it has +-Inf), and the finite elements agree within
the rounding bound of the computation (see each test). Huge finite values are 1e30: far from
float32 overflow, so that summation order cannot decide between a finite and an infinite sum.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lathe.errors import BadInput
from lathe.kernels import cpu, reference as ref
from testkit import ISAS, isa_or_skip

SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]
EPS = torch.finfo(torch.float32).eps
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ops = torch.ops.lathe


@st.composite
def poisoned(draw, shape, max_specials=3):
    """A float32 tensor of `shape` (seeded normal values) with a few special values placed."""
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    n = x.numel()
    for _ in range(draw(st.integers(0, max_specials))):
        x.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    return x


@st.composite
def odd_view(draw, x):
    """x itself, a transposed copy viewed back (column-major), a strided slice, or expanded rows."""
    kind = draw(st.sampled_from(["plain", "transposed", "strided", "expanded"]))
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        big = torch.zeros(x.shape[0], 2 * x.shape[1])
        big[:, ::2] = x
        return big[:, ::2]
    if kind == "expanded" and x.shape[0] > 1:
        return x[:1].expand_as(x)
    return x


def assert_same_nonfinite(y, r):
    assert torch.equal(torch.isnan(y), torch.isnan(r)), (y, r)
    assert torch.equal(torch.isposinf(y), torch.isposinf(r)), (y, r)
    assert torch.equal(torch.isneginf(y), torch.isneginf(r)), (y, r)


def dot_bound(x, w):
    """Rounding bound of fp32 dot products y = x @ w^T summed in any order: K eps sum |x w|
    (Higham's gamma_K), per element, with non-finite inputs zeroed (those elements are compared
    by pattern, not value)."""
    xf = torch.where(torch.isfinite(x), x, 0).double().abs()
    wf = torch.where(torch.isfinite(w), w, 0).double().abs()
    return x.shape[-1] * EPS * (xf @ wf.t())


# ----------------------------------------------------------------------------- linear_w8a8


@pytest.mark.parametrize("isa", ISAS)
@given(data=st.data(), M=st.sampled_from([1, 3, 17]), K=st.sampled_from([1, 3, 17, 64]),
       N=st.sampled_from([1, 5, 17]), asym=st.booleans())
@FUZZ
def test_linear_w8a8_fuzz(isa, data, M, K, N, asym):
    isa_or_skip(isa)
    x = data.draw(odd_view(data.draw(poisoned((M, K)))))
    g = torch.Generator().manual_seed(M * 100 + K * 10 + N)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    ws = torch.rand(N, generator=g) * 0.01 + 1e-3
    with cpu.force_isa(isa):
        y = ops.linear_w8a8(x, w, ws, None, "none", None, asym, None, None)
    r = ref.linear_w8a8(x, w, ws, None, "none", None, asym)
    assert_same_nonfinite(y, r)
    fin = torch.isfinite(r)
    # the same integer sums on both sides: only the epilogue's two fp32 products round
    assert torch.all((y[fin].double() - r[fin].double()).abs() <= 4 * EPS * r[fin].double().abs())


# ----------------------------------------------------------------------------- linear_w4a16


def _int4(N, K, g, seed):
    """Random int4 codes (two a byte, low nibble first), scales and zero points: the op's layout."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = torch.rand(N, K // g, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (N, K // g), dtype=torch.uint8, generator=gen)
    return qweight, scales, zeros


@pytest.mark.parametrize("isa", ISAS)
@given(data=st.data(), M=st.sampled_from([1, 3, 17]), N=st.sampled_from([1, 5, 17]),
       G=st.sampled_from([1, 3]))
@FUZZ
def test_linear_w4a16_fuzz(isa, data, M, N, G):
    isa_or_skip(isa)
    from lathe.kernels.cpu_int4 import int4_linear, int4_pack

    g = 32
    K = g * G
    qw, sc, z = _int4(N, K, g, M * 100 + N * 10 + G)
    x = data.draw(odd_view(data.draw(poisoned((M, K)))))
    with cpu.force_isa(isa):
        y = ops.linear_w4a16(x, qw, sc, z, g, None)  # the int8-activation route
        ye = int4_linear(x, int4_pack(qw, sc, z, g, K=K), N, K, g, None, exact=True)
    r = ref.linear_w4a16(x, qw, sc, z, g, None)
    assert_same_nonfinite(y, r)
    assert_same_nonfinite(ye, r)
    fin = torch.isfinite(r)
    w = ref.dequant_int4(qw, sc, z, g, K).float()
    bound = 2 * dot_bound(x, w)  # both sides round a K-term fp32 dot product
    assert torch.all((ye[fin].double() - r[fin].double()).abs() <= bound[fin] + 1e-30)


# ----------------------------------------------------------------------------- linear_w8a16


@pytest.mark.parametrize("isa", ISAS)
@given(data=st.data(), M=st.sampled_from([1, 3, 17]), K=st.sampled_from([16, 48]),
       N=st.sampled_from([1, 5, 17]), grouped=st.booleans())
@FUZZ
def test_linear_w8a16_fuzz(isa, data, M, K, N, grouped):
    isa_or_skip(isa)
    gen = torch.Generator().manual_seed(M * 100 + K * 10 + N)
    qw = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    g = 16 if grouped else 0
    sc = torch.rand(N, K // 16 if grouped else 1, generator=gen) * 0.02 + 1e-3
    x = data.draw(odd_view(data.draw(poisoned((M, K)))))
    with cpu.force_isa(isa):
        y = ops.linear_w8a16(x, qw, sc, None, g, None)
    r = ref.linear_w8a16(x, qw, sc, None)
    assert_same_nonfinite(y, r)
    fin = torch.isfinite(r)
    bound = 2 * dot_bound(x, ref.dequant_int8(qw, sc))
    assert torch.all((y[fin].double() - r[fin].double()).abs() <= bound[fin] + 1e-30)


# ----------------------------------------------------------------------------- attention


@st.composite
def attention_case(draw):
    B = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    Sq = draw(st.sampled_from([1, 3, 17]))
    Sk = draw(st.sampled_from([1, 5, 17, 70]))
    D = draw(st.sampled_from([8, 17, 64]))
    causal = draw(st.booleans())
    use_mask = draw(st.booleans())
    q = draw(poisoned((B, Hq, Sq, D)))
    k = draw(poisoned((B, Hkv, Sk, D)))
    mask = None
    if use_mask:
        seed = draw(st.integers(0, 2**16))
        mask = torch.rand(B, Sk, generator=torch.Generator().manual_seed(seed)) > 0.3
    # V: specials only at keys every row sees (a masked key's V is never read: undefined there)
    v = torch.randn(B, Hkv, Sk, D, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if not causal:
        for _ in range(draw(st.integers(0, 2))):
            b, h, j, d = (draw(st.integers(0, n - 1)) for n in (B, Hkv, Sk, D))
            if mask is None or bool(mask[b, j]):
                v[b, h, j, d] = draw(st.sampled_from(SPECIALS))
    scale = draw(st.sampled_from([None, 0.5, 1e10]))
    if draw(st.booleans()):  # odd strides: q as a transposed view
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    return q, k, v, mask, causal, scale


@pytest.mark.parametrize("isa", ISAS)
@given(case=attention_case())
@FUZZ
def test_attention_fuzz(isa, case):
    isa_or_skip(isa)
    q, k, v, mask, causal, scale = case
    with cpu.force_isa(isa):
        y = ops.attention(q, k, v, mask, causal, scale)
    r = ref.attention(q, k, v, causal, mask, scale)
    assert_same_nonfinite(y, r)
    fin = torch.isfinite(r)
    # rows that are finite agree within the softmax's fp32 rounding (a loose multiple: the
    # reference rounds s * scale too; both normalise by a sum of up to Sk terms)
    Sk, D = k.shape[2], q.shape[3]
    bound = (8 * (Sk + D) * EPS) * (v.abs().amax() if torch.isfinite(v).all() else 1.0) + 1e-30
    assert torch.all((y[fin] - r[fin]).abs() <= bound * max(1.0, float(r[fin].abs().max()) if fin.any() else 1.0))


# ----------------------------------------------------------------------------- the reported cases


@pytest.mark.parametrize("isa", ISAS)
def test_attention_reported_cases(isa):
    isa_or_skip(isa)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g) for n in (4, 5, 5))
    with cpu.force_isa(isa):
        qn = q.clone()
        qn[0, 0, 1, 3] = float("nan")
        y = ops.attention(qn, k, v, None, False, None)
        assert torch.isnan(y[0, 0, 1]).all() and torch.isfinite(y[0, 0, [0, 2, 3]]).all()  # not zeros
        kn = k.clone()
        kn[0, 0, 2, 3] = float("nan")
        assert torch.isnan(ops.attention(q, kn, v, None, False, None)).all()  # every row sees key 2
        for qq, sc in ((q, 1e10), (q * 1e30, None)):  # huge scores: as the reference, never zeros
            y = ops.attention(qq, k, v, None, False, sc)
            r = ref.attention(qq, k, v, scale=sc)
            assert_same_nonfinite(y, r)
            assert torch.allclose(y, r, rtol=1e-5, atol=1e-6)
        big = ops.attention(q * 1e30, k * 1e10, v, None, False, None)  # scores overflow to +-inf
        assert not (big == 0).all(dim=-1).any()
        assert_same_nonfinite(big, ref.attention(q * 1e30, k * 1e10, v))
        mask = torch.zeros(1, 5, dtype=torch.bool)
        assert torch.equal(ops.attention(qn, k, v, mask, False, None), torch.zeros(1, 1, 4, 16))  # fully masked


def test_reference_keeps_real_nans():
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    q[0, 0, 0, 0] = float("nan")
    r = ref.attention(q, k, v)
    assert torch.isnan(r[0, 0, 0]).all() and torch.isfinite(r[0, 0, 1]).all()
    r = ref.attention(q, k, v, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(r, torch.zeros_like(r))


@pytest.mark.parametrize("isa", ISAS)
def test_w4a16_inf_is_inf_like_the_reference(isa):
    isa_or_skip(isa)
    qw, sc, z = _int4(8, 64, 32, 0)
    x = torch.randn(2, 64)
    x[1, 5] = float("inf")
    with cpu.force_isa(isa):
        y = ops.linear_w4a16(x, qw, sc, z, 32, None)
    r = ref.linear_w4a16(x, qw, sc, z, 32, None)
    assert torch.isinf(y[1]).any() and torch.isfinite(y[0]).all()
    assert_same_nonfinite(y, r)


def test_w8a8_shape_checks():
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    ws = torch.rand(8)
    for K in (61, 62, 63, 65):
        with pytest.raises(BadInput, match="K=64"):
            ops.linear_w8a8(torch.randn(2, K), w, ws, None, "none", None, False, None, None)
    with pytest.raises(BadInput, match="empty"):
        ops.linear_w8a8(torch.randn(2, 0), torch.zeros(8, 0, dtype=torch.int8), ws, None, "none", None, False,
                        None, None)
    with pytest.raises(BadInput, match="empty"):
        ops.linear_w8a8(torch.randn(2, 64), torch.zeros(0, 64, dtype=torch.int8), torch.zeros(0), None, "none",
                        None, False, None, None)
    from lathe.kernels.ops import W8A8_MAX_K
    assert W8A8_MAX_K * 255 * 128 < 2**31 <= (W8A8_MAX_K + 1) * 255 * 128
    big = torch.empty(1, W8A8_MAX_K + 1, dtype=torch.int8, device="meta")
    with pytest.raises(BadInput, match="int32 accumulator"):
        ops.linear_w8a8(torch.empty(1, W8A8_MAX_K + 1, device="meta"), big, torch.empty(1, device="meta"), None,
                        "none", None, False, None, None)
    xe = torch.randn(1, 64).expand(3, 64)  # stride-0 rows: computed as the rows they repeat
    y = ops.linear_w8a8(xe, w, ws, None, "none", None, False, None, None)
    assert torch.equal(y, ops.linear_w8a8(xe.contiguous(), w, ws, None, "none", None, False, None, None))


def test_one_vector_exp():
    """csrc holds one vector exp (vec_math.h): attention.cpp uses it, not a copy."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "csrc" / "cpu"
    att = (root / "attention.cpp").read_text()
    assert "exp_avx512(x)" in att and "exp_avx2(x)" in att and "e-3f" not in att
