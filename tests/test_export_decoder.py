"""Decoder LM export with the KV cache: prefill from an empty past and decode steps against
PyTorch on onnxruntime, greedy tokens equal to lathe's generate, the optimum input/output
names, the int4 form, the CLI picking the decoder path, and a wrong graph caught."""
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

import lathe
from lathe.errors import ValidationFailed

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    from lathe import cli

    out = tmp_path_factory.mktemp("dec") / "lm.onnx"
    assert cli.main(["export", str(DECODER), "--to", "onnx", "-o", str(out)]) == 0
    return out


def test_decoder_export_names_and_dynamic_axes(fp32_onnx):
    m = onnx.load(str(fp32_onnx))
    n = lathe.load(DECODER).config["num_hidden_layers"]
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins[3:] == [f"past_key_values.{i}.{t}" for i in range(n) for t in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{t}" for i in range(n) for t in ("key", "value")]
    past = m.graph.input[3].type.tensor_type.shape.dim
    assert past[0].dim_param and past[2].dim_param and not past[1].dim_param  # batch, past dynamic


def test_decoder_validates_prefill_decode_and_greedy(fp32_onnx):
    from lathe.export.decoder import validate_decoder

    model = lathe.load(DECODER)
    v = validate_decoder(fp32_onnx, model)
    assert v.passed and v.greedy_match and v.max_rel < 1e-4
    assert {"batch": 2, "seq": 7, "past": 0} in v.steps and {"batch": 2, "seq": 1, "past": 7} in v.steps


def test_decoder_wrong_graph_is_caught(fp32_onnx, tmp_path):
    from lathe.export.decoder import validate_decoder

    m = onnx.load(str(fp32_onnx))
    for init in m.graph.initializer:  # an RMSNorm weight
        if init.data_type == onnx.TensorProto.FLOAT and list(init.dims) == [256]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -1.0, init.name))
            break
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ValidationFailed, match="decoder"):
        validate_decoder(bad, lathe.load(DECODER))


def test_decoder_int4_exports_with_matmulnbits(tmp_path):
    src = lathe.compress_checkpoint(DECODER, "int4-rtn", tmp_path / "lm-int4")
    out, rep = lathe.export_onnx(src, tmp_path / "lm-int4.onnx")
    assert rep.passed and rep.greedy_match
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulNBits" in ops
