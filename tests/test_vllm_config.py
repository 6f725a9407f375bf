"""compressed-tensors export (what vLLM reads): the config describes the scheme, and the packed
tensors unpack back to lathe's weights exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lathe
import testkit
from lathe.compress.vllm_config import (dequantize_state, export_compressed_tensors, pack_int4_rows,
                                        unpack_int4_rows)
from lathe.errors import BadInput

DECODER = lathe.__path__[0] + "/data/decoder-lm"


def _lathe_weights(model):
    """HF module name -> lathe's dequantized fp32 weight (fused q/k/v split back)."""
    from lathe.compress.modules import QLinearW4A16, QLinearW8A8

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinearW4A16):
            w = m.dequantize()
        elif isinstance(m, QLinearW8A8):
            w = m.format.dequantize(m.weight, m.weight_scale)
        else:
            continue
        if name.endswith("qkv_proj"):
            p = name.rpartition(".")[0]
            c = model.config
            q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
            for n, part in zip(("q_proj", "k_proj", "v_proj"), w.split([q, kv, kv])):
                out[f"{p}.{n}"] = part
        else:
            out[name] = w
    return out


@pytest.mark.parametrize("recipe", ["int4-rtn", "int4-sym", "int8-dynamic"])
def test_export_round_trips_exactly(recipe, tmp_path):
    ck = lathe.compress_checkpoint(DECODER, testkit.recipe(recipe, tmp_path), tmp_path / "ck", calib=[])
    out = export_compressed_tensors(ck, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    sd = load_file(str(out / "model.safetensors"))
    model = lathe.load(ck)
    want = _lathe_weights(model)
    assert want and "model.layers.0.self_attn.k_proj" in want
    for name, w in want.items():
        assert torch.equal(dequantize_state(sd, name), w), name
    g = cfg["config_groups"]["group_0"]
    assert cfg["quant_method"] == "compressed-tensors"
    if recipe == "int8-dynamic":
        assert cfg["format"] == "int-quantized" and g["weights"]["strategy"] == "channel"
        assert g["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False,
                                          "strategy": "token", "group_size": None, "dynamic": True}
    else:
        assert cfg["format"] == "pack-quantized" and g["input_activations"] is None
        assert g["weights"]["group_size"] == (64 if recipe == "int4-sym" else 128)
        assert ("model.layers.0.self_attn.q_proj.weight_zero_point" in sd) == (recipe == "int4-rtn")
        assert sd["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    # Linears left in fp32 are listed in `ignore` and keep their weights (the decoder's lm_head
    # is tied to the embedding: listed, with no tensor of its own)
    assert "lm_head" in cfg["ignore"]
    for n in cfg["ignore"]:
        assert f"{n}.weight" in sd or n == "lm_head"
    # the unquantized tensors are carried unchanged
    assert torch.equal(sd["model.norm.weight"], model.state_dict()["model.norm.weight"])
    _validate_with_compressed_tensors(cfg, sd, want)


def _validate_with_compressed_tensors(cfg, sd, want):
    """The package's own pydantic models and unpacker accept what we wrote (when installed)."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    QuantizationConfig.model_validate(cfg)
    for name in want:
        if f"{name}.weight_packed" in sd:
            shape = torch.Size(int(x) for x in sd[f"{name}.weight_shape"])
            q = unpack_from_int32(sd[f"{name}.weight_packed"], 4, shape)
            ours = unpack_int4_rows(sd[f"{name}.weight_packed"], shape[1]).to(torch.int8) - 8
            assert torch.equal(q.to(torch.int8), ours)


def test_pack_helpers_invert():
    g = torch.Generator().manual_seed(0)
    for R, C in [(3, 8), (5, 13), (16, 1)]:
        c = torch.randint(0, 16, (R, C), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_int4_rows(pack_int4_rows(c), C), c)


def test_smoothquant_checkpoint_is_refused(minilm_int8, tmp_path):
    with pytest.raises(BadInput, match="int8-dynamic"):
        export_compressed_tensors(minilm_int8, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_uncompressed_source_is_refused(tmp_path):
    with pytest.raises(BadInput, match="not a lathe compressed checkpoint"):
        export_compressed_tensors(DECODER, tmp_path / "ct")
