"""Bad input to int8 W8A8 (SmoothQuant): a clear BadInput or a logged skip, never a NaN."""
import pytest
import torch
import torch.nn as nn

import lathe
from lathe.compress import Int8Config, quantize
from lathe.errors import BadInput

DECODER = lathe.__path__[0] + "/data/decoder-lm"


@pytest.fixture
def model_and_calib():
    from lathe import text

    calib = text.batches(text.Tokenizer(DECODER), list(text.calibration_texts(4)), 2, 32)
    return lathe.load(DECODER), calib


def test_nan_calibration_activations(model_and_calib):
    m, calib = model_and_calib
    with torch.no_grad():
        m.model.embed_tokens.weight[calib[0]["input_ids"][0, 3]] = float("nan")
    with pytest.raises(BadInput, match="NaN/Inf"):
        quantize(m, Int8Config(), calib)


@pytest.mark.parametrize("calib", [[], None])
def test_empty_or_missing_calibration(model_and_calib, calib):
    m, _ = model_and_calib
    with pytest.raises(BadInput, match="calibration"):
        quantize(m, Int8Config(), calib)


@pytest.mark.parametrize("smoothquant", [False, True])
def test_nan_weight_names_the_layer(model_and_calib, smoothquant):
    m, calib = model_and_calib
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(BadInput, match="model.layers.1.mlp.up_proj"):
        quantize(m, Int8Config(smoothquant=smoothquant), calib)


def test_zero_channels_give_no_nan(model_and_calib):
    m, calib = model_and_calib
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[:5] = 0  # output channels
        m.model.layers[0].mlp.down_proj.weight[:, :7] = 0  # input channels (SmoothQuant's w_amax 0)
    quantize(m, Int8Config(), calib)
    with torch.no_grad():
        out = m(calib[0]["input_ids"])
    assert torch.isfinite(out).all()
    for mod in m.modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                assert torch.isfinite(b).all() and (name not in ("weight_scale", "smooth") or (b > 0).all())


def test_non_linear_module_is_skipped_and_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Conv1d(16, 16, 1)

        def linear_groups(self):
            yield "a", ["a"]
            yield "b", ["b"]

        def forward(self, x):
            return self.b(self.a(x).transpose(1, 2))

    m = M()
    rep = quantize(m, Int8Config(), [{"x": torch.randn(2, 4, 16)}])
    assert rep["quantized"] == ["a"] and "not an nn.Linear" in rep["skipped"][0]
    assert torch.isfinite(m(torch.randn(2, 4, 16))).all()


def test_nan_bias_names_the_layer():
    from lathe.compress.modules import QLinearW8A8

    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.bias[3] = float("nan")
    with pytest.raises(BadInput, match="bias of enc.ffn"):
        QLinearW8A8.from_linear(lin, "enc.ffn")
