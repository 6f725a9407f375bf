"""Structured pruning: heads (GQA-aware), FFN neurons, layers and Conv2d channels really
shrink the model; config.json follows; lathe.load and transformers load the result with the
same outputs; prune-structured then int8; bad input."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import lathe
from lathe.compress.checkpoint import save
from lathe.compress.config import config_from_dict
from lathe.compress.quantize import quantize
from lathe.compress.structured import StructuredPruneConfig, param_count
from lathe.errors import BadInput
from lathe.source import open_source

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"


@pytest.fixture(scope="module")
def minilm_model(minilm):
    return lathe.load(minilm)


@pytest.fixture(scope="module")
def calib(minilm):
    from lathe.compress.pipeline import calibration_batches

    return calibration_batches(minilm, n=16, batch_size=8)


@pytest.fixture(scope="module")
def dec_calib():
    from lathe.bench.perplexity import as_tokenizers, train_texts, windows

    ws = windows(as_tokenizers(DECODER), train_texts(16), seq_len=64, max_tokens=64 * 16)
    ids = torch.tensor([x for x, _ in ws if len(x) == 64][:8])
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _inputs(calib):
    b = calib[0]
    return {k: v[:4] for k, v in b.items()}


def _recipe(tmp_path, steps, name="r"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "steps": steps}))
    return p


def test_ffn_and_layers_minilm_transformers(minilm, minilm_model, calib, tmp_path):
    """FFN + layer pruning: shapes, config.json, lathe.load == the in-memory model ==
    transformers' AutoModel (last_hidden_state)."""
    from transformers import AutoModel

    rec = _recipe(tmp_path, [{"method": "prune-structured", "ffn": 0.5, "drop_layers": 2, "round_to": 8}])
    out = lathe.compress_checkpoint(minilm, rec, tmp_path / "ffn", calib=calib)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["intermediate_size"] == 768
    assert cfg["hidden_size"] == 384 and cfg["num_attention_heads"] == 12
    model = copy.deepcopy(minilm_model)
    r = quantize(model, StructuredPruneConfig(ffn=0.5, drop_layers=2, round_to=8), calib)
    assert r["params_after"] < r["params_before"] == param_count(minilm_model)
    assert len(model.encoder.layer) == 4
    assert model.encoder.layer[0].intermediate.dense.weight.shape == (768, 384)
    assert model.encoder.layer[0].output.dense.weight.shape == (384, 768)
    loaded = lathe.load(out)
    x = _inputs(calib)
    with torch.no_grad():
        ref = model(**x)
        assert torch.equal(loaded(**x), ref)
        hf = AutoModel.from_pretrained(str(out)).eval()(**x).last_hidden_state
    m = x["attention_mask"].bool()
    # lathe's attention kernel and transformers' differ only by fp32 rounding
    assert (hf[m] - ref[m]).abs().max() < 1e-4 * ref[m].abs().max()
    assert (out / "model.safetensors").stat().st_size < 0.9 * (minilm / "model.safetensors").stat().st_size


def test_zero_importance_channels_pruned_exactly(minilm_model, calib):
    """Heads whose output-projection columns are zero and FFN neurons whose output columns are
    zero contribute nothing: activation importance must choose them, and the smaller model
    must compute exactly what the original computes."""
    model = copy.deepcopy(minilm_model)
    D = model.encoder.layer[0].attention.self.head_dim
    with torch.no_grad():
        for layer in model.encoder.layer:
            o = layer.attention.output.dense.weight
            for h in (0, 2, 3, 7, 8, 11):
                o[:, h * D:(h + 1) * D] = 0
            layer.output.dense.weight[:, 1::2] = 0
    x = _inputs(calib)
    with torch.no_grad():
        ref = model(**x)
    # reconstruct=False: the cut alone must be exact (the refit's ridge term would move it)
    r = quantize(model, StructuredPruneConfig(heads=0.5, ffn=0.5, reconstruct=False), calib)
    assert all(h == [1, 4, 5, 6, 9, 10] for h in r["kept_heads"].values())
    sa = model.encoder.layer[0].attention.self
    assert sa.num_heads == 6 and sa.query.weight.shape == (6 * D, 384)
    assert model.config["num_attention_heads"] == 6 and model.config["head_dim"] == D
    assert model.encoder.layer[0].intermediate.dense.out_features == 768
    with torch.no_grad():
        got = model(**x)
    m = x["attention_mask"].bool()
    assert (got[m] - ref[m]).abs().max() < 1e-4 * ref[m].abs().max()
    assert any("not in transformers" in n for n in r["notes"])


