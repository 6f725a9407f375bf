"""The AVX512-BF16 W8A16 body (csrc/cpu/w8a16_bf16.cpp) for bf16 activations, forced with the
avx512_bf16 level, against the reference with test_cpu_w8a16's tolerance (2x the fp32
reference's own error vs float64, plus the bf16 output rounding)."""
import pytest
import torch

from lathe.kernels import cpu, reference as ref
from lathe.kernels.cpu_w8a16 import w8a16_linear, w8a16_pack

from test_cpu_w8a16 import _groups, _tolerance, _truth, _weights

bf16 = torch.bfloat16
LEVELS = ["avx512_bf16", "amx"]


def _level_or_skip(level):
    why = cpu.isa_missing(level)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("M", [1, 3, 4, 17, 257])  # M < 4: the fp32 body
@pytest.mark.parametrize("K", [1, 3, 17, 48, 257, 272, 1024])
def test_matches_reference(level, M, K):
    _level_or_skip(level)
    gen = torch.Generator().manual_seed(M * 131 + K)
    x = (torch.randn(M, K, generator=gen) * 2 - 0.25).to(bf16)
    for N in (1, 17, 100):
        bias = torch.randn(N, generator=gen)
        for g in _groups(K) + ([K] if K % 2 else []):  # an odd group: the generic body takes it
            q, s = _weights(N, K, g, seed=N * 7 + K + g)
            packed = w8a16_pack(q, s, g)
            for b in (None, bias):
                with cpu.force_isa(level):
                    y = w8a16_linear(x, packed, N, g, b)
                r32 = ref.linear_w8a16(x, q, s, b)
                r64, mag = _truth(x, q, s, b)
                assert y.dtype == bf16 and y.shape == (M, N)
                err = (y.double() - r64).abs().max().item()
                assert err <= _tolerance(r32, r64, mag, bf16), (N, g, b is not None, err)


@pytest.mark.parametrize("g", [0, 32])
def test_a_row_gives_the_same_bits_in_any_batch_the_body_takes(g):
    """M >= 4 (the body's minimum): the same sums in the same order whatever the tile height."""
    _level_or_skip("avx512_bf16")
    M, K, N = 70, 544, 70
    q, s = _weights(N, K, g, seed=11)
    x, b = torch.randn(M, K).to(bf16), torch.randn(N)
    packed = w8a16_pack(q, s, g)
    with cpu.force_isa("avx512_bf16"):
        yb = w8a16_linear(x, packed, N, g, b)
        for m0, m1 in ((0, 4), (3, 8), (60, 70), (5, 22)):
            assert torch.equal(w8a16_linear(x[m0:m1], packed, N, g, b), yb[m0:m1])
        with cpu.force_isa("avx512_vnni"):  # M < 4 runs the fp32 body, at every level
            alone = w8a16_linear(x[7:8], packed, N, g, b)
        assert torch.equal(w8a16_linear(x[7:8], packed, N, g, b), alone)


def test_nan_row_stays_nan():
    _level_or_skip("avx512_bf16")
    q, s = _weights(33, 64, 0, seed=2)
    x = torch.randn(5, 64).to(bf16)
    x[2, 10] = float("nan")
    with cpu.force_isa("avx512_bf16"):
        y = w8a16_linear(x, w8a16_pack(q, s, 0), 33, 0, None)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4]]).any()
