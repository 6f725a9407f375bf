"""The C++ int4 weight-only GEMM (lathe.kernels.cpu_int4) against lathe.kernels.reference, on
every ISA path, over odd shapes (K and N not multiples of the tiles, ragged last groups),
group sizes 32/64/128, symmetric and asymmetric weights, fp32 and bf16 activations, with and
without bias, for both numeric routes (exact fp32, and int8 activations)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lathe.compress.quantize import sqnr_db
from lathe.kernels import cpu, reference as ref
from lathe.kernels.cpu_int4 import int4_linear, int4_pack
from testkit import ISAS, cpu_lacks, isa_or_skip, assert_each_raises



def _weights(N, K, g, sym, seed):
    """Random lathe-int4 weights (any code, any zero point) with K possibly ragged."""
    gen = torch.Generator().manual_seed(seed)
    G = -(-K // g)
    codes = torch.randint(0, 16, (N, K + (K % 2)), dtype=torch.uint8, generator=gen)
    if K % 2:
        codes[:, -1] = 0
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = torch.rand(N, G, generator=gen) * 0.02 + 1e-3
    zeros = None if sym else torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=gen)
    zfull = torch.full((N, G), 8, dtype=torch.uint8) if sym else zeros
    return qweight, scales, zeros, zfull


class _Truth:
    """Float64 models of one weight, built once: `exact(x, bias)` is the layer with
    W = (code - zero) * scale unrounded; `int8(x, bias)` is what the int8-activation route
    computes after the same fp32 quantization: per (row, group) inv = 127/amax (fp32),
    q = clamp(round_half_even(x * inv), +-127), sx = amax/127,
    y = sum_groups scale * sx * sum q * (code - zero)."""

    def __init__(self, qweight, scales, zeros, g, K):
        self.g, self.K, self.G = g, K, -(-K // g)
        self.scales = scales.double()
        self.w64 = ref.dequant_int4(qweight, self.scales, zeros, g, K)
        codes = torch.nn.functional.pad(ref.unpack_int4(qweight, K).double(), (0, self.G * g - K))
        self.wz = codes.view(-1, self.G, g) - zeros.double()[..., None]  # padded k meet q = 0

    def exact(self, x, bias):
        y = x.double() @ self.w64.t()
        return y + bias.double() if bias is not None else y

    def int8(self, x, bias):
        M, g, G = x.shape[0], self.g, self.G
        xf = torch.nn.functional.pad(x.float(), (0, G * g - self.K)).view(M, G, g)
        amax = xf.abs().amax(-1, keepdim=True)
        c127 = torch.full_like(amax, 127.0)  # tensor / tensor: a true fp32 division, as in C++
        inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))  # (127.0 / t is 127 * (1/t))
        q = torch.clamp(torch.round(xf * inv), -127, 127)
        sx = amax / c127
        acc = torch.einsum("mgk,ngk->mng", q.double(), self.wz)  # exact integers
        y = (acc * sx.double().view(M, 1, G) * self.scales[None]).sum(-1)
        return y + bias.double() if bias is not None else y


# (M, K, N, g): M in {1, 3, 17, 128, 257}; K and N off the tiles (16 columns, 4/8 k a lane);
# K = 77 and 200 leave a ragged last group (and an odd K).
CASES = [
    (1, 4096, 257, 32), (1, 160, 17, 32), (1, 384, 40, 128),
    (3, 96, 17, 32), (3, 77, 18, 64),
    (17, 160, 40, 32), (17, 4096, 40, 64),
    (128, 256, 40, 64), (128, 200, 33, 128),
    (257, 384, 257, 128), (257, 96, 17, 32),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,N,g", CASES)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_int4_linear_matches_reference(isa, M, K, N, g, sym):
    isa_or_skip(isa)
    qw, sc, z, zfull = _weights(N, K, g, sym, seed=M * 7919 + K * 31 + N + g)
    gen = torch.Generator().manual_seed(K + N)
    x32 = torch.randn(M, K, generator=gen) * 2 - 0.25
    bias = torch.randn(N, generator=gen)
    packed = int4_pack(qw, sc, z, g, K=K)
    truth = _Truth(qw, sc, zfull, g, K)
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        for b in (None, bias):
            r32 = ref.linear_w4a16(x, qw, sc, zfull, g, b)
            r64 = truth.exact(x, b)
            with cpu.force_isa(isa):
                ye = int4_linear(x, packed, N, K, g, b, exact=True)
                y8 = int4_linear(x, packed, N, K, g, b)
            assert ye.dtype == dtype and y8.dtype == dtype and ye.shape == (M, N)
            scale = max(1.0, r64.abs().max().item())
            ref_err = (r32.double() - r64).abs().max().item()
            # exact route: <= 2x the reference's own error against float64, plus a tiny
            # 1e-6 relative slack (a few fp32 ulps: different but equally long summations).
            # bf16 outputs: both are rounded once more to 8 bits, and the two fp32 sums can
            # straddle a rounding boundary. There the reference's own rounding error is
            # already about half a bf16 ulp (covered by 2 * ref_err); 2^-9 of the largest
            # output (a quarter ulp) is margin on top.
            slack = 1e-6 * scale + (2.0 ** -9 * scale if dtype == torch.bfloat16 else 0.0)
            err = (ye.double() - r64).abs().max().item()
            assert err <= 2 * ref_err + slack, ("exact", dtype, b is not None, err, ref_err)
            # int8 route, checked two ways:
            # (1) exactness: equal to the route's own float64 model (same fp32 activation
            #     quantization, exact integer sums) up to its fp32 epilogue rounding (G
            #     groups of fp32 FMAs: 4e-6 * sqrt(G) relative), and for bf16 outputs up to
            #     their final rounding (half an ulp <= 2^-8 relative);
            r8 = truth.int8(x, b)
            err8 = (y8.double() - r8).abs().max().item()
            slack8 = 4e-6 * max(1.0, r8.abs().max().item()) * math.sqrt(-(-K // g))
            if dtype == torch.bfloat16:
                slack8 += 2.0 ** -8 * max(1.0, r8.abs().max().item())
            assert err8 <= slack8, ("int8 model", dtype, b is not None, err8)
            # (2) quality against the fp32 reference: per-group int8 activations add
            #     rounding noise of at most amax/254 an element, i.e. ~45 dB (g=32) to ~43 dB
            #     (g=128) SQNR for Gaussian rows; 35 dB leaves margin for small-K variance.
            #     Without bias (a bias only raises the signal), against fp32 math.
            if b is None:
                assert sqnr_db(r32.float(), y8.float()) >= 35, ("sqnr", dtype)


@pytest.mark.parametrize("isa", ["avx2", "avx512_vnni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_route_is_the_same_on_every_isa(isa, dtype):
    """All bodies compute the same int32 sums and the same fp32 epilogue order."""
    isa_or_skip(isa)
    M, K, N, g = 19, 320, 45, 64
    qw, sc, z, _ = _weights(N, K, g, False, seed=5)
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N)
    packed = int4_pack(qw, sc, z, g)
    with cpu.force_isa("scalar"):
        y0 = int4_linear(x, packed, N, K, g, b)
    with cpu.force_isa(isa):
        y1 = int4_linear(x, packed, N, K, g, b)
    assert torch.allclose(y0.float(), y1.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("exact", [False, True])
def test_decode_row_equals_the_same_row_in_a_batch(isa, exact):
    """The M = 1 fast paths (GEMV tiles) sum in the same order as the batched tiles."""
    isa_or_skip(isa)
    M, K, N, g = 13, 544, 70, 32
    qw, sc, z, _ = _weights(N, K, g, False, seed=11)
    x, b = torch.randn(M, K), torch.randn(N)
    packed = int4_pack(qw, sc, z, g)
    with cpu.force_isa(isa):
        yb = int4_linear(x, packed, N, K, g, b, exact=exact)
        for m in (0, 7, 12):
            assert torch.equal(int4_linear(x[m:m + 1], packed, N, K, g, b, exact=exact), yb[m:m + 1])


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("g", [32, 128])
def test_int4group_format_end_to_end(sym, g):
    """Weights quantized by lathe.compress.formats.Int4Group go straight in."""
    from lathe.compress.formats import Int4Group

    w = torch.randn(96, 512)
    x = torch.randn(9, 512)
    qw, sc, zr = Int4Group(group_size=g, symmetric=sym).quantize(w)
    packed = int4_pack(qw, sc, None if sym else zr, g)
    y = int4_linear(x, packed, 96, 512, g, exact=True)
    r = ref.linear_w4a16(x, qw, sc, zr, g)
    assert torch.allclose(y, r, rtol=1e-5, atol=1e-4)
    assert sqnr_db(x @ w.t(), int4_linear(x, packed, 96, 512, g)) > 15  # 4-bit weights


def test_shapes_strides_and_empty():
    K, N, g = 128, 20, 32
    qw, sc, z, zf = _weights(N, K, g, False, seed=1)
    packed = int4_pack(qw, sc, z, g)
    x = torch.randn(2, 3, K)
    y = int4_linear(x, packed, N, K, g, exact=True)
    assert y.shape == (2, 3, N)
    assert torch.allclose(y, ref.linear_w4a16(x, qw, sc, zf, g), rtol=1e-5, atol=1e-5)
    wide = torch.randn(5, K + 40)
    xs = wide[:, 7:7 + K]  # row stride K + 40
    assert torch.allclose(int4_linear(xs, packed, N, K, g, exact=True),
                          ref.linear_w4a16(xs, qw, sc, zf, g), rtol=1e-5, atol=1e-5)
    xt = torch.randn(K, 4).t()  # column-major: copied
    assert torch.allclose(int4_linear(xt, packed, N, K, g),
                          int4_linear(xt.contiguous(), packed, N, K, g))
    assert int4_linear(torch.empty(0, K), packed, N, K, g).shape == (0, N)
    bias_bf16 = torch.randn(N).bfloat16()  # a bias in x's dtype is accepted
    yb = int4_linear(x.bfloat16(), packed, N, K, g, bias_bf16)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("isa", ISAS)
def test_nan_rows_stay_nan(isa):
    isa_or_skip(isa)
    K, N, g = 96, 17, 32
    qw, sc, z, _ = _weights(N, K, g, False, seed=2)
    packed = int4_pack(qw, sc, z, g)
    x = torch.randn(3, K)
    x[1, 40] = float("nan")
    x[2, 5] = float("inf")
    with cpu.force_isa(isa):
        for exact in (False, True):
            y = int4_linear(x, packed, N, K, g, exact=exact)
            assert torch.isfinite(y[0]).all()
            assert torch.isnan(y[1]).all()
            assert not torch.isfinite(y[2]).any()


def test_bad_inputs_raise_value_error_naming_the_problem():
    K, N, g = 64, 16, 32
    qw, sc, z, _ = _weights(N, K, g, False, seed=3)
    packed = int4_pack(qw, sc, z, g)
    x = torch.randn(2, K)
    cases = [
        (lambda: int4_linear(x.half(), packed, N, K, g), "float32 or bfloat16"),
        (lambda: int4_linear(x.long(), packed, N, K, g), "float32 or bfloat16"),
        (lambda: int4_linear(torch.randn(2, K + 1), packed, N, K, g), "last dimension"),
        (lambda: int4_linear(x, packed, N + 16, K, g), "elements"),
        (lambda: int4_linear(x, packed, N, K, 48), "group_size"),
        (lambda: int4_linear(x, {"codes": packed["codes"]}, N, K, g), "packed"),
        (lambda: int4_linear(x, packed, N, K, g, torch.randn(N + 1)), "bias"),
        (lambda: int4_linear(x, packed, N, K, g, torch.randn(N).double()), "bias"),
        (lambda: int4_linear(x, dict(packed, scales=packed["scales"].repeat_interleave(2)[::2]),
                             N, K, g), "scales.* contiguous"),
        (lambda: int4_linear(x, dict(packed, codes=packed["codes"].repeat_interleave(2)[::2]),
                             N, K, g), "codes.* contiguous"),
        (lambda: int4_pack(qw.to(torch.int8), sc, z, g), "uint8"),
        (lambda: int4_pack(qw, sc[:, :1], z, g), "scales"),
        (lambda: int4_pack(qw, sc, z[:, :1], g), "zeros"),
        (lambda: int4_pack(qw, sc, z, 16), "group_size"),
        (lambda: int4_pack(qw, sc, z, g, K=K + 5), "bytes a row"),
        (lambda: int4_pack(qw, sc, z + 16, g), "not a 4-bit code"),  # from C++
    ]
    assert_each_raises(cases)


def test_cxx_layer_validates_before_touching_pointers():
    """The raw binding (null pointers!) must refuse bad sizes with the values in the message."""
    from lathe import _ext

    C = _ext.require_cpu()
    assert_each_raises([
        (lambda: C.int4_linear(0, 0, 1, 64, 64, 0, 0, 0, 16, 40, 0, 0, 16, 0, 1),
         "group size must be 32, 64 or 128, got 40"),
        (lambda: C.int4_linear(0, 0, 1, 0, 64, 0, 0, 0, 16, 32, 0, 0, 16, 0, 1), "K=0"),
        (lambda: C.int4_linear(0, 5, 1, 64, 64, 0, 0, 0, 16, 32, 0, 0, 16, 0, 1), "dtype code must be 0 .* got 5"),
        (lambda: C.int4_linear(0, 0, 1, 64, 64, 0, 0, 0, 16, 32, 0, 0, 16, 7, 1), "mode must be"),
        (lambda: C.int4_linear(0, 0, 1, 64, 10, 0, 0, 0, 16, 32, 0, 0, 16, 0, 1), "ldx=10"),
        (lambda: C.int4_linear(0, 0, 1, 64, 64, 0, 0, 0, 16, 32, 0, 0, 16, 0, 1), "null pointer"),
        (lambda: C.int4_pack(0, 3, 0, 2, 0, 2, 16, 64, 32, 0, 0, 0), "row stride 3 < ceil"),
    ], ValueError)
    C.int4_linear(0, 0, 0, 64, 64, 0, 0, 0, 16, 32, 0, 0, 16, 0, 1)  # M = 0: nothing to touch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 20), K=st.integers(1, 300), N=st.integers(1, 70),
       g=st.sampled_from([32, 64, 128]), sym=st.booleans(), bf16=st.booleans(),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_property_any_shape(M, K, N, g, sym, bf16, isa, seed):
    if cpu_lacks(isa):
        isa = cpu.best_isa()
    qw, sc, z, zf = _weights(N, K, g, sym, seed)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
    if bf16:
        x = x.bfloat16()
    packed = int4_pack(qw, sc, z, g, K=K)
    with cpu.force_isa(isa):
        ye = int4_linear(x, packed, N, K, g, exact=True)
        y8 = int4_linear(x, packed, N, K, g)
    assert ye.shape == y8.shape == (M, N) and ye.dtype == y8.dtype == x.dtype
    if M == 0:
        return
    truth = _Truth(qw, sc, zf, g, K)
    r64 = truth.exact(x, None)
    r32 = ref.linear_w4a16(x, qw, sc, zf, g)
    scale = max(1.0, r64.abs().max().item())
    tol = 2 * (r32.double() - r64).abs().max().item() + 1e-6 * scale
    if bf16:
        tol += 2.0 ** -9 * scale
    assert (ye.double() - r64).abs().max().item() <= tol
    r8 = truth.int8(x, None)
    tol8 = 4e-6 * max(1.0, r8.abs().max().item()) * math.sqrt(-(-K // g))
    if bf16:
        tol8 += 2.0 ** -8 * max(1.0, r8.abs().max().item())
    assert (y8.double() - r8).abs().max().item() <= tol8


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 200), N=st.integers(1, 40), g=st.sampled_from([32, 64, 128]),
       bad=st.sampled_from(["K", "N", "group", "dtype", "bias", "x_dim"]))
def test_property_bad_shapes_are_refused(K, N, g, bad):
    qw, sc, z, _ = _weights(N, K, g, False, seed=K * N)
    packed = int4_pack(qw, sc, z, g, K=K)
    x = torch.randn(3, K)
    kw = dict(x=x, packed=packed, N=N, K=K, group_size=g, bias=None)
    if bad == "K":  # one group more: x fits the call, the packed sizes do not
        kw["K"] = K + g
        kw["x"] = torch.randn(3, K + g)
    elif bad == "N":
        kw["N"] = N + 16
    elif bad == "group":
        kw["group_size"] = {32: 16, 64: 96, 128: 256}[g]
    elif bad == "dtype":
        kw["x"] = x.to(torch.float16)
    elif bad == "bias":
        kw["bias"] = torch.randn(N + 1)
    elif bad == "x_dim":
        kw["x"] = torch.randn(3, K + 3)
    with pytest.raises(ValueError):
        int4_linear(**kw)
