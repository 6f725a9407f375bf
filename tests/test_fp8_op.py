"""torch.ops.lathe.linear_fp8: on the CPU the reference simulation, bit-identical to what
QLinearFP8.forward computed before the op existed (so quality numbers hold); the module through
save/load, torch.compile and torch.export; bad inputs; the Triton path on sm_89+ GPUs."""
import pytest
import torch

from lathe.compress.formats import FP8E4M3
from lathe.compress.modules import QLinearFP8
from lathe.kernels import reference as ref
from lathe.kernels.dispatch import backend_for
from testkit import assert_each_raises, reloaded

op = torch.ops.lathe.linear_fp8


def _old_forward(x, weight, weight_scale, bias, act_granularity):
    """QLinearFP8.forward as it was (the golden numerics), verbatim."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if act_granularity == "per_token" else xf.abs().amax()
    sx = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    xq = (xf / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    y = (xq.float() @ weight.float().t()) * sx * weight_scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _weights(N, K, gran, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    return FP8E4M3(gran).quantize(w)


@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("act", ["per_token", "per_tensor"])
def test_op_is_bit_identical_to_the_old_module_forward(gran, act):
    assert backend_for("linear_fp8", "cpu") == "reference"
    for M, K, N in ((1, 16, 1), (3, 48, 17), (17, 272, 100), (4, 1040, 33)):
        w, s = _weights(N, K, gran, seed=M + K + N)
        gen = torch.Generator().manual_seed(K)
        x32 = torch.randn(2, M, K, generator=gen) * 3
        x32[0, 0] = 0  # an all-zero token: scale 1, not a division by zero
        bias = torch.randn(N, generator=gen)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = x32.to(dtype)
            for b in (None, bias):
                y = op(x, w, s, b, act)
                assert y.dtype == dtype and y.shape == (2, M, N)
                assert torch.equal(y, _old_forward(x, w, s, b, act))
                assert torch.equal(y, ref.linear_fp8(x, w, s, b, act))


def test_fp8_is_close_to_fp32():
    """Sanity of the simulation itself: e4m3 has 3 mantissa bits (~ -30 dB per operand)."""
    from lathe.compress.quantize import sqnr_db

    w32 = torch.randn(64, 256) * 0.05
    w, s = FP8E4M3().quantize(w32)
    x = torch.randn(32, 256)
    assert sqnr_db(x @ w32.t(), op(x, w, s, None, "per_token")) > 20


def test_module_round_trips_and_traces(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40)
    m = QLinearFP8.from_linear(lin, granularity="per_tensor", act_granularity="per_token")
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = m(x)
        assert torch.equal(y, _old_forward(x, m.weight, m.weight_scale, m.bias, "per_token"))
    r = reloaded(m, tmp_path)
    with torch.no_grad():
        assert torch.equal(r(x), y)
        assert torch.equal(torch.compile(m, fullgraph=True, backend="aot_eager")(x), y)
        ep = torch.export.export(m, (x,))
        assert torch.equal(ep.module()(x), y)
    assert "lathe.linear_fp8.default" in {str(n.target) for n in ep.graph.nodes}


def test_bad_inputs_name_the_problem():
    w, s = _weights(16, 64, "per_channel", seed=1)
    x = torch.randn(2, 64)
    cases = [
        (lambda: op(x, w, s, None, "per_channel"), "act_granularity must be per_token or per_tensor"),
        (lambda: op(x, w.float(), s, None, "per_token"), "w_fp8 must be float8_e4m3fn"),
        (lambda: op(torch.randn(2, 63), w, s, None, "per_token"), r"\[..., K=64\]"),
        (lambda: op(x.long(), w, s, None, "per_token"), "x must be float32"),
        (lambda: op(x, w, s[:3], None, "per_token"), r"w_scale must be float32 \[16\] or \[1\]"),
        (lambda: op(x, w, s.double(), None, "per_token"), "w_scale must be float32"),
        (lambda: op(x, w, s, torch.randn(15), "per_token"), r"bias must be float \[16\]"),
    ]
    assert_each_raises(cases)


def _scaled_mm_anchor(xq, w, sx, s, b):
    """The same FP8 GEMM through cuBLAS (torch._scaled_mm, unit scales, fp32 out), then the
    same fp32 scaling: PyTorch's own error on these codes. _scaled_mm wants every dim a
    multiple of 16, so x and w are zero-padded (zeros add nothing to the sums)."""
    M, K = xq.shape
    N = w.shape[0]
    pad = lambda n: -n % 16  # noqa: E731
    xp = torch.nn.functional.pad(xq.float(), (0, pad(K), 0, pad(M))).to(torch.float8_e4m3fn).cuda()
    wp = torch.nn.functional.pad(w.float(), (0, pad(K), 0, pad(N))).to(torch.float8_e4m3fn).cuda()
    one = torch.ones((), device="cuda")
    acc = torch._scaled_mm(xp, wp.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (acc[:M, :N].cpu() * sx * s + b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an sm_89+ GPU")
@pytest.mark.parametrize("act", ["per_token", "per_tensor"])
@pytest.mark.parametrize("M,K,N", [(33, 256, 80), (3, 1040, 17), (257, 4096, 96)])
def test_triton_fp8_matches_the_reference(act, M, K, N):
    """Same FP8 codes on both sides; against an fp64 evaluation, lathe's error is at most 2x
    that of torch._scaled_mm (Hopper's FP8 MMA does not accumulate in exact fp32, so the bound
    is cuBLAS's measured error, not a count of fp32 ulps), plus one fp32 ulp of the largest
    term."""
    assert backend_for("linear_fp8", "cuda") == "triton"
    w, s = _weights(N, K, "per_channel", seed=3)
    gen = torch.Generator().manual_seed(M)
    x, b = torch.randn(M, K, generator=gen), torch.randn(N, generator=gen)
    xq, sx = ref.quantize_fp8_act(x, act)
    truth = (xq.double() @ w.double().t()) * sx.double() * s.double() + b.double()
    y = op(x.cuda(), w.cuda(), s.cuda(), b.cuda(), act).cpu()
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    anchor = _scaled_mm_anchor(xq, w, sx, s, b)
    mag = ((xq.float().abs() @ w.float().abs().t()) * sx * s + b.abs()).max().item()
    err = (y.double() - truth).abs().max().item()
    base = (anchor.double() - truth).abs().max().item()
    assert err <= 2 * base + torch.finfo(torch.float32).eps * mag, (err, base)
