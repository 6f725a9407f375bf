"""Low-rank SVD factorisation: full rank reproduces the layer, the energy threshold picks the
right rank, min_saving, whitening, checkpoint round trip, low-rank then int8, bad input."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import yaml

import lathe
from lathe.compress.config import config_from_dict
from lathe.compress.lowrank import LowRankConfig, LowRankLinear, energy_rank, factorize
from lathe.compress.quantize import quantize
from lathe.errors import BadInput
from testkit import One


def _aniso(T, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, K, generator=g) * torch.exp(1.5 * torch.randn(K, generator=torch.Generator().manual_seed(7)))


def test_full_rank_reproduces_layer():
    """At rank min(N, K) up(down(x)) equals x W^T + b up to rounding: its error against a
    float64 reference stays within a small multiple of the plain fp32 layer's own error."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(512, 256)
    ref64 = x.double() @ lin.weight.double().T + lin.bias.double()
    with torch.no_grad():
        e_dense = (lin(x).double() - ref64).pow(2).mean().sqrt()
        lr, r, kept = factorize(lin, rank=128)
        e_lr = (lr(x).double() - ref64).pow(2).mean().sqrt()
        lr_low, _, _ = factorize(lin, rank=64)
        e_low = (lr_low(x).double() - ref64).pow(2).mean().sqrt()
    assert r == 128 and kept == pytest.approx(1.0)
    # two fp32 matmuls (K then r terms) instead of one, plus the SVD's float64->fp32 rounding
    assert e_lr < 4 * e_dense, (float(e_lr), float(e_dense))
    assert e_low > 1000 * e_dense  # truncation really drops something


def test_energy_picks_rank():
    torch.manual_seed(0)
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])
    U, _ = torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(48, 8, dtype=torch.float64))
    lin = nn.Linear(48, 32)
    with torch.no_grad():
        lin.weight.copy_((U * s.double()) @ V.T)
    total = sum(float(v) ** 2 for v in s)
    for energy in (0.5, 0.8, 0.95, 0.99, 0.999, 1.0):
        want = next(i + 1 for i in range(len(s))
                    if sum(float(v) ** 2 for v in s[:i + 1]) >= energy * total * (1 - 1e-9))
        assert energy_rank(s, energy) == want
        assert factorize(lin, energy=energy)[1] == want


def test_min_saving_and_report():
    lin = nn.Linear(64, 64)
    m = One(copy.deepcopy(lin))
    r = quantize(m, LowRankConfig(rank=30))  # 30 * 128 = 3840 < 4096 but saves only 6%
    assert type(m.lin) is nn.Linear and r["factored"] == [] and "min_saving" in r["skipped"][0]
    r = quantize(m, LowRankConfig(rank=16))
    assert isinstance(m.lin, LowRankLinear) and m.lin.down.weight.shape == (16, 64)
    assert m.lin.up.weight.shape == (64, 16) and m.lin.down.bias is None
    assert r["params_after"] < r["params_before"]


def test_whiten_lowers_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    calib = [{"x": _aniso(512, 128, s)} for s in range(2)]
    x = _aniso(1024, 128, 99)
    with torch.no_grad():
        ref = lin(x)
    errs = {}
    for whiten in (False, True):
        m = One(copy.deepcopy(lin))
        quantize(m, LowRankConfig(rank=32, whiten=whiten), calib)
        with torch.no_grad():
            errs[whiten] = float((m(x) - ref).pow(2).mean())
    assert errs[True] < 0.5 * errs[False], errs


def test_round_trip_and_int8(minilm, tmp_path):
    from lathe.compress.modules import QLinearW8A8
    from lathe.compress.pipeline import calibration_batches

    calib = calibration_batches(minilm, n=8, batch_size=8)
    model = lathe.load(minilm)
    ref_model = copy.deepcopy(model)
    r = quantize(model, LowRankConfig(energy=0.6, skip=["*.attention.*"]), calib)
    assert r["factored"] and all(".attention." not in n for n in r["factored"])
    p = tmp_path / "lr.yaml"
    p.write_text(yaml.safe_dump({"name": "lr", "steps": [
        {"method": "lowrank", "energy": 0.6, "skip": ["*.attention.*"]}]}))
    out = lathe.compress_checkpoint(minilm, p, tmp_path / "lr", calib=calib)
    man = json.loads((out / "lathe_manifest.json").read_text())
    assert {e["class"] for e in man["modules"].values()} == {"LowRankLinear"}
    loaded = lathe.load(out)
    x = {k: v[:4] for k, v in calib[0].items()}
    with torch.no_grad():
        assert torch.equal(loaded(**x), model(**x))
    assert (out / "model.safetensors").stat().st_size < (minilm / "model.safetensors").stat().st_size
    # then int8: the inner down/up Linears are quantized, q/k/v stay unfused only if factored
    p.write_text(yaml.safe_dump({"name": "lr8", "steps": [
        {"method": "lowrank", "energy": 0.6, "skip": ["*.attention.*"]}, {"method": "int8"}]}))
    q = lathe.load(lathe.compress_checkpoint(minilm, p, tmp_path / "lr8", calib=calib))
    lr = q.encoder.layer[0].intermediate.dense
    assert isinstance(lr, LowRankLinear) and isinstance(lr.down, QLinearW8A8) and isinstance(lr.up, QLinearW8A8)
    with torch.no_grad():
        a, b = model(**x), q(**x)
    m = x["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(a[m], b[m], dim=-1)
    assert float(cos.min()) > 0.9
    del ref_model


def test_lowrank_qkv_then_int8_unfused(minilm, tmp_path):
    """A factored query cannot be fused with key/value: int8 leaves q/k/v apart and the
    checkpoint records no fuse_qkv transform, so it still loads."""
    from lathe.compress.pipeline import calibration_batches

    calib = calibration_batches(minilm, n=8, batch_size=8)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "steps": [
        {"method": "lowrank", "rank": 32, "skip": ["*.intermediate.*", "*.output.*"]}, {"method": "int8"}]}))
    out = lathe.compress_checkpoint(minilm, p, tmp_path / "r", calib=calib)
    assert json.loads((out / "lathe_manifest.json").read_text())["transforms"] == []
    q = lathe.load(out)
    assert isinstance(q.encoder.layer[0].attention.self.query, LowRankLinear)
    with torch.no_grad():
        assert torch.isfinite(q(**{k: v[:2] for k, v in calib[0].items()})).all()


@pytest.mark.parametrize("step, match", [
    ({}, "exactly one"),
    ({"rank": 8, "energy": 0.9}, "exactly one"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"energy": 0.0}, "energy"),
    ({"energy": 1.5}, "energy"),
    ({"rank": 8, "min_saving": 1.0}, "min_saving"),
    ({"rank": 8, "whiten": "yes"}, "whiten"),
    ({"rank": 8, "ranks": 3}, "unknown field 'ranks'"),
])
def test_bad_input(step, match):
    with pytest.raises(BadInput, match=match):
        config_from_dict({"method": "lowrank", **step})


def test_whiten_needs_calibration():
    with pytest.raises(BadInput, match="calibration"):
        quantize(One(nn.Linear(64, 64)), LowRankConfig(rank=8, whiten=True), None)
