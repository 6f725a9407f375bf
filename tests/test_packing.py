"""int4 packings (lathe.kernels.triton_kernels.packing): lathe nibbles, GPTQ and AWQ converters.

GPTQ/AWQ checkpoints are built here from known codes with small packers written from the
format descriptions (see packing.py's docstring), and the conversion must give back exactly
those codes, zeros and scales. The converters are plain PyTorch; the one end-to-end test that
runs the W4A16 kernel on a converted act-order weight skips without triton (and, with no CUDA
GPU, runs under TRITON_INTERPRET=1, set below before triton can be imported).
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from lathe.kernels import reference  # noqa: E402
from lathe.kernels.triton_kernels import packing as P  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits (as checkpoints store them)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_rows_of_8(codes: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """Pack int codes 0..15 eight to an int32 along `dim`; nibble i holds element order[i]."""
    c = codes.to(torch.int64)
    words = 0
    for i, j in enumerate(order):
        part = c[j::8] if dim == 0 else c[:, j::8]
        words = words | (part << (4 * i))
    return _to_int32(words)


def _gptq_checkpoint(codes_kn, zeros_gn, scales_gn):
    """GPTQ v1: qweight [K/8, N] along K, qzeros [G, N/8] along N stored as (z - 1) & 15."""
    return (_pack_rows_of_8(codes_kn, dim=0),
            _pack_rows_of_8((zeros_gn.to(torch.int64) - 1) & 0xF, dim=1),
            scales_gn)


def _awq_checkpoint(codes_kn, zeros_gn, scales_gn):
    """AWQ GEMM: qweight [K, N/8] and qzeros [G, N/8] along N in AutoAWQ's nibble order."""
    return (_pack_rows_of_8(codes_kn, dim=1, order=P.AWQ_ORDER),
            _pack_rows_of_8(zeros_gn, dim=1, order=P.AWQ_ORDER),
            scales_gn)


