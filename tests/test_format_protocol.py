"""Adding a format is one file: a toy int8 per-group weight-only format, defined here as a new
compress/formats/<name>.py would define it, registers itself and every consumer picks it up
through module.format.<hook>: checkpoint manifests, the export's opset and validation tolerance,
the decoder export's exactness check, the vLLM scheme (refused by name) and QAT's round trip."""
from dataclasses import asdict, dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from lathe.compress.formats import FORMATS, QUANT_MODULES, Format, from_linear_rtn, register_format, sqnr_db
from lathe.errors import BadInput


class QLinearToyW8G(nn.Module):
    """int8 weights, one scale per group of 32 along K, fp activations; runs on the existing
    linear_w8a16 op (a new format may reuse a kernel)."""

    QUANT_BUFFERS = ("qweight", "scales")

    def __init__(self, in_features, out_features, bias=True, group_size=32):
        super().__init__()
        self.format = ToyInt8Group(group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, lin, name="linear", group_size=32):
        return from_linear_rtn(cls, lin, name, group_size)

    def prepare(self):
        return self

    def manifest_args(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "group_size": self.group_size}

    def forward(self, x):
        return torch.ops.lathe.linear_w8a16(x, self.qweight, self.scales, self.bias, self.group_size, None)


@dataclass(frozen=True)
class ToyInt8Group(Format):
    group_size: int = 32
    name: str = "toy_int8_group"
    op: str = "linear_w8a16"
    exact_lowering: ClassVar[bool] = True

    def quantize(self, w):
        N, K = w.shape
        wg = w.detach().float().view(N, K // self.group_size, self.group_size)
        amax = wg.abs().amax(-1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return torch.round(wg / s[..., None]).clamp(-127, 127).to(torch.int8).view(N, K), s

    @staticmethod
    def dequantize(q, s):
        N, K = q.shape
        return (q.float().view(N, s.shape[1], -1) * s[..., None]).view(N, K)

    def min_opset(self, target):
        return 21  # blocked DequantizeLinear

    def precision(self, target, int8_mode, accuracy_level):
        return 3, "weight-only"

    def manifest(self):
        return asdict(self) | {"dtype": "int8", "granularity": f"group{self.group_size}"}


@pytest.fixture
def toy_format():
    register_format(QLinearToyW8G)(ToyInt8Group)
    yield ToyInt8Group
    FORMATS.pop(ToyInt8Group.name)
    QUANT_MODULES.pop(QLinearToyW8G.__name__)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 17))
    m[0] = QLinearToyW8G.from_linear(m[0], "0")
    return m


def test_toy_format_registers_and_every_consumer_asks_it(toy_format):
    from lathe.compress.checkpoint import describe_modules
    from lathe.compress.formats import quantized_modules
    from lathe.compress.vllm_config import scheme_of
    from lathe.export.decoder import _weight_only
    from lathe.export.onnx import precision_of
    from lathe.export.lowerings import needs_opset

    assert FORMATS["toy_int8_group"] is ToyInt8Group and QUANT_MODULES["QLinearToyW8G"] is QLinearToyW8G
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 17))
    m = _model()
    x = torch.randn(5, 64)
    assert sqnr_db(fp(x).detach(), m(x).detach()) > 35  # 8-bit weights
    assert [n for n, _ in quantized_modules(m)] == ["0"]
    entry = describe_modules(m)["0"]
    assert entry["class"] == "QLinearToyW8G" and entry["format"]["name"] == "toy_int8_group"
    assert QUANT_MODULES[entry["class"]](**entry["args"]).format == m[0].format  # rebuildable
    assert needs_opset(m, "onnxruntime") == 21
    assert precision_of(m, "onnxruntime", "fast", 4) == "weight-only"
    assert _weight_only(m)
    w = m[0].format.roundtrip(fp[0].weight)
    assert sqnr_db(fp[0].weight.detach(), w.detach()) > 35
    with pytest.raises(BadInput, match="no compressed-tensors export"):
        scheme_of(m[0])


def test_toy_format_leaves_no_trace_when_unregistered():
    assert "toy_int8_group" not in FORMATS and "QLinearToyW8G" not in QUANT_MODULES


def test_every_registered_format_has_an_onnx_lowering():
    """export/lowerings/ holds one file a format, registered under the format's name."""
    import lathe.export.lowerings as L
    from lathe.export.lowerings import Context, translation_table
    from lathe.export.lowerings.common import Buffers

    table = translation_table(Context(buffers=Buffers(nn.Module())))  # imports every lowering file
    assert set(FORMATS) <= set(L.LOWERINGS), set(FORMATS) - set(L.LOWERINGS)
    for name in FORMATS:
        assert getattr(torch.ops.lathe, FORMATS[name].op).default in table
