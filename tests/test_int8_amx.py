"""The AMX-INT8 body of the W8A8 linear (csrc/cpu/int8_gemm_amx.cpp).

On an AMX CPU the real tiles run against the PyTorch reference (LATHE_ISA level amx). Everywhere
with AVX-512 VNNI, the same driver (blocking, K-tail tiles, row padding, epilogue) runs with the
tile operations emulated in C++, and must give the VNNI body's exact bits: both sum the same
int32 products and share the epilogue's order."""
import contextlib

import pytest
import torch

from lathe import _ext
from lathe.kernels import cpu

from test_int8_kernel import assert_close_to_ref64, case

SHAPES = [(16, 64, 16), (17, 17, 5), (32, 100, 33), (33, 257, 48), (48, 384, 40), (257, 1, 3), (64, 65, 1)]


@contextlib.contextmanager
def _emulated():
    C = _ext.require_cpu()
    C.amx_emulate(True)
    try:
        yield
    finally:
        C.amx_emulate(False)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_amx_matches_reference(M, K, N, asym, act):
    why = cpu.isa_missing("amx")
    if why:
        pytest.skip(why)
    x, w, ws, b, sm = case(M, K, N, M * 1000 + K * 10 + N)
    p, c = cpu.int8_pack(w)
    with cpu.force_isa("amx"):
        y = cpu.int8_linear(x, p, c, ws, b, N, act, sm, asym)
    with cpu.force_isa("avx512_vnni"):
        y_vnni = cpu.int8_linear(x, p, c, ws, b, N, act, sm, asym)
    assert_close_to_ref64(y, x, w, ws, b, act, sm, asym)
    assert torch.equal(y, y_vnni)  # same int32 sums, same epilogue


def test_amx_peak_runs():
    why = cpu.isa_missing("amx")
    if why:
        pytest.skip(why)
    assert _ext.require_cpu().amx_peak_gops(1) > 0


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_emulated_amx_driver_gives_the_vnni_bits(M, K, N, asym, act, bias):
    why = cpu.isa_missing("avx512_vnni")
    if why:
        pytest.skip(why)
    x, w, ws, b, sm = case(M, K, N, M * 7 + K * 3 + N)
    b = b if bias else None
    p, c = cpu.int8_pack(w)
    with cpu.force_isa("avx512_vnni"):
        y_vnni = cpu.int8_linear(x, p, c, ws, b, N, act, sm, asym)
        with _emulated():
            y_amx = cpu.int8_linear(x, p, c, ws, b, N, act, sm, asym)
    assert torch.equal(y_amx, y_vnni)
    assert_close_to_ref64(y_amx, x, w, ws, b, act, sm, asym)


def test_emulated_amx_keeps_nan_rows_and_small_m_takes_vnni():
    why = cpu.isa_missing("avx512_vnni")
    if why:
        pytest.skip(why)
    C = _ext.require_cpu()
    x, w, ws, b, sm = case(40, 70, 20, 5)
    x[3, 7] = float("nan")
    p, c = cpu.int8_pack(w)
    with cpu.force_isa("avx512_vnni"), _emulated():
        y = cpu.int8_linear(x, p, c, ws, b, 20, "none", None, False)
        small = cpu.int8_linear(x[: C.amx_min_m - 1], p, c, ws, b, 20, "none", None, False)
    assert torch.isnan(y[3]).all() and not torch.isnan(y[torch.arange(40) != 3]).any()
    with cpu.force_isa("avx512_vnni"):
        vnni = cpu.int8_linear(x[: C.amx_min_m - 1], p, c, ws, b, 20, "none", None, False)
    torch.testing.assert_close(small, vnni, rtol=0, atol=0, equal_nan=True)