def _random_quant(K, N, g, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.randint(0, 16, (K // g, N), generator=gen)
    zeros[0, 0] = 0  # z = 0 is stored as 15 in GPTQ v1 (the wrap-around case)
    scales = (torch.rand(K // g, N, generator=gen) * 0.05 + 0.01).half()
    return codes, zeros, scales


def _dequant_kn(codes_kn, zeros_gn, scales_gn, g_idx):
    """W^T [K, N] as the checkpoint means it: (code - zero[g_idx[k]]) * scale[g_idx[k]]."""
    return (codes_kn.double() - zeros_gn.double()[g_idx]) * scales_gn.double()[g_idx]


# ----------------------------------------------------------------------------- lathe nibbles


@pytest.mark.parametrize("N,K", [(1, 2), (3, 17), (17, 96), (40, 160)])
def test_pack_unpack_int4_roundtrip(N, K):
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(K), dtype=torch.uint8)
    packed = P.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N, (K + 1) // 2)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0])  # low nibble = even k
    assert torch.equal(P.unpack_int4(packed, K), codes)
    assert torch.equal(reference.unpack_int4(packed, K), codes)


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError, match="0..15"):
        P.pack_int4(torch.tensor([[16, 0]]))
    with pytest.raises(ValueError, match="0..15"):
        P.pack_int4(torch.tensor([[-1, 0]]))


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("K,N,g", [(96, 16, 32), (160, 40, 32), (256, 8, 128)])
def test_gptq_roundtrip(K, N, g):
    codes, zeros, scales = _random_quant(K, N, g, seed=K + N)
    qweight, qzeros, sc = _gptq_checkpoint(codes, zeros, scales)
    assert qweight.shape == (K // 8, N) and qzeros.shape == (K // g, N // 8)
    trivial = torch.arange(K, dtype=torch.int32) // g
    for g_idx in (None, trivial):
        w = P.gptq_to_lathe(qweight, qzeros, sc, g_idx=g_idx)
        assert w.group_size == g and w.perm is None
        assert torch.equal(P.unpack_int4(w.qweight, K), codes.t().to(torch.uint8))
        assert torch.equal(w.zeros, zeros.t().to(torch.uint8))
        assert torch.equal(w.scales, scales.t()) and w.scales.dtype == torch.float16
        lathe_w = reference.dequant_int4(w.qweight, w.scales.float(), w.zeros, g, K).double()
        assert torch.equal(lathe_w, _dequant_kn(codes, zeros, scales, trivial.long()).t())


def test_gptq_v2_zeros_have_no_offset():
    codes, zeros, scales = _random_quant(64, 8, 32, seed=3)
    qweight = _pack_rows_of_8(codes, dim=0)
    qzeros = _pack_rows_of_8(zeros, dim=1)  # v2: the zero itself
    w = P.gptq_to_lathe(qweight, qzeros, scales, zero_offset=0)
    assert torch.equal(w.zeros, zeros.t().to(torch.uint8))


def _act_order_g_idx(K, g, seed):
    """GPTQ desc_act: columns quantized in a permuted order, group = position in it // g."""
    order = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // g).to(torch.int32)
    return g_idx


def test_gptq_act_order_returns_input_permutation():
    K, N, g = 96, 16, 32
    codes, zeros, scales = _random_quant(K, N, g, seed=11)
    g_idx = _act_order_g_idx(K, g, seed=5)
    w = P.gptq_to_lathe(*_gptq_checkpoint(codes, zeros, scales), g_idx=g_idx)
    assert w.perm is not None and sorted(w.perm.tolist()) == list(range(K))
    w_ckpt = _dequant_kn(codes, zeros, scales, g_idx.long()).t()  # [N, K], original k order
    w_lathe = reference.dequant_int4(w.qweight, w.scales.float(), w.zeros, g, K).double()
    # Column j of lathe's W is column perm[j]: x @ W^T == x[..., perm] @ W_lathe^T.
    assert torch.equal(w_lathe, w_ckpt[:, w.perm])
    # Groups are now contiguous runs of g columns.
    assert torch.equal(g_idx.long()[w.perm], torch.arange(K) // g)


def test_gptq_act_order_through_the_w4a16_kernel():
    pytest.importorskip("triton", exc_type=ImportError)
    from lathe.kernels.triton_kernels import qmatmul

    K, N, g = 96, 16, 32
    codes, zeros, scales = _random_quant(K, N, g, seed=12)
    g_idx = _act_order_g_idx(K, g, seed=6)
    w = P.gptq_to_lathe(*_gptq_checkpoint(codes, zeros, scales), g_idx=g_idx)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0))
    dev = [t.to(DEV) for t in (w.qweight, w.scales, w.zeros)]
    out = qmatmul.w4a16_linear(x[:, w.perm].to(DEV), *dev, g)
    w_ckpt = _dequant_kn(codes, zeros, scales, g_idx.long()).t()  # exact in fp64
    truth = x.double() @ w_ckpt.t()
    base = reference.linear_w4a16(x[:, w.perm], w.qweight, w.scales, w.zeros, g)  # fp32
    err = (out.cpu().double() - truth).abs().max()
    assert err <= 2 * (base.double() - truth).abs().max() + torch.finfo(torch.float32).eps * truth.abs().max()


def test_gptq_rejects_bad_inputs():
    codes, zeros, scales = _random_quant(64, 8, 32, seed=1)
    qweight, qzeros, sc = _gptq_checkpoint(codes, zeros, scales)
    with pytest.raises(ValueError, match="4-bit"):
        P.gptq_to_lathe(qweight, qzeros, sc, bits=8)
    with pytest.raises(ValueError, match="g_idx"):
        P.gptq_to_lathe(qweight, qzeros, sc, g_idx=torch.zeros(63, dtype=torch.int32))
    uneven = torch.zeros(64, dtype=torch.int32)
    uneven[-1] = 1
    with pytest.raises(ValueError, match="exactly"):
        P.gptq_to_lathe(qweight, qzeros, sc, g_idx=uneven)


# ----------------------------------------------------------------------------- AWQ


@pytest.mark.parametrize("K,N,g", [(96, 16, 32), (160, 40, 32), (128, 8, 64)])
def test_awq_roundtrip(K, N, g):
    codes, zeros, scales = _random_quant(K, N, g, seed=K * N)
    qweight, qzeros, sc = _awq_checkpoint(codes, zeros, scales)
    assert qweight.shape == (K, N // 8) and qzeros.shape == (K // g, N // 8)
    w = P.awq_to_lathe(qweight, qzeros, sc)
    assert w.group_size == g and w.perm is None
    assert torch.equal(P.unpack_int4(w.qweight, K), codes.t().to(torch.uint8))
    assert torch.equal(w.zeros, zeros.t().to(torch.uint8))
    assert torch.equal(w.scales, scales.t())
    lathe_w = reference.dequant_int4(w.qweight, w.scales.float(), w.zeros, g, K).double()
    assert torch.equal(lathe_w, _dequant_kn(codes, zeros, scales, torch.arange(K) // g).t())


def test_awq_nibble_order_is_autoawq_order_map():
    # One word whose nibble i holds the value i: AutoAWQ put column order_map[i] in nibble i,
    # so column j must read the value AWQ_REVERSE_ORDER[j].
    word = sum(i << (4 * i) for i in range(8))
    qweight = _to_int32(torch.tensor([[word]] * 32))
    w = P.awq_to_lathe(qweight, _to_int32(torch.zeros(1, 1, dtype=torch.int64)),
                       torch.ones(1, 8, dtype=torch.float16))
    assert P.unpack_int4(w.qweight, 32)[:, 0].tolist() == list(P.AWQ_REVERSE_ORDER)
    assert [P.AWQ_ORDER[P.AWQ_REVERSE_ORDER[j]] for j in range(8)] == list(range(8))


def test_package_import_does_not_import_triton():
    code = ("import sys, torch; import lathe.kernels.triton_kernels as t; "
            "t.pack_int4(torch.zeros(2, 4, dtype=torch.uint8)); "
            "assert 'triton' not in sys.modules; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)
