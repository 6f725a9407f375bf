"""lathe::conv2d_f32_u8 (an int8 network's first layer kept in fp32: fp32 images in, u8 codes
out, csrc/cpu/conv_f32_u8.h) against its PyTorch reference, code for code, on every ISA path,
odd shapes, strides, paddings (symmetric and TF "same"), activations and NaN/Inf images."""
import pytest
import torch

import lathe.kernels  # noqa: F401
from lathe.errors import BadInput
from lathe.kernels import conv_ops
from lathe.kernels.dispatch import use_backend

pytest.importorskip("lathe._C")
from lathe.kernels.cpu import force_isa  # noqa: E402
from testkit import ISAS, isa_or_skip  # noqa: E402

SHAPES = [  # B, C, H, W, N, k, stride, pad_t, pad_l (pad < 0: TF "same")
    (1, 3, 17, 17, 32, 3, 2, -1, -1),    # EfficientNet's stem at an odd size
    (3, 3, 16, 16, 32, 3, 2, -1, -1),    # "same" pads only after
    (1, 1, 1, 1, 1, 1, 1, 0, 0),
    (2, 3, 9, 13, 17, 3, 1, 1, 1),
    (1, 4, 15, 15, 40, 7, 2, 3, 3),      # ResNet's 7x7 stem, 40 outputs (2.5 vectors)
    (1, 3, 7, 5, 257, 3, 2, 1, 1),
    (2, 2, 33, 3, 3, 5, 1, 2, 2),
]


def _geom(H, W, k, s, pt, pl):
    if pt < 0:  # TF "same"
        OH, OW = -(-H // s), -(-W // s)
        pt, pl = max((OH - 1) * s + k - H, 0) // 2, max((OW - 1) * s + k - W, 0) // 2
        return s, pt, pl, OH, OW
    return s, pt, pl, (H + 2 * pt - k) // s + 1, (W + 2 * pl - k) // s + 1


def _case(B, C, H, W, N, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 2
    w = torch.randn(N, C, k, k, generator=g) * 0.3
    return x, w, torch.randn(N, generator=g)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["none", "relu", "relu6"])
def test_matches_reference(isa, shape, act):
    B, C, H, W, N, k, s, pt, pl = shape
    x, w, bias = _case(B, C, H, W, N, k)
    zp = 0 if act != "none" else 117
    args = (x, w, bias, *_geom(H, W, k, s, pt, pl), act, 6.0 / 255 if act == "relu6" else 0.05, zp, None)
    want, wbad = conv_ops.f32_u8_reference(*args[:-1])
    isa_or_skip(isa)
    with force_isa(isa):
        got, bad = torch.ops.lathe.conv2d_f32_u8(*args)
    assert got.shape == want.shape and got.dtype == torch.uint8
    assert torch.equal(got, want)
    assert not bad.any() and not wbad.any()
    assert got.numel() < 8 or len(torch.unique(got)) > 2  # the case exercises the range, not a clamp


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_images_are_flagged(isa):
    x, w, bias = _case(3, 3, 12, 12, 32, 3)
    x[1, 2, 5, 7] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    args = (x, w, bias, *_geom(12, 12, 3, 2, -1, -1), "relu6", 6.0 / 255, 0, None)
    isa_or_skip(isa)
    with force_isa(isa):
        got, bad = torch.ops.lathe.conv2d_f32_u8(*args)
    assert bad.tolist() == [False, True, True]
    want, wbad = conv_ops.f32_u8_reference(*args[:-1])
    assert wbad.tolist() == [False, True, True]
    assert torch.equal(got[0], want[0])  # the clean image is untouched


def test_the_reference_is_pytorchs_convolution():
    """The reference's tap-by-tap sum is a convolution: within one code of torch's own conv2d
    (fp32 sums in another order) wherever the pre-rounding value is not within 1e-3 of a half."""
    x, w, bias = _case(2, 3, 19, 19, 32, 3)
    s, pt, pl, OH, OW = _geom(19, 19, 3, 2, -1, -1)
    q, _ = conv_ops.f32_u8_reference(x, w, bias, s, pt, pl, OH, OW, "none", 0.05, 128)
    xp = torch.nn.functional.pad(x.double(), (pl, 1, pt, 1))
    y = torch.nn.functional.conv2d(xp, w.double(), bias.double(), s)[:, :, :OH, :OW].permute(0, 2, 3, 1)
    t = y / 0.05
    ok = (t - t.floor() - 0.5).abs() > 1e-3
    ref = (torch.round(t) + 128).clamp(0, 255)
    assert torch.equal(q.double()[ok], ref[ok])


def test_bad_input():
    x, w, bias = _case(1, 3, 8, 8, 16, 3)
    with pytest.raises(BadInput, match="weight must be float32"):
        torch.ops.lathe.conv2d_f32_u8(x, w[:, :2], bias, 1, 1, 1, 8, 8, "relu", 0.1, 0, None)
    with pytest.raises(BadInput, match="act must be"):
        torch.ops.lathe.conv2d_f32_u8(x, w, bias, 1, 1, 1, 8, 8, "gelu", 0.1, 0, None)
    with pytest.raises(BadInput, match="output quantization"):
        torch.ops.lathe.conv2d_f32_u8(x, w, bias, 1, 1, 1, 8, 8, "relu", 0.0, 0, None)


def test_reference_backend_runs_the_reference():
    x, w, bias = _case(1, 3, 9, 9, 8, 3)
    args = (x, w, bias, 1, 1, 1, 9, 9, "none", 0.05, 100, None)
    with use_backend("reference"):
        got, _ = torch.ops.lathe.conv2d_f32_u8(*args)
    assert torch.equal(got, conv_ops.f32_u8_reference(*args[:-1])[0])
