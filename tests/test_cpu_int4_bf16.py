"""The AVX512-BF16 int4 body (csrc/cpu/int4_bf16.cpp): the exact route (mode 1) of int4_linear
for bf16 activations at M >= 4, forced with the avx512_bf16 level, against the float64 model of
the unrounded weights with test_cpu_int4's tolerance (2x the fp32 reference's own error, plus
the bf16 output rounding)."""
import pytest
import torch

from lathe.kernels import cpu, reference as ref
from lathe.kernels.cpu_int4 import int4_linear, int4_pack

from test_cpu_int4 import _Truth, _weights

bf16 = torch.bfloat16
LEVELS = ["avx512_bf16", "amx"]
# M >= 4 (the body's minimum) and below it; K ragged against groups, pairs and lines
CASES = [(3, 96, 17, 32), (4, 77, 18, 64), (17, 160, 40, 32), (17, 4096, 40, 64), (128, 200, 33, 128),
         (257, 384, 257, 128), (257, 1, 3, 32), (5, 33, 16, 32)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("M,K,N,g", CASES)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_exact_route_matches_reference(level, M, K, N, g, sym):
    why = cpu.isa_missing(level)
    if why:
        pytest.skip(why)
    qw, sc, z, zfull = _weights(N, K, g, sym, seed=M * 7919 + K * 31 + N + g)
    gen = torch.Generator().manual_seed(K + N)
    x = (torch.randn(M, K, generator=gen) * 2 - 0.25).to(bf16)
    bias = torch.randn(N, generator=gen)
    packed = int4_pack(qw, sc, z, g, K=K)
    truth = _Truth(qw, sc, zfull, g, K)
    for b in (None, bias):
        r32 = ref.linear_w4a16(x, qw, sc, zfull, g, b)
        r64 = truth.exact(x, b)
        with cpu.force_isa(level):
            y = int4_linear(x, packed, N, K, g, b, exact=True)
        assert y.dtype == bf16 and y.shape == (M, N)
        scale = max(1.0, r64.abs().max().item())
        ref_err = (r32.double() - r64).abs().max().item()
        err = (y.double() - r64).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * scale + 2.0 ** -9 * scale, (b is not None, err, ref_err)


def test_rows_give_the_same_bits_in_any_batch_the_body_takes():
    why = cpu.isa_missing("avx512_bf16")
    if why:
        pytest.skip(why)
    M, K, N, g = 70, 544, 70, 32
    qw, sc, z, _ = _weights(N, K, g, False, seed=3)
    x, b = torch.randn(M, K).to(bf16), torch.randn(N)
    packed = int4_pack(qw, sc, z, g, K=K)
    with cpu.force_isa("avx512_bf16"):
        yb = int4_linear(x, packed, N, K, g, b, exact=True)
        for m0, m1 in ((0, 4), (3, 8), (60, 70), (5, 22)):
            assert torch.equal(int4_linear(x[m0:m1], packed, N, K, g, b, exact=True), yb[m0:m1])
