"""nn.Conv2d on the generic transformers path (lathe.compress.generic_conv) and transformers'
own ResNet checkpoints: MobileNetV2 and a ResNet variant lathe has no family for compress with
the int8 recipe onto lathe's int8 conv kernel (BatchNorm folded), a ResNet that
ResNetForImageClassification saved loads into lathe's ResNet family; logits against
transformers' fp32 forward."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lathe
from hf_tiny_cnn import images, reference, write

pytestmark = pytest.mark.filterwarnings("ignore")


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet-generic"])
def test_int8_generic_cnn(name, tmp_path):
    from lathe.compress.generic_conv import FoldedNorm, HFConv2dInt8

    src = write(name, tmp_path / name)
    x = images(src)
    ref = reference(src, x)
    out = lathe.compress_checkpoint(src, "int8", tmp_path / "out")
    q = lathe.load(out)
    assert getattr(q, "lathe_generic", False)
    convs = [m for m in q.modules() if isinstance(m, HFConv2dInt8)]
    assert convs and not any(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in q.modules())
    assert sum(isinstance(m, FoldedNorm) for m in q.modules()) == len(convs)  # every conv had its BN
    if name == "mobilenet_v2":
        assert any(m.depthwise for m in convs)
    with torch.no_grad():
        y = q(**x)
    assert _cos(y, ref) >= 0.99, _cos(y, ref)  # the bound for int8
    rep = json.loads((out / "lathe_manifest.json").read_text())["report"]["steps"][0]["conv2d"]
    assert rep["convs"] == len(convs) and rep["fp32_convs"] == {}
    # transformers reads it through lathe's quantizer (from_pretrained, meta model, modules swapped)
    from transformers import AutoModelForImageClassification
    hf = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert _cos(hf(**x).logits, y) > 1 - 1e-6


class _Grouped(nn.Module):
    """A grouped conv (2 groups, not depthwise: no int8 kernel) before a dense one."""

    def __init__(self):
        super().__init__()
        self.g, self.bn = nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.d = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, pixel_values):
        return self.d(torch.relu(self.bn(self.g(pixel_values))))


def test_grouped_conv_stays_fp32_and_is_named():
    from lathe.compress.generic_conv import HFConv2dInt8, quantize_convs

    torch.manual_seed(0)
    m = _Grouped().eval()
    batches = [{"pixel_values": torch.randn(2, 4, 12, 12)} for _ in range(2)]
    with torch.no_grad():
        ref = m(**batches[0])
    rep = quantize_convs(m, batches)
    assert isinstance(m.g, nn.Conv2d) and isinstance(m.bn, nn.BatchNorm2d)  # left as they were
    assert isinstance(m.d, HFConv2dInt8) and rep["convs"] == 1
    assert "grouped convolution" in rep["fp32_convs"]["g"] and "\n" not in rep["fp32_convs"]["g"]
    with torch.no_grad():
        assert _cos(m(**batches[0]), ref) >= 0.99


def test_weight_only_recipe_on_a_cnn_is_refused(tmp_path):
    """Conv2d is quantized by the int8 recipe only: another recipe names it (exit 2)."""
    from lathe.errors import BadInput

    src = write("mobilenet_v2", tmp_path / "m")
    with pytest.raises(BadInput, match="Conv2d.*int8 recipe"):
        lathe.compress_checkpoint(src, "int8-weight-only", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_transformers_resnet_checkpoint_loads_into_the_family(tmp_path):
    """A checkpoint ResNetForImageClassification saved (transformers' weight names) runs on
    lathe's ResNet family: fp32 logits equal transformers', int8 within the int8 bound; a
    variant the family does not build goes to the generic path."""
    from lathe.models.generic import hf_class
    from lathe.models.resnet import ResNet

    src = write("resnet", tmp_path / "r")
    x = images(src)
    ref = reference(src, x)
    m = lathe.load(src)
    assert isinstance(m, ResNet)
    with torch.no_grad():
        assert _cos(m(x["pixel_values"]), ref) > 1 - 1e-6
    out = lathe.compress_checkpoint(src, "int8", tmp_path / "int8")
    q = lathe.load(out)
    assert isinstance(q, ResNet)
    with torch.no_grad():
        assert _cos(q(x["pixel_values"]), ref) >= 0.99
    # its ONNX (QDQ written from lathe's int8 model, the max pooling on the u8 codes), validated
    from lathe.export.vision import export as export_vision
    _, report = export_vision(out, tmp_path / "r.onnx", n_images=8)
    assert report["cosine_mean"] >= 0.995 and report["nan"] == 0
    g = write("resnet-generic", tmp_path / "g")
    assert isinstance(lathe.load(g), hf_class(json.loads((g / "config.json").read_text())))


def test_cli_compress_bench_export(tmp_path):
    write("mobilenet_v2", tmp_path / "mnv2")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lathe", *args], capture_output=True, text=True, cwd=tmp_path)

    r = cli("compress", "mnv2", "--recipe", "int8", "-o", "out")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("bench", "out", "--backend", "torch,lathe", "--batch", "1", "--min-runs", "3", "--json", "b.json")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    q = {row["backend"]: row["quality_vs_torch_fp32"] for row in doc["results"]}
    assert q["lathe int8"]["cosine_min"] >= 0.99, q
    r = cli("export", "out", "--to", "onnx", "-o", "onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation PASS" in r.stdout
    import onnx
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # lathe's int8 math as QDQ


class _ReadsWeightDtype(nn.Module):
    """Casts its input to the first conv's weight dtype, as ViT does: int8 with lathe's module."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, pixel_values):
        return self.c2(torch.relu(self.c1(pixel_values.to(self.c1.weight.dtype))))


def test_convs_that_break_the_model_are_undone_and_named():
    from lathe.compress.generic_conv import quantize_convs

    torch.manual_seed(0)
    m = _ReadsWeightDtype().eval()
    batches = [{"pixel_values": torch.randn(2, 3, 8, 8)}]
    with torch.no_grad():
        ref = m(**batches[0])
    rep = quantize_convs(m, batches)
    assert rep["convs"] == 0 and set(rep["fp32_convs"]) == {"c1", "c2"}
    assert all("reverted" in why for why in rep["fp32_convs"].values())
    assert type(m.c1) is nn.Conv2d and type(m.c2) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(m(**batches[0]), ref)
