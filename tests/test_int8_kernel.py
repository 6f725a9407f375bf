"""The C++ W8A8 kernel against the PyTorch reference, on every ISA path, over odd shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lathe.errors import BadInput
from lathe.kernels import cpu, reference as ref
from testkit import ISAS, isa_or_skip



def _ref64(x, w, ws, b, act, smooth, asym):
    """The same math in float64: what the fp32 epilogue's own rounding is measured against."""
    x = x.double() * (smooth.double() if smooth is not None else 1)
    q, s, zp = ref.quantize_rows_u8((x.float()), asym)
    y = ((q - zp).double() @ w.double().t()) * s.double() * ws.double()
    if b is not None:
        y = y + b.double()
    return ref.apply_act(y, act)


def case(M, K, N, seed):
    """x (off-centre), int8 weights, per-channel scales, bias and a SmoothQuant vector."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3 - 0.5
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    ws = torch.rand(N, generator=g) * 0.01
    b = torch.randn(N, generator=g)
    sm = torch.rand(K, generator=g) + 0.5
    return x, w, ws, b, sm


def assert_close_to_ref64(y, x, w, ws, b, act, sm, asym):
    r32 = ref.linear_w8a8(x, w, ws, b, act, sm, asym)
    r64 = _ref64(x, w, ws, b, act, sm, asym)
    ref_err = (r32.double() - r64).abs().max().item()
    err = (y.double() - r64).abs().max().item()
    # lathe's error <= 2x the reference's own fp32 error (+ the GELU approximation's 1.5e-7).
    assert err <= 2 * ref_err + 1e-6 * max(1.0, r64.abs().max().item()), (err, ref_err)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,N", [(1, 384, 1536), (3, 17, 5), (17, 100, 33), (128, 384, 384),
                                   (257, 257, 17), (1, 1, 1), (5, 4096, 3)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_int8_linear_matches_reference(isa, M, K, N, asym, act):
    isa_or_skip(isa)
    x, w, ws, b, sm = case(M, K, N, M * 1000 + K * 10 + N)
    p, c = cpu.int8_pack(w)
    with cpu.force_isa(isa):
        y = cpu.int8_linear(x, p, c, ws, b, N, act, sm, asym)
    assert_close_to_ref64(y, x, w, ws, b, act, sm, asym)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("asym", [False, True])
def test_quantization_codes_are_exact(isa, asym):
    isa_or_skip(isa)
    x = torch.randn(33, 257) * torch.linspace(0.1, 10, 257)
    x[3] = 0.0  # an all-zero row: scale 1, no division by zero
    with cpu.force_isa(isa):
        q, s, z = cpu.quantize_rows_u8(x, asym)
    rq, rs, rz = ref.quantize_rows_u8(x, asym)
    assert torch.equal(q.float(), rq) and torch.equal(s, rs) and torch.equal(z.float(), rz)


def test_quantized_matmul_sqnr():
    """Quality property: W8A8 of a random Gaussian layer keeps > 30 dB against fp32."""
    from lathe.compress.formats import Int8PerChannel
    from lathe.compress.quantize import sqnr_db

    x, w = torch.randn(64, 512), torch.randn(256, 512)
    q, s = Int8PerChannel().quantize(w)
    p, c = cpu.int8_pack(q)
    y = cpu.int8_linear(x, p, c, s, None, 256, "none", None, True)
    assert sqnr_db(x @ w.t(), y) > 30


def test_nan_input_gives_nan_rows_not_garbage():
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    p, c = cpu.int8_pack(w)
    y = cpu.int8_linear(x, p, c, torch.ones(16), None, 16)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("bad,match", [
    (lambda x, p, c, s: cpu.int8_linear(x.double(), p, c, s, None, 16), "float32"),
    (lambda x, p, c, s: cpu.int8_linear(x, p[:-1], c, s, None, 16), "packed weight"),
    (lambda x, p, c, s: cpu.int8_linear(x, p, c, s[:3], None, 16), "w_scale"),
    (lambda x, p, c, s: cpu.int8_linear(x, p, c, s, None, 16, "tanh"), "unknown act"),
    (lambda x, p, c, s: cpu.int8_pack(torch.zeros(4, 4)), "int8"),
])
def test_bad_inputs_raise_value_error(bad, match):
    x = torch.randn(2, 64)
    p, c = cpu.int8_pack(torch.zeros(16, 64, dtype=torch.int8))
    with pytest.raises(BadInput, match=match):
        bad(x, p, c, torch.ones(16))


def test_non_contiguous_input_is_handled():
    x = torch.randn(64, 8).t()  # [8, 64] with a stride
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    p, c = cpu.int8_pack(w)
    ws = torch.rand(16)
    assert torch.equal(cpu.int8_linear(x, p, c, ws, None, 16), cpu.int8_linear(x.contiguous(), p, c, ws, None, 16))


@settings(max_examples=40, deadline=None)
@given(M=st.integers(0, 40), K=st.integers(1, 300), N=st.integers(1, 70), asym=st.booleans())
def test_property_shapes(M, K, N, asym):
    g = torch.Generator().manual_seed(M + 7 * K + 13 * N)
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    ws = torch.rand(N, generator=g)
    p, c = cpu.int8_pack(w)
    y = cpu.int8_linear(x, p, c, ws, None, N, "none", None, asym)
    assert y.shape == (M, N)
    if M:
        r = ref.linear_w8a8(x, w, ws, None, "none", None, asym)
        assert torch.allclose(y, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()))


def test_op_dispatch_and_fake():
    from lathe.kernels import backend_for, use_backend

    assert backend_for("linear_w8a8", "cpu") == "cpu"
    with use_backend("reference", "linear_w8a8"):
        assert backend_for("linear_w8a8", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown lathe op"):
        backend_for("nope", "cpu")
    x = torch.randn(4, 32)
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    ws = torch.rand(8)
    a = torch.ops.lathe.linear_w8a8(x, w, ws, None, "none", None, True, None, None)
    with use_backend("reference"):
        r = torch.ops.lathe.linear_w8a8(x, w, ws, None, "none", None, True, None, None)
    assert torch.allclose(a, r, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.lathe.linear_w8a8(torch.empty(5, 3, 32), torch.empty(8, 32, dtype=torch.int8),
                                          torch.empty(8), None, "none", None, True, None, None)
    assert out.shape == (5, 3, 8)