def test_refit_brings_the_pruned_model_closer(minilm, minilm_model, calib):
    """With enough calibration tokens (here about 2,500) the least-squares refit of the
    consuming projections lowers the output error of the pruned model against the original on
    held-back inputs; with too few (the 16-text calib) it is skipped rather than overfitted."""
    from lathe.compress.pipeline import calibration_batches

    batches = calibration_batches(minilm, n=80, batch_size=16)
    x = batches[-1]
    with torch.no_grad():
        ref = minilm_model(**x)
    m = x["attention_mask"].bool()
    err = {}
    for rec in (False, True):
        model = copy.deepcopy(minilm_model)
        quantize(model, StructuredPruneConfig(heads=0.25, ffn=0.5, reconstruct=rec), batches[:-1])
        with torch.no_grad():
            err[rec] = float((model(**x)[m] - ref[m]).pow(2).mean())
    assert err[True] < 0.8 * err[False], err
    few = copy.deepcopy(minilm_model)
    plain = copy.deepcopy(minilm_model)
    quantize(few, StructuredPruneConfig(heads=0.25, ffn=0.5), calib)
    quantize(plain, StructuredPruneConfig(heads=0.25, ffn=0.5, reconstruct=False), calib)
    for a, b in zip(few.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_prune_tradeoff_table(minilm, minilm_model, calib, tmp_path):
    """bench.prune_tradeoff scores a pruned checkpoint against its original: an undistilled
    half-FFN cut is faster, scores below the original, and misses the #8 target."""
    from lathe.bench.prune_tradeoff import main, markdown, tradeoff

    model = copy.deepcopy(minilm_model)
    quantize(model, StructuredPruneConfig(ffn=0.5), calib)
    out = save(model, open_source(minilm), tmp_path / "ffn", {"name": "t", "steps": [
        {"method": "prune-structured", "ffn": 0.5}]})
    res = tradeoff(minilm, [out], pairs=3)
    (row,) = res["rows"]
    assert 0 < row["min_cos"] <= row["mean_cos"] < 0.999
    assert 0 < row["latency_ratio"] and row["latency_q25"] <= row["latency_q75"]
    assert row["size_ratio"] < 0.9 and row["meets_target"] is False
    assert row["recipe"] == "prune-structured(ffn 0.5)" and "| prune-structured(ffn 0.5) |" in markdown(res)
    assert main([str(minilm), str(tmp_path / "missing")]) == 2
    from lathe.cli import main as cli

    assert cli(["bench", "pruned", str(minilm), str(tmp_path / "missing")]) == 2


def test_heads_minilm_round_trip(minilm, minilm_model, calib, tmp_path):
    model = copy.deepcopy(minilm_model)
    quantize(model, StructuredPruneConfig(heads=0.5), calib)
    out = save(model, open_source(minilm), tmp_path / "heads", {"name": "t", "steps": []})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_attention_heads"] == 6 and cfg["head_dim"] == 32
    loaded = lathe.load(out)
    x = _inputs(calib)
    with torch.no_grad():
        assert torch.equal(loaded(**x), model(**x))


@pytest.mark.parametrize("kv_groups, heads, kv", [(False, 4, 2), (True, 4, 1)])
def test_llama_gqa_heads_transformers(dec_calib, tmp_path, kv_groups, heads, kv):
    """GQA: 8 query heads over 2 KV heads. Half the heads pruned either as 2 query heads of each
    group or as one whole group; transformers' LlamaForCausalLM gives the same logits."""
    from transformers import LlamaForCausalLM

    rec = _recipe(tmp_path, [{"method": "prune-structured", "heads": 0.5, "ffn": 0.25,
                              "kv_groups": kv_groups}])
    out = lathe.compress_checkpoint(DECODER, rec, tmp_path / "dec", calib=dec_calib)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (heads, kv, 32)
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["intermediate_size"] == 704 - 176
    loaded = lathe.load(out)
    att = loaded.model.layers[0].self_attn
    assert att.q_proj.weight.shape == (heads * 32, 256) and att.k_proj.weight.shape == (kv * 32, 256)
    ids = dec_calib[0]["input_ids"][:2]
    with torch.no_grad():
        ref = loaded(ids)
        hf = LlamaForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    assert (hf - ref).abs().max() < 1e-4 * ref.abs().max()


def test_gradient_importance_decoder(dec_calib):
    model = lathe.load(DECODER)
    before = param_count(model)
    r = quantize(model, StructuredPruneConfig(ffn=0.5, drop_layers=1, importance="gradient"), dec_calib)
    assert len(model.model.layers) == 3 and model.config["num_hidden_layers"] == 3
    assert model.model.layers[0].mlp.gate_proj.out_features == 352
    assert r["params_after"] < before and len(r["layer_importance"]) == 4
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(dec_calib[0]["input_ids"][:1])).all()


