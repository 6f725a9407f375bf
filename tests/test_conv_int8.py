"""lathe::conv2d_int8 (dense implicit GEMM and depthwise) against the PyTorch reference, on
every ISA path, odd shapes, both output kinds, residual and activations."""
import pytest
import torch

import lathe.kernels  # noqa: F401
from lathe.kernels import conv_ops
from lathe.kernels.dispatch import use_backend

C_ = pytest.importorskip("lathe._C")
from lathe.kernels.cpu import best_isa, force_isa  # noqa: E402
from lathe.kernels import cpu as cpu_levels  # noqa: E402

ISAS = ["scalar", "avx2", "avx512_vnni"]
RANK = {n: i for i, n in enumerate(cpu_levels.ISAS)}  # every level, avx512_bf16 and amx too


def _isa(isa):
    if RANK[isa] > RANK[best_isa()]:
        pytest.skip(f"this CPU lacks {isa} (best: {best_isa()})")
    return force_isa(isa)


def _geom(H, W, k, s, pad):
    OH, OW = (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1
    return s, pad, pad, OH, OW


def _case(B, H, W, C, N, k, s, pad, depthwise, seed=0):
    g = torch.Generator().manual_seed(seed)
    ldc = -(-C // 4) * 4
    x = torch.randint(0, 256, (B, H, W, ldc), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (N, k, k, 1 if depthwise else C), generator=g, dtype=torch.int8)
    ws = torch.rand(N, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(N, generator=g)
    return x, w, ws, bias, _geom(H, W, k, s, pad)


SHAPES = [  # B, H, W, C, N, k, stride, pad, depthwise
    (1, 5, 7, 17, 1, 1, 1, 0, False),
    (2, 9, 9, 64, 257, 1, 1, 0, False),
    (1, 9, 8, 40, 17, 1, 2, 0, False),      # 1x1 stride 2 (ResNet downsample)
    (3, 11, 13, 3, 32, 3, 2, 1, False),     # the stem: 3 channels, stride 2
    (1, 8, 8, 17, 33, 3, 1, 1, False),
    (1, 15, 15, 3, 16, 7, 2, 3, False),     # ResNet's 7x7 stem
    (1, 7, 9, 17, 17, 3, 1, 1, True),
    (2, 9, 9, 257, 257, 3, 2, 1, True),
    (1, 10, 11, 96, 96, 5, 1, 2, True),
    (1, 9, 9, 144, 144, 5, 2, 2, True),
    (1, 3, 3, 1, 1, 3, 1, 1, True),
    (1, 6, 6, 33, 33, 3, 1, 1, True),       # rows ending in 2 outputs (each remainder 1-3 is covered)
    (1, 11, 12, 20, 20, 5, 2, 2, True),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:8])) + ("dw" if s[8] else ""))
@pytest.mark.parametrize("out", ["u8", "fp32"])
def test_conv_matches_reference(isa, shape, out):
    B, H, W, C, N, k, s, pad, dw = shape
    x, w, ws, bias, geom = _case(B, H, W, C, N, k, s, pad, dw)
    args = (x, C, 0.02, 131, w, ws, bias, dw, *geom)
    out_scale, out_zp = (0.05, 7) if out == "u8" else (0.0, 0)
    act = "relu6" if dw else "relu"
    ref = conv_ops.reference(*args, None, 1.0, 0, act, out_scale, out_zp)
    with _isa(isa):
        got = torch.ops.lathe.conv2d_int8(*args, None, 1.0, 0, act, out_scale, out_zp, None, None)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if out == "u8":
        # integer sums are exact and the epilogue runs in the same order: codes agree
        assert torch.equal(got[..., :N], ref[..., :N])
    else:
        # error vs fp64 truth <= 2x the fp32 reference's error (+ one ulp of the largest value)
        acc = conv_ops.int_sum(x, C, 131, w, dw, *geom)
        truth = (acc * 0.02 * ws.double() + bias.double()).clamp(0, 6 if dw else None)
        bound = 2 * (ref.double() - truth).abs().max() + truth.abs().max() * 2 ** -23
        assert (got.double() - truth).abs().max() <= bound


@pytest.mark.parametrize("isa", ISAS)
def test_residual_and_no_act(isa):
    x, w, ws, bias, geom = _case(2, 6, 5, 24, 40, 1, 1, 0, False, seed=3)
    res = torch.randint(0, 256, (2, 6, 5, 40), dtype=torch.uint8)
    args = (x, 24, 0.03, 0, w, ws, bias, False, *geom, res, 0.1, 120, "none", 0.07, 128)
    ref = conv_ops.reference(*args)
    with _isa(isa):
        got = torch.ops.lathe.conv2d_int8(*args, None, None)
    assert torch.equal(got, ref)


def test_prepacked_equals_unpacked():
    from lathe.kernels import cpu_conv
    x, w, ws, bias, geom = _case(1, 8, 8, 32, 32, 3, 1, 1, True, seed=5)
    args = (x, 32, 0.02, 10, w, ws, bias, True, *geom, None, 1.0, 0, "relu6", 0.03, 0)
    packed, wsum = cpu_conv.pack(w, True)
    assert torch.equal(torch.ops.lathe.conv2d_int8(*args, packed, wsum),
                       torch.ops.lathe.conv2d_int8(*args, None, None))


def test_reference_backend_and_fake():
    x, w, ws, bias, geom = _case(1, 6, 6, 8, 12, 3, 2, 1, False, seed=1)
    args = (x, 8, 0.02, 3, w, ws, bias, False, *geom, None, 1.0, 0, "none", 0.0, 0, None, None)
    with use_backend("reference"):
        ref = torch.ops.lathe.conv2d_int8(*args)
    assert torch.allclose(torch.ops.lathe.conv2d_int8(*args), ref, rtol=1e-6, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.ops.lathe.conv2d_int8(*fargs).shape == ref.shape


def test_bad_inputs_are_named():
    from lathe.errors import BadInput
    x, w, ws, bias, geom = _case(1, 6, 6, 8, 8, 3, 1, 1, False)
    with pytest.raises(BadInput, match="input channels"):
        torch.ops.lathe.conv2d_int8(x, 8, 0.1, 0, w[..., :4].contiguous(), ws, bias, False, *geom,
                                    None, 1.0, 0, "none", 0.0, 0, None, None)
    with pytest.raises(BadInput, match="depthwise"):
        torch.ops.lathe.conv2d_int8(x, 8, 0.1, 0, w, ws, bias, True, *geom, None, 1.0, 0, "none", 0.0, 0,
                                    None, None)


@pytest.mark.parametrize("C", [1, 3, 4, 17])
def test_quantize_input_matches_torch(C, monkeypatch):
    from lathe import _ext
    from lathe.compress import qconv
    x = torch.randn(2, C, 5, 7) * 3
    x[1, 0, 2, 3] = float("nan")
    got = qconv.quantize_input(x, 0.037, 121)
    monkeypatch.setattr(_ext, "cpu", lambda: None)  # the PyTorch fallback
    ref = qconv.quantize_input(x, 0.037, 121)
    assert torch.equal(got.q, ref.q) and got.q.shape[-1] % 4 == 0
    assert got.bad.tolist() == [False, True]
