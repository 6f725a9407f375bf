"""Unstructured and N:M pruning (magnitude, Wanda, SparseGPT) on lathe's decoder LM: masks,
sparsity, layer-output error against magnitude, reports, checkpoint round trip, bad input."""
import copy
import json
import logging
from pathlib import Path

import pytest
import torch

import lathe
from lathe.compress.config import config_from_dict
from lathe.compress.gptq import HessianAccumulator
from lathe.compress.prune import (PruneConfig, layer_keep, nm_keep, row_keep, sparsegpt_prune,
                                  wanda_score)
from lathe.compress.quantize import quantize
from lathe.errors import BadInput

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"


@pytest.fixture(scope="module")
def decoder():
    return lathe.load(DECODER)


@pytest.fixture(scope="module")
def calib():
    """Two batches of 8 windows of 128 tokens of training-split Python source (never held out)."""
    from lathe.bench.perplexity import as_tokenizers, train_texts, windows

    ws = windows(as_tokenizers(DECODER), train_texts(32), seq_len=128, max_tokens=128 * 32)
    ids = torch.tensor([x for x, _ in ws if len(x) == 128][:16])
    return [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])} for i in (0, 8)]


def _linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}


def _has_nm(w, n, m):
    """Every group of m consecutive weights along K holds at least m - n zeros."""
    g = w.reshape(w.shape[0], -1, m)
    return bool(((g == 0).sum(-1) >= m - n).all())


@pytest.mark.parametrize("algo", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern(decoder, calib, algo, pattern, caplog):
    n, m = map(int, pattern.split(":"))
    model = copy.deepcopy(decoder)
    with caplog.at_level(logging.WARNING, logger="lathe.compress"):
        r = quantize(model, PruneConfig(algo=algo, pattern=pattern), calib)
    lins = _linears(model)
    assert set(r["pruned"]) == set(lins) and lins
    for name, lin in lins.items():
        assert _has_nm(lin.weight, n, m), name
        assert r["layers"][name] >= 1 - n / m - 1e-9
    assert r["sparsity"] >= 1 - n / m - 1e-9
    assert any("no speed-up" in x for x in r["notes"]) and any("not smaller" in x for x in r["notes"])
    assert "no speed-up" in caplog.text


@pytest.mark.parametrize("algo", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_sparsity_reached(decoder, calib, algo):
    model = copy.deepcopy(decoder)
    r = quantize(model, PruneConfig(algo=algo, sparsity=0.6), calib)
    for name, lin in _linears(model).items():
        actual = float((lin.weight == 0).float().mean())
        assert abs(actual - 0.6) <= 1.0 / lin.in_features, name  # per-row/per-block rounding
        assert r["layers"][name] == pytest.approx(actual, abs=1e-6)


def test_global_magnitude(decoder):
    model = copy.deepcopy(decoder)
    r = quantize(model, PruneConfig(algo="magnitude", sparsity=0.5, scope="global"))
    ws = [m.weight for m in _linears(model).values()]
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros / sum(w.numel() for w in ws) == pytest.approx(0.5, abs=1e-4)
    # one threshold: every surviving weight is at least as large as every pruned one
    orig = {n: m.weight.detach() for n, m in _linears(decoder).items()}
    kept_min = min(float(orig[n][m.weight != 0].abs().min()) for n, m in _linears(model).items())
    pruned_max = max(float(orig[n][m.weight == 0].abs().max()) for n, m in _linears(model).items())
    assert pruned_max <= kept_min
    assert len(set(r["layers"].values())) > 1  # layers end up with different sparsities


def test_wanda_sparsegpt_beat_magnitude(decoder, calib):
    """Relative output error of each Linear on its own calibration inputs, summed over the
    model: SparseGPT < Wanda < magnitude, unstructured 50% and 2:4."""
    xs = {}
    lins = _linears(decoder)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for n, m in lins.items()]
    with torch.no_grad():
        for b in calib:
            decoder(**b)
    for h in hooks:
        h.remove()
    err = {k: 0.0 for k in ("mag", "wanda", "sgpt", "mag24", "wanda24", "sgpt24")}
    for n, lin in lins.items():
        X, W = torch.cat(xs[n]), lin.weight.detach()
        ref = X @ W.T
        acc = HessianAccumulator(X.shape[1])
        acc.update(X)
        xn = X.pow(2).sum(0).sqrt()

        def e(Wp):
            return float((X @ Wp.T - ref).pow(2).sum() / ref.pow(2).sum())

        err["mag"] += e(W * layer_keep(W.abs(), 0.5))
        err["wanda"] += e(W * row_keep(wanda_score(W, xn), 0.5))
        err["sgpt"] += e(sparsegpt_prune(W, acc.H, 0.5)[0])
        err["mag24"] += e(W * nm_keep(W.abs(), 2, 4))
        err["wanda24"] += e(W * nm_keep(wanda_score(W, xn), 2, 4))
        err["sgpt24"] += e(sparsegpt_prune(W, acc.H, 0.5, (2, 4))[0])
    assert err["sgpt"] < err["wanda"] < err["mag"], err
    assert err["sgpt24"] < err["wanda24"] < err["mag24"], err


def test_checkpoint_round_trip(decoder, calib, tmp_path):
    out = lathe.compress_checkpoint(DECODER, "sparse-2of4", tmp_path / "sparse", calib=calib)
    model = copy.deepcopy(decoder)
    quantize(model, PruneConfig(algo="sparsegpt", pattern="2:4"), calib)
    loaded = lathe.load(out)
    ids = calib[0]["input_ids"][:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for n, lin in _linears(loaded).items():
        assert _has_nm(lin.weight, 2, 4), n
    man = json.loads((out / "lathe_manifest.json").read_text())
    step = man["report"]["steps"][0]
    assert step["method"] == "prune" and any("dense safetensors" in x for x in step["notes"])
    # dense file: the same size as the source's, give or take the header
    src_size = (DECODER / "model.safetensors").stat().st_size
    assert abs((out / "model.safetensors").stat().st_size - src_size) < 0.01 * src_size


def test_needs_calibration(decoder):
    with pytest.raises(BadInput, match="calibration"):
        quantize(copy.deepcopy(decoder), PruneConfig(algo="wanda"), None)


@pytest.mark.parametrize("step, match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": "half"}, "sparsity"),
    ({"pattern": "2-4"}, "pattern"),
    ({"pattern": "4:2"}, "pattern"),
    ({"pattern": "0:4"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.7}, "contradicts"),
    ({"algo": "wanda", "scope": "global"}, "global"),
    ({"algo": "obs"}, "algo"),
    ({"pattern": "2:4", "blocksize": 130}, "blocksize"),
    ({"spars": 0.5}, "unknown field 'spars'"),
])
def test_bad_input(step, match):
    with pytest.raises(BadInput, match=match):
        config_from_dict({"method": "prune", **step})
