"""SmoothQuant alpha searched per linear group (Int8Config alpha_search), static activation
scales (act_observer), and their config validation."""
import pytest
import torch
import torch.nn as nn

from lathe.compress import Int8Config, quantize
from lathe.compress.calibration import METHODS, RowSample
from lathe.compress.config import ACT_OBSERVERS, config_from_dict
from lathe.errors import BadInput


class Tiny(nn.Module):
    """Two Linears whose inputs carry outlier channels (what SmoothQuant is for)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        with torch.no_grad():
            for m in (self.up, self.down):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) * OUTLIERS)


OUTLIERS = torch.ones(64)
OUTLIERS[[3, 17, 40]] = 30.0


def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x = torch.randn(2, 16, 32, generator=g)
        x[..., 5] *= 20  # an outlier input channel
        out.append({"x": x})
    return out


def layer_errors(cfg):
    """Relative squared output error of each quantized Linear on all the calibration inputs."""
    ref, model = Tiny(), Tiny()
    report = quantize(model, cfg, calib=batches())
    inputs = {}
    hooks = [getattr(ref, n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
             for n in ("up", "down")]
    with torch.inference_mode():
        for b in batches():
            ref(**b)
    for h in hooks:
        h.remove()
    errs = {}
    with torch.inference_mode():
        for n in ("up", "down"):
            x = torch.cat(inputs[n])
            y, yq = getattr(ref, n)(x), getattr(model, n)(x)
            errs[n] = float((yq - y).double().pow(2).sum() / y.double().pow(2).sum())
    return errs, report


def test_search_never_worse_than_alpha_half():
    grid = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # search_rows covers every calibration row: the search objective is this very error
    searched, report = layer_errors(Int8Config(alpha_search=True, alpha_grid=grid, search_rows=4096))
    fixed, _ = layer_errors(Int8Config(alpha=0.5))
    assert set(report["alphas"]) == {"up", "down"}
    assert all(a in grid for a in report["alphas"].values())
    # the kernel accumulates exactly, the search in fp32: rounding far below int8 error
    for n in fixed:
        assert searched[n] <= fixed[n] * (1 + 1e-5)
        assert report["search_error"][n]["chosen"] <= report["search_error"][n]["at_0.5"]
    assert any(a != 0.5 for a in report["alphas"].values())  # the outliers make 0.5 not optimal here


def test_default_path_unchanged():
    """alpha fixed: the same smoothing as observe_inputs + smoothquant_scales computed directly."""
    from lathe.compress.calibration import observe_inputs, smoothquant_scales

    model, ref = Tiny(), Tiny()
    amax = observe_inputs(ref, ["up", "down"], batches())
    quantize(model, Int8Config(alpha=0.5), calib=batches())
    for n in ("up", "down"):
        s = smoothquant_scales(amax[n], [getattr(ref, n).weight], 0.5)
        assert torch.equal(getattr(model, n).smooth, 1.0 / s)


@pytest.mark.parametrize("method", METHODS)
def test_act_observer_static_scales(method):
    _, report = layer_errors(Int8Config(act_observer=method))
    assert report["act_observer"] == method and set(report["act_scales"]) == {"up", "down"}
    assert all(v > 0 for v in report["act_scales"].values())
    if method == "minmax":  # max |x / s| over the real rows, directly
        model = Tiny()
        quantize(model, Int8Config(), calib=batches())
        x = torch.cat([b["x"] for b in batches()]).reshape(-1, 32)
        want = float((x * model.up.smooth).abs().max()) / 127
        assert report["act_scales"]["up"] == pytest.approx(want, rel=1e-6)


def test_row_sample_is_bounded_and_drawn_from_the_data():
    data = [torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None].expand(100, 3) for i in range(10)]
    s = RowSample(64)
    for x in data:
        s.update(x)
    assert s.rows.shape == (64, 3)
    vals = s.rows[:, 0]
    assert torch.equal(vals, vals.round()) and len(vals.unique()) == 64 and vals.max() < 1000
    assert vals.min() < 250 and vals.max() > 750  # spread over all batches, not the first ones


@pytest.mark.parametrize("d,word", [({"alpha": 1.5}, "alpha"), ({"alpha": "best"}, "alpha"),
                                    ({"alpha_grid": []}, "alpha_grid"), ({"alpha_grid": [0.2, 1.2]}, "alpha_grid"),
                                    ({"alpha_search": True, "smoothquant": False}, "smoothquant"),
                                    ({"search_rows": 4}, "search_rows"), ({"act_observer": "kl"}, "act_observer"),
                                    ({"alpha_search": "yes"}, "alpha_search")])
def test_config_validation(d, word):
    with pytest.raises(BadInput, match=word):
        config_from_dict({"method": "int8", **d})


def test_config_forms():
    assert config_from_dict({"method": "int8", "alpha": "search"}).alpha_search
    c = config_from_dict({"method": "int8", "alpha_search": True, "alpha_grid": [0.4, 0.6]})
    assert c.alpha_search and c.alpha_grid == [0.4, 0.6]
    assert Int8Config().alpha_grid[0] == 0.3 and Int8Config().alpha_grid[-1] == 0.8
    assert len(Int8Config().alpha_grid) == 11
    assert set(ACT_OBSERVERS) == set(METHODS)
