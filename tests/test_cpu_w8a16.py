"""torch.ops.lathe.linear_w8a16 and its C++ CPU kernel (lathe.kernels.cpu_w8a16) against
lathe.kernels.reference, on every ISA path, over odd shapes (K and N off the vector widths),
per-channel and grouped scales, fp32/bf16/fp16 activations, with and without bias; the module
(QLinearW8A16) through save/load, torch.compile and torch.export; bad inputs."""
import json

import pytest
import torch

from lathe.compress.modules import QLinearW8A16
from lathe.kernels import cpu, reference as ref
from lathe.kernels.cpu_w8a16 import w8a16_linear, w8a16_pack
from lathe.kernels.dispatch import backend_for, use_backend
from testkit import ISAS, cpu_lacks, isa_or_skip, assert_each_raises, reloaded

op = torch.ops.lathe.linear_w8a16


def _weights(N, K, g, seed):
    """Random Int8WeightOnly weights: any code in [-127, 127], positive scales [N, G]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    G = K // g if g else 1
    s = torch.rand(N, G, generator=gen) * 0.02 + 1e-3
    return q, s


def _truth(x, q, s, bias):
    """Float64 layer with the unrounded weight q * s, and the largest sum of |terms| a row
    (what fp32 summation errors scale with)."""
    N, K = q.shape
    w = (q.double().view(N, s.shape[1], -1) * s.double()[..., None]).view(N, K)
    y = x.double() @ w.t()
    mag = x.double().abs() @ w.abs().t()
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    return y, (mag.max().item() if mag.numel() else 0.0)


def _tolerance(r32, r64, mag, dtype):
    """lathe may err at most 2x the fp32 reference's own error against float64, plus 4 fp32
    ulps of the largest sum of |terms| (two equally long but differently ordered summations:
    with one output, the reference can be lucky); for bf16/fp16 outputs both are rounded once
    more and two fp32 sums can straddle a rounding boundary: the reference's rounding (about
    half an ulp) is in 2 * ref_err, a quarter ulp of the largest output is margin on top."""
    ref_err = (r32.double() - r64).abs().max().item()
    ulp = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}[dtype]
    return 2 * ref_err + 2.0 ** -22 * mag + ulp * r64.abs().max().item()


KS = [16, 48, 272, 1040, 256, 1024]  # the last two divide by 32 and 128 (grouped scales)


def _groups(K):
    return [0] + [g for g in (16, 32, 128) if K % g == 0]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 17, 257])
@pytest.mark.parametrize("K", KS)
def test_op_matches_reference(isa, M, K):
    isa_or_skip(isa)
    gen = torch.Generator().manual_seed(M * 131 + K)
    x32 = torch.randn(M, K, generator=gen) * 2 - 0.25
    for N in (1, 17, 100):
        bias = torch.randn(N, generator=gen)
        for g in _groups(K):
            q, s = _weights(N, K, g, seed=N * 7 + K + g)
            packed = w8a16_pack(q, s, g)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = x32.to(dtype)
                for b in (None, bias):
                    r32 = ref.linear_w8a16(x, q, s, b)
                    r64, mag = _truth(x, q, s, b)
                    with cpu.force_isa(isa):
                        y = op(x, q, s, b, g, packed)
                    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
                    err = (y.double() - r64).abs().max().item()
                    tol = _tolerance(r32, r64, mag, dtype)
                    assert err <= tol, (N, g, dtype, b is not None, err, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_isa_gives_the_same_bits(dtype):
    """All bodies run the same fp32 operations in the same order."""
    M, K, N, g = 19, 320, 45, 64
    q, s = _weights(N, K, g, seed=5)
    x, b = torch.randn(M, K).to(dtype), torch.randn(N)
    packed = w8a16_pack(q, s, g)
    outs = []
    for isa in ISAS:
        if not cpu_lacks(isa):
            with cpu.force_isa(isa):
                outs.append(w8a16_linear(x, packed, N, g, b))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("g", [0, 32])
def test_decode_row_equals_the_same_row_in_a_batch(isa, g):
    """M = 1 (the GEMV tile) and every batched tile height sum in the same order."""
    isa_or_skip(isa)
    M, K, N = 70, 544, 70  # 70 rows: full tiles, a ragged tile and a second row block
    q, s = _weights(N, K, g, seed=11)
    x, b = torch.randn(M, K), torch.randn(N)
    packed = w8a16_pack(q, s, g)
    with cpu.force_isa(isa):
        yb = w8a16_linear(x, packed, N, g, b)
        for m in (0, 7, 69):
            assert torch.equal(w8a16_linear(x[m:m + 1], packed, N, g, b), yb[m:m + 1])
        assert torch.equal(w8a16_linear(x[3:8], packed, N, g, b), yb[3:8])


def test_threads_do_not_change_the_bits():
    M, K, N, g = 130, 300, 200, 0  # three row blocks, 13 column blocks
    q, s = _weights(N, K, g, seed=4)
    x, b = torch.randn(M, K), torch.randn(N)
    packed = w8a16_pack(q, s, g)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = w8a16_linear(x, packed, N, g, b)
        torch.set_num_threads(2)
        assert torch.equal(w8a16_linear(x, packed, N, g, b), y1)
        assert torch.equal(w8a16_linear(x[:1], packed, N, g, b), y1[:1])
    finally:
        torch.set_num_threads(prev)


def test_shapes_strides_packing_and_backends():
    K, N, g = 128, 20, 32
    q, s = _weights(N, K, g, seed=1)
    packed = w8a16_pack(q, s, g)
    x = torch.randn(2, 3, K)
    y = op(x, q, s, None, g, packed)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, op(x, q, s, None, g, None))  # packed on the fly: same bits
    with use_backend("reference", "linear_w8a16"):
        r = op(x, q, s, None, g, packed)  # the reference ignores the packed copy
    assert torch.equal(r, ref.linear_w8a16(x, q, s))
    assert (y - r).abs().max() <= 1e-5 * r.abs().max()
    wide = torch.randn(5, K + 40)
    xs = wide[:, 7:7 + K]  # row stride K + 40: read in place
    assert torch.equal(op(xs, q, s, None, g, packed), op(xs.contiguous(), q, s, None, g, packed))
    xt = torch.randn(K, 4).t()  # column-major: copied
    assert torch.equal(op(xt, q, s, None, g, packed), op(xt.contiguous(), q, s, None, g, packed))
    assert op(torch.empty(0, K), q, s, None, g, packed).shape == (0, N)
    assert backend_for("linear_w8a16", "cpu") == "cpu"


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_stay_in_their_rows(isa):
    isa_or_skip(isa)
    K, N = 96, 40
    q, s = _weights(N, K, 0, seed=2)
    packed = w8a16_pack(q, s, 0)
    x = torch.randn(3, K)
    x[1, 40] = float("nan")
    x[2, 5] = float("inf")
    with cpu.force_isa(isa):
        y = w8a16_linear(x, packed, N, 0)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()


def test_bad_inputs_name_the_problem():
    K, N, g = 64, 16, 32
    q, s = _weights(N, K, g, seed=3)
    packed = w8a16_pack(q, s, g)
    x = torch.randn(2, K)
    cases = [
        (lambda: op(x.long(), q, s, None, g, packed), "x must be float32"),
        (lambda: op(torch.randn(2, K + 1), q, s, None, g, packed), r"\[..., K=64\]"),
        (lambda: op(x, q.to(torch.int16), s, None, g, packed), "qweight must be int8"),
        (lambda: op(x, q, s[:, :1], None, g, packed), r"scales must be float \[N, G\] = \[16, 2\]"),
        (lambda: op(x, q, s, None, 48, packed), "group_size must be 0 .* divide K=64, got 48"),
        (lambda: op(x, q, s, torch.randn(N + 1), g, packed), r"bias must be float \[16\]"),
        (lambda: op(x, q, s, None, g, packed[:-1]), "packed must be the uint8 buffer"),
        (lambda: op(x, q, s, None, g, packed.view(torch.int8)), "packed must be the uint8 buffer"),
        (lambda: op(x, q, s, None, g, torch.stack([packed, packed], 1)[:, 0]), "contiguous"),
        (lambda: w8a16_pack(q, s, 48), "group_size"),
        (lambda: w8a16_pack(q.float(), s, g), "qweight must be an int8"),
        (lambda: w8a16_pack(q, s.t(), g), "scales must be float"),
    ]
    assert_each_raises(cases)


def test_cxx_layer_validates_before_touching_pointers():
    """The raw binding (null pointers!) refuses bad sizes with the values in the message."""
    from lathe import _ext

    C = _ext.require_cpu()
    assert_each_raises([
        (lambda: C.w8a16_linear(0, 0, 1, 64, 64, 0, 16, 48, 0, 0, 16, 1), "divide K=64, got 48"),
        (lambda: C.w8a16_linear(0, 0, 1, 0, 64, 0, 16, 0, 0, 0, 16, 1), "K=0"),
        (lambda: C.w8a16_linear(0, 3, 1, 64, 64, 0, 16, 0, 0, 0, 16, 1), "dtype code must be 0 .* got 3"),
        (lambda: C.w8a16_linear(0, 0, 1, 64, 10, 0, 16, 0, 0, 0, 16, 1), "ldx=10"),
        (lambda: C.w8a16_linear(0, 0, 1, 64, 64, 0, 16, 0, 0, 0, 16, 1), "null pointer"),
        (lambda: C.w8a16_pack(0, 3, 0, 1, 16, 64, 0, 0), "row stride 3 < K=64"),
    ], ValueError)
    C.w8a16_linear(0, 0, 0, 64, 64, 0, 16, 0, 0, 0, 16, 1)  # M = 0: nothing to touch


# ----------------------------------------------------------------------------- the module


@pytest.fixture(scope="module")
def lin():
    torch.manual_seed(0)
    return torch.nn.Linear(256, 72)


@pytest.mark.parametrize("g", [None, 64])
def test_module_uses_the_kernel_and_round_trips_bit_identical(lin, g, tmp_path):
    """What checkpoint.build_model does: class + manifest_args on meta, the saved tensors
    (safetensors, no pickle), prepare(); forward must give the same bits."""
    m = QLinearW8A16.from_linear(lin, group_size=g)
    assert m._packed is not None  # prepare() packed for the CPU kernel
    x = torch.randn(4, 9, 256)
    with torch.no_grad():
        y = m(x)
        r = ref.linear_w8a16(x, m.qweight, m.scales, m.bias)
        assert (y - r).abs().max() <= 1e-5 * r.abs().max()
    assert "_packed" not in m.state_dict()
    json.dumps(m.manifest_args())
    r2 = reloaded(m, tmp_path)
    with torch.no_grad():
        assert torch.equal(r2(x), y)
        assert torch.equal(r2(x.bfloat16()), m(x.bfloat16()))


def test_module_traces_through_compile_and_export(lin):
    m = QLinearW8A16.from_linear(lin, group_size=32)
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), y)
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lathe.linear_w8a16.default" in targets
    with torch.no_grad():
        assert torch.equal(ep.module()(x), op(x, m.qweight, m.scales, m.bias, 32, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("g", [0, 32])
def test_cuda_triton_matches_reference(g):
    M, K, N = 5, 256, 96
    q, s = _weights(N, K, g, seed=9)
    x, b = torch.randn(M, K), torch.randn(N)
    r64, mag = _truth(x, q, s, b)
    r32 = ref.linear_w8a16(x, q, s, b)
    dev = "cuda"
    y = op(x.to(dev), q.to(dev), s.to(dev), b.to(dev), g, None).cpu()
    # the Triton dot may round x to tf32 (10 mantissa bits): 2^-11 of the sum of |terms|
    tol = 2 * (r32.double() - r64).abs().max().item() + 2.0 ** -11 * mag
    assert (y.double() - r64).abs().max().item() <= tol


def test_bench_section_runs_and_reports_ratios():
    """`lathe bench kernels`' w8a16 section on a tiny shape: every backend timed, ratios set."""
    from lathe.bench.kernels import bench_w8a16, w8a16_table

    recs = bench_w8a16([(64, 48)], (1, 3))
    assert {r["backend"] for r in recs} == {"lathe", "lathe bf16", "torch fp32", "onnxruntime MatMul fp32",
                                            "onnxruntime MatMulNBits 8-bit"}
    lathe_recs = [r for r in recs if r["backend"] == "lathe"]
    assert len(lathe_recs) == 2 and all(r["ratio_vs_torch_fp32"] > 0 and r["median_ms"] > 0 for r in lathe_recs)
    assert "x torch32" in w8a16_table(recs)