def test_structured_then_int8(minilm, calib, tmp_path):
    from lathe.bench.quality import cosine_stats, embeddings
    from lathe.compress.modules import QLinearW8A8
    from lathe.text import Tokenizer, eval_sentences

    fp = _recipe(tmp_path, [{"method": "prune-structured", "ffn": 0.25, "heads": 0.25}], "fp")
    q = _recipe(tmp_path, [{"method": "prune-structured", "ffn": 0.25, "heads": 0.25},
                           {"method": "int8"}], "q")
    a = lathe.load(lathe.compress_checkpoint(minilm, fp, tmp_path / "fp", calib=calib))
    b = lathe.load(lathe.compress_checkpoint(minilm, q, tmp_path / "q", calib=calib))
    assert any(isinstance(m, QLinearW8A8) for m in b.modules())
    assert b.encoder.layer[0].attention.self.num_heads == 9
    tok, sents = Tokenizer(minilm), eval_sentences()[:32]
    with torch.no_grad():
        s = cosine_stats(embeddings(lambda x: a(**x), tok, sents), embeddings(lambda x: b(**x), tok, sents))
    assert s["min_cos"] > 0.95  # int8 on top of the pruned model, as int8 on the original


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = nn.functional.silu(self.c2(x))
        return self.fc(self.c3(x).mean((2, 3)))


def test_conv_channels():
    """Half of c1's channels are dead (BN gamma = beta = 0, relu(0) = 0) and half of c2's
    (zero filters and bias, silu(0) = 0): BN |gamma| and filter L1 importance must prune
    exactly those, so the output is unchanged while the channels really halve."""
    torch.manual_seed(0)
    m = TinyCNN().eval()
    with torch.no_grad():
        m.b1.weight[::2] = 0
        m.b1.bias[::2] = 0
        m.b1.running_mean.uniform_(-1, 1)
        m.b1.running_var.uniform_(0.5, 2)
        m.c2.weight[1::2] = 0
        m.c2.bias[1::2] = 0
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = m(x)
    before = param_count(m)
    r = quantize(m, StructuredPruneConfig(conv_channels=0.5))
    assert set(r["conv"]) == {"c1", "c2"}
    assert r["conv"]["c1"]["importance"] == "bn_gamma" and r["conv"]["c2"]["importance"] == "filter_l1"
    assert m.c1.out_channels == 8 and m.b1.num_features == 8 and m.c2.in_channels == 8
    assert m.c2.out_channels == 16 and m.c3.in_channels == 16 and m.c3.out_channels == 8
    assert r["params_after"] == param_count(m) < before
    with torch.no_grad():
        y = m(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 1e-5 * ref.abs().max()


def test_conv_untraceable_or_no_chain():
    class NoChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x)

    with pytest.raises(BadInput, match="no Conv2d"):
        quantize(NoChain(), StructuredPruneConfig(conv_channels=0.5))


@pytest.mark.parametrize("step, match", [
    ({"heads": 1.0}, "heads"),
    ({"ffn": -0.5}, "ffn"),
    ({"importance": "random"}, "importance"),
    ({"layers": [1, 1]}, "layers"),
    ({"layers": [0], "drop_layers": 1}, "not both"),
    ({"round_to": 0, "ffn": 0.5}, "round_to"),
    ({}, "nothing to prune"),
    ({"neurons": 0.5}, "unknown field 'neurons'"),
])
def test_bad_config(step, match):
    with pytest.raises(BadInput, match=match):
        config_from_dict({"method": "prune-structured", **step})


def test_bad_model_input(minilm_model, calib):
    with pytest.raises(BadInput, match="every one of the 12 heads"):
        quantize(copy.deepcopy(minilm_model), StructuredPruneConfig(heads=0.97), calib)
    with pytest.raises(BadInput, match="layer 9 does not exist"):
        quantize(copy.deepcopy(minilm_model), StructuredPruneConfig(layers=[9]))
    with pytest.raises(BadInput, match="every one of the 6 layers"):
        quantize(copy.deepcopy(minilm_model), StructuredPruneConfig(layers=list(range(6))))
    with pytest.raises(BadInput, match="calibration"):
        quantize(copy.deepcopy(minilm_model), StructuredPruneConfig(ffn=0.5), None)
    q = copy.deepcopy(minilm_model)
    quantize(q, lathe.compress.Int8Config(smoothquant=False))
    with pytest.raises(BadInput, match="before quantization"):
        quantize(q, StructuredPruneConfig(ffn=0.5), calib)
    with pytest.raises(BadInput, match="no PRUNE_SPEC"):
        quantize(TinyCNN(), StructuredPruneConfig(ffn=0.5), calib)
