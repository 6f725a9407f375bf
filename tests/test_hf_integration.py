"""transformers and sentence-transformers read lathe's outputs: with lathe's quantizer
registered they load onto lathe's modules and agree with lathe.load; without lathe,
transformers refuses the checkpoint instead of loading packed tensors as fp32 weights."""
import json
import subprocess
import sys

import pytest
import torch

import lathe
from hf_tiny import inputs, write

pytestmark = pytest.mark.filterwarnings("ignore")


def _real(x, mask):
    return x[mask.bool()]


@pytest.fixture(scope="module")
def qwen_int8(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    src = write("qwen2", d / "src")
    calib = [inputs("qwen2", 4, 16, seed=s) for s in range(2)]
    return src, lathe.compress_checkpoint(src, "int8", d / "int8", calib=calib)


@pytest.fixture(scope="module")
def gpt2_int4(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    src = write("gpt2", d / "src")
    (d / "r.yaml").write_text("name: int4-g32\nsteps:\n  - method: int4\n    algo: rtn\n    group_size: 32\n")
    return src, lathe.compress_checkpoint(src, d / "r.yaml", d / "int4", calib=[])


@pytest.mark.parametrize("which", ["qwen_int8", "gpt2_int4"])
def test_automodel_loads_on_lathe_kernels(which, request):
    import lathe.integrations.transformers_quantizer  # noqa: F401
    from transformers import AutoModelForCausalLM

    src, out = request.getfixturevalue(which)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lathe" and cfg["modules"]
    m = AutoModelForCausalLM.from_pretrained(str(out))
    kinds = {type(x).__name__ for x in m.modules()}
    assert kinds & {"QLinearW8A8", "QLinearW4A16"}
    assert type(m).__name__ in ("Qwen2ForCausalLM", "GPT2LMHeadModel")  # transformers' own class
    x = inputs(which.split("_")[0])
    with torch.no_grad():
        got = m(**x).logits
        want = lathe.load(out)(**x)
    assert torch.equal(got, want)


def test_without_lathe_transformers_refuses(qwen_int8):
    """A fresh interpreter that never imports lathe: transformers stops with its own error."""
    _, out = qwen_int8
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "assert 'lathe' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode != 0
    assert "mismatch" in r.stderr.lower() and "ignore_mismatched_sizes" in r.stderr


def test_fast_adapter_output_loads_in_transformers(minilm_int8):
    """MiniLM int8 from lathe's BERT adapter (q/k/v fused, GELU fused): transformers' BertModel
    gets the split modules and its own GELU, and agrees with lathe.load on real tokens (not
    bit for bit: lathe's adapter applies GELU in the int8 kernel's epilogue and attention on its
    own kernel, and the next layer's int8 rounding turns those last-bit differences into a few
    flipped codes)."""
    import lathe.integrations.transformers_quantizer  # noqa: F401
    from transformers import AutoModel

    from lathe import text

    m = AutoModel.from_pretrained(str(minilm_int8))
    att = m.encoder.layer[0].attention.self
    assert type(att.query).__name__ == "QLinearW8A8" and not hasattr(att, "qkv")
    b = text.Tokenizer(minilm_int8)(text.eval_sentences()[:8])
    with torch.no_grad():
        got = _real(m(**b).last_hidden_state, b["attention_mask"])
        want = _real(lathe.load(minilm_int8)(**b), b["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cos.min()) > 0.995 and float(cos.mean()) > 0.999, (float(cos.min()), float(cos.mean()))


def test_sentence_transformers_loads_output(minilm, minilm_int8):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    from lathe import text

    assert (minilm_int8 / "1_Pooling" / "config.json").is_file()
    sents = text.eval_sentences()[:16]
    e = SentenceTransformer(str(minilm_int8), device="cpu").encode(sents, convert_to_tensor=True)
    e0 = SentenceTransformer(str(minilm), device="cpu").encode(sents, convert_to_tensor=True)
    assert any(type(x).__name__ == "QLinearW8A8"
               for x in SentenceTransformer(str(minilm_int8), device="cpu").modules())
    assert float(torch.nn.functional.cosine_similarity(e, e0).min()) > 0.99
