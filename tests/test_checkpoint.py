"""lathe.load round trips, quality of the int8 recipe, atomic writes."""
import json
import signal
import subprocess
import sys
import time

import torch

import lathe
from lathe.models.bert import mean_pool
from lathe.text import Tokenizer, eval_sentences


def test_fp32_load_matches_transformers(minilm):
    from transformers import BertModel

    tok = Tokenizer(minilm)
    b = tok(eval_sentences()[:6])
    hf = BertModel.from_pretrained(str(minilm)).eval()
    with torch.inference_mode():
        ref = hf(**b).last_hidden_state
        got = lathe.load(minilm)(**b)
    # same math in fp32, different op order: bounded by a few fp32 ulps of the activations
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max() * 10


def test_int8_roundtrip_bit_identical(minilm_int8, tmp_path):
    from lathe.compress.checkpoint import save
    from lathe.source import open_source

    m1 = lathe.load(minilm_int8)
    save(m1, open_source(minilm_int8), tmp_path / "again", recipe={"name": "copy", "steps": []})
    m2 = lathe.load(tmp_path / "again")
    b = Tokenizer(minilm_int8)(eval_sentences()[:5])
    with torch.inference_mode():
        assert torch.equal(m1(**b), m2(**b))


def test_int8_uses_lathe_kernels_and_is_close(minilm, minilm_int8):
    from lathe.compress.modules import QLinearW8A8

    q = lathe.load(minilm_int8)
    n_q = sum(isinstance(m, QLinearW8A8) for m in q.modules())
    assert n_q == 24  # per layer: fused qkv, attention output, intermediate (GELU fused), output
    assert q.encoder.layer[0].intermediate.dense.act == "gelu"
    manifest = json.loads((minilm_int8 / "lathe_manifest.json").read_text())
    assert manifest["recipe"]["name"] == "int8" and len(manifest["source"]["sha256"]) == 64
    tok = Tokenizer(minilm)
    sents = eval_sentences()[:64]
    b = tok(sents)
    with torch.inference_mode():
        ref = mean_pool(lathe.load(minilm)(**b), b["attention_mask"])
        got = mean_pool(q(**b), b["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ref, got)
    assert cos.min() > 0.98


def test_sigkill_leaves_previous_output_intact(minilm, minilm_int8, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(minilm_int8, out)
    before = (out / "model.safetensors").read_bytes()
    p = subprocess.Popen([sys.executable, "-m", "lathe", "compress", str(minilm), "--recipe", "int8",
                          "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill while it calibrates or writes (the run takes several seconds)
    time.sleep(4)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / "model.safetensors").read_bytes() == before
    assert (out / "lathe_manifest.json").is_file()
    leftovers = [f for f in tmp_path.iterdir() if f.name.startswith(".out.tmp")]
    # a killed run may leave its hidden temp folder, never a complete-looking output
    for f in leftovers:
        assert not (f / "lathe_manifest.json").exists()


def test_qkv_fusion_is_exact(minilm, tmp_path):
    r = tmp_path / "nofuse.yaml"
    r.write_text("name: nofuse\nsteps:\n  - method: int8\n    smoothquant: false\n    fuse_qkv: false\n")
    a = lathe.load(lathe.compress_checkpoint(minilm, "int8-dynamic", tmp_path / "a"))
    b = lathe.load(lathe.compress_checkpoint(minilm, r, tmp_path / "b"))
    assert hasattr(a.encoder.layer[0].attention.self, "qkv")
    assert not hasattr(b.encoder.layer[0].attention.self, "qkv")
    batch = Tokenizer(minilm)(eval_sentences()[:4])
    with torch.inference_mode():
        assert torch.equal(a(**batch), b(**batch))
