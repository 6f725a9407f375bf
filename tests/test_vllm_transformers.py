"""--vllm-export output read by transformers at its default settings (compressed-tensors
installed): same logits as lathe.load, lm_head listed in `ignore` when lathe left it
unquantized (tied to the embedding in the shipped decoder)."""
import json

import pytest
import torch

import lathe
import testkit
from lathe.compress.vllm_config import export_compressed_tensors

pytestmark = pytest.mark.filterwarnings("ignore")
DECODER = lathe.__path__[0] + "/data/decoder-lm"


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int4-sym"])
def test_transformers_loads_vllm_export(recipe, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from lathe.kernels.dispatch import use_backend

    ck = lathe.compress_checkpoint(DECODER, testkit.recipe(recipe, tmp_path), tmp_path / "ck", calib=[])
    out = export_compressed_tensors(ck, tmp_path / "ct")
    assert "lm_head" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    m = AutoModelForCausalLM.from_pretrained(str(out))  # transformers' defaults
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    # both sides compute the format's math in fp32: lathe's reference ops (the CPU kernels
    # quantize int4 activations to int8 and order sums differently)
    with torch.no_grad(), use_backend("reference", "linear_w4a16"), use_backend("reference", "linear_w8a8"):
        got = m(x).logits.float()
        want = lathe.load(ck)(x).float()
        fp32 = lathe.load(DECODER)(x).float()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    if recipe == "int4-sym":  # weight-only: the same fp32 weights, the same math
        assert rel(got, want) < 1e-4, rel(got, want)
    else:  # compressed-tensors fake-quantizes activations its own way: a few codes round apart,
        # far less than the quantization error itself
        assert rel(got, want) < 0.25 * rel(want, fp32), (rel(got, want), rel(want, fp32))
