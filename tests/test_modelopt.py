"""The modelopt backend: guarded import, and lathe's modules equal ModelOpt's quantized weights."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lathe
from lathe.compress.config import Fp8Config, Int4Config, Int8Config
from lathe.errors import BadInput

DECODER = lathe.__path__[0] + "/data/decoder-lm"


def test_importing_lathe_never_imports_modelopt():
    code = ("import sys, lathe, lathe.cli, lathe.compress.pipeline, lathe.compress.modelopt_backend; "
            "assert not any(m.split('.')[0] == 'modelopt' for m in sys.modules), 'modelopt imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_modelopt_is_a_bad_input(monkeypatch, minilm, tmp_path, capsys):
    from lathe.cli import main

    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "modelopt.torch", None)
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    rc = main(["compress", str(minilm), "--recipe", "int8", "--backend", "modelopt", "-o",
               str(tmp_path / "out"), "--no-summary"])
    assert rc == 2
    assert "pip install 'lathe[modelopt]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        x = torch.randn(4, 16, 128, generator=g)
        x[..., 5] *= 30  # an outlier channel, so SmoothQuant has something to move
        out.append({"x": x})
    return out


@pytest.mark.parametrize("cfg", [Int8Config(fuse_qkv=False), Fp8Config(skip=[]),
                                 Int4Config(algo="awq", skip=[])], ids=["int8", "fp8", "int4-awq"])
def test_converted_weights_equal_modelopt_fake_quant(cfg):
    pytest.importorskip("modelopt.torch.quantization")
    from lathe.compress.modelopt_backend import quantize_step
    from lathe.compress.modules import QLinearFP8, QLinearW4A16, QLinearW8A8

    model = Tiny()
    fp32 = Tiny()
    batches = _batches()
    target, report = quantize_step(model, cfg, batches)
    assert report["backend"] == "modelopt" and report["modelopt_version"]
    assert sorted(report["quantized"]) == ["down", "up"]
    x = batches[0]["x"]
    for name in ("up", "down"):
        q, m = model.get_submodule(name), target.get_submodule(name)
        with torch.no_grad():
            fq = q.weight_quantizer(q.weight).float()
        if isinstance(m, QLinearW8A8):
            w = m.format.dequantize(m.weight, m.weight_scale)
            assert torch.equal(m.smooth, q.input_quantizer.pre_quant_scale.float())
            assert name in report["modelopt_static_input_amax"]
        elif isinstance(m, QLinearFP8):
            w = m.format.dequantize(m.weight, m.weight_scale)
            assert m.granularity == "per_tensor"
        else:
            assert isinstance(m, QLinearW4A16) and m.symmetric and bool((m.zeros == 8).all())
            w = m.dequantize()
            # weight-only: lathe's reference math (x * smooth) @ W^T + b is ModelOpt's quantized
            # forward up to fp32 rounding (lathe's CPU kernel may quantize x on top: not compared)
            inp = x if name == "up" else torch.relu(fp32.up(x))
            with torch.no_grad():
                ref = q(inp)
                got = torch.nn.functional.linear(inp * m.smooth, m.dequantize(), m.bias)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (w - fq).abs().max() <= 1e-6 * fq.abs().max(), name
    # the quantized model stays close to fp32 (SQNR vs the fp32 model, not a magic output)
    from lathe.compress.quantize import sqnr_db
    with torch.no_grad():
        assert sqnr_db(fp32(x), target(x)) > (15 if isinstance(cfg, Int4Config) else 25)


def test_unsupported_recipe_is_a_bad_input(tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(BadInput, match="int4-awq"):
        lathe.compress_checkpoint(DECODER, "int4-gptq", tmp_path / "o", backend="modelopt")


def test_empty_calibration_is_a_bad_input(tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(BadInput, match="calibration set is empty"):
        lathe.compress_checkpoint(DECODER, "int8", tmp_path / "o", calib=[], backend="modelopt")


def test_decoder_end_to_end(tmp_path):
    """compress --backend modelopt -> save -> lathe.load: runs on lathe's modules, records
    the backend and version, and stays close to fp32."""
    pytest.importorskip("modelopt.torch.quantization")
    from lathe import text
    from lathe.compress.modules import QLinearFP8

    calib = text.batches(text.Tokenizer(DECODER), list(text.calibration_texts(8)), 4, 64)
    out = lathe.compress_checkpoint(DECODER, "fp8", tmp_path / "o", calib, backend="modelopt")
    m, ref = lathe.load(out), lathe.load(DECODER)
    from lathe.source import open_source
    man = open_source(out).manifest
    assert man["report"]["backend"] == "modelopt" and man["report"]["modelopt_version"]
    assert any(isinstance(x, QLinearFP8) for x in m.modules())
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        a, b = ref(ids).log_softmax(-1), m(ids).log_softmax(-1)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
