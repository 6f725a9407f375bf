"""Calibration observers (lathe.compress.calibration.make_observer): each against a direct,
non-streaming computation on the same data."""
import pytest
import torch

from lathe.compress import histogram
from lathe.compress.calibration import METHODS, make_observer, observe
from lathe.errors import BadInput


def growing_batches(seed=0, n=6, rows=3000, cols=32, dist="t"):
    """Batches whose scale grows, so a streaming histogram must widen its range several times."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if dist == "t":  # heavy tails: Student t with 2 degrees of freedom
            z = torch.randn(rows, cols, generator=g)
            chi2 = torch.randn(rows, cols, 2, generator=g).pow(2).sum(-1)
            x = z / (chi2 / 2).sqrt()
        else:
            x = torch.rand(rows, cols, generator=g) * 2 - 1
        out.append(x * (1.5 ** i))
    return out


def one_shot(obs, data):
    """The histogram of all the data at once, over the observer's final range."""
    a = torch.cat(data).abs().double().reshape(1, -1)
    h = torch.zeros(1, obs.bins, dtype=torch.float64)
    histogram.add(h, obs.range.clone(), a)
    return h


def near_edges(obs, data) -> int:
    """Samples within float rounding of a bin edge: the only ones two binnings may disagree on."""
    t = torch.cat(data).abs().double() / (obs.range / obs.bins)
    return int(((t - t.round()).abs() < 1e-6).sum())


def stream(method, data, **kw):
    o = make_observer(method, **kw)
    for x in data:
        o.update(x)
    return o


@pytest.mark.parametrize("gran,kw,shape", [("per_tensor", {}, ()), ("per_channel", {}, (32,)),
                                           ("per_group", {"group_size": 8}, (4,)), ("per_token", {}, ())])
def test_minmax_granularities_match_direct(gran, kw, shape):
    data = growing_batches(n=3, rows=200)
    o = stream("minmax", data, granularity=gran, **kw)
    x = torch.cat(data)
    want = {"per_tensor": x.abs().max(), "per_channel": x.abs().amax(0),
            "per_group": x.abs().reshape(-1, 4, 8).amax((0, 2)),
            "per_token": x.abs().amax(1).max()}[gran]
    assert tuple(o.amax().shape) == shape
    assert torch.equal(o.amax(), want)
    lo, hi = o.min_max()
    if gran == "per_channel":
        assert torch.equal(lo, x.amin(0)) and torch.equal(hi, x.amax(0))


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
@pytest.mark.parametrize("gran,kw,shape", [("per_tensor", {}, ()), ("per_channel", {"bins": 128}, (32,)),
                                           ("per_group", {"group_size": 16, "bins": 128}, (2,))])
def test_histogram_granularity_shapes(method, gran, kw, shape):
    data = growing_batches(n=2, rows=100)
    o = stream(method, data, granularity=gran, **kw)
    a = o.amax()
    assert tuple(a.shape) == shape and tuple(o.bin_width().shape) == shape
    assert (a > 0).all() and (a <= o.bin_width() * o.bins + 1e-6).all()


def test_streaming_histogram_is_the_one_shot_histogram():
    data = growing_batches()
    o = stream("percentile", data)
    assert o.range.item() >= torch.cat(data).abs().max().item()
    # range doubling merges whole bins: the counts are exactly those of one pass over all data
    diff = (o.hist - one_shot(o, data)).abs().sum().item()
    assert diff <= 2 * near_edges(o, data)
    assert o.hist.sum().item() == torch.cat(data).numel()


@pytest.mark.parametrize("p", [90.0, 99.0, 99.9])
def test_percentile_within_one_bin_of_the_direct_quantile(p):
    data = growing_batches()
    o = stream("percentile", data, percentile=p)
    want = torch.quantile(torch.cat(data).abs().flatten().double(), p / 100).item()
    assert abs(o.amax().item() - want) <= o.bin_width().item()


def test_percentile_of_a_known_distribution():
    # |U(-1, 1)| is U(0, 1): the p-th percentile is p / 100, up to the sampling error
    # sqrt(p (1 - p) / n) (4 standard deviations) and one bin
    g = torch.Generator().manual_seed(3)
    data = [torch.rand(50_000, generator=g) * 2 - 1 for _ in range(4)]
    n = sum(x.numel() for x in data)
    for p in (0.5, 0.9, 0.99):
        o = stream("percentile", data, percentile=100 * p)
        tol = 4 * (p * (1 - p) / n) ** 0.5 + o.bin_width().item()
        assert abs(o.amax().item() - p) <= tol


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_clip_search_matches_one_shot_and_clips_heavy_tails(method):
    heavy = growing_batches()
    o = stream(method, heavy)
    rule = histogram.mse_amax if method == "mse" else histogram.entropy_amax
    direct = rule(one_shot(o, heavy), o.range.clone()).item()
    assert abs(o.amax().item() - direct) <= o.bin_width().item()
    # heavy tails: clipping the few outliers wins over resolution (a direct search of the
    # squared error on these samples puts the best clip at 0.54 of the max)
    assert o.amax().item() < 0.9 * torch.cat(heavy).abs().max().item()
    # uniform data has no outliers: clipping only adds error, the clip stays at the top
    # (within the 2 % of the range that rounding error against the saturation error leaves)
    uni = growing_batches(dist="uniform", n=1)
    u = stream(method, uni)
    assert u.amax().item() >= 0.98 * torch.cat(uni).abs().max().item()


@pytest.mark.parametrize("args", [dict(n=2, rows=2000), dict(n=1, rows=5000)])
def test_mse_clip_is_near_optimal_on_the_raw_data(args):
    """The histogram's choice, scored on the raw samples, is as good as a direct search over
    a fine grid of clips: within 0.5 % (measured 0.001 - 0.1 %; scoring bins by their centres
    alone, as ModelOpt does, misses by 2.5 % on the first case)."""
    data = growing_batches(**args)
    x = torch.cat(data).flatten().double()
    o = stream("mse", data)

    def err(c):
        s = c / 127
        return (x - torch.clamp(torch.round(x / s), -127, 127) * s).pow(2).mean().item()

    grid = torch.linspace(0.005, 1.0, 400).double() * x.abs().max()
    direct = min(err(c) for c in grid.tolist())
    assert err(o.amax().item()) <= direct * 1.005


def test_merge_aligns_ranges():
    a, b = growing_batches(seed=1, n=2), growing_batches(seed=2, n=4)
    oa, ob = stream("percentile", a, percentile=99.0), stream("percentile", b, percentile=99.0)
    both = oa.merge_(ob)
    assert both.hist.sum().item() == pytest.approx(torch.cat(a + b).numel())
    want = torch.quantile(torch.cat(a + b).abs().flatten().double(), 0.99).item()
    # interpolating the smaller range's CDF onto the wider bins moves mass by < one bin
    assert abs(both.amax().item() - want) <= 2 * both.bin_width().item()


def test_reduce_is_a_no_op_in_one_process():
    data = growing_batches(n=2)
    for m in METHODS:
        o = stream(m, data)
        before = o.amax().clone()
        assert torch.equal(o.reduce_().amax(), before)


def test_quantile_reports_the_per_token_amax_distribution():
    data = growing_batches(n=2, rows=500)
    o = stream("percentile", data, granularity="per_token")
    tok = torch.cat(data).abs().amax(1).double()
    for p in (50, 90):
        assert abs(o.quantile(p).item() - torch.quantile(tok, p / 100).item()) <= o.bin_width().item()


@pytest.mark.parametrize("args,kw,word", [(("kl",), {}, "kl"), (("mse", "per_row"), {}, "per_row"),
                                          (("mse",), {"bins": 100}, "bins"), (("minmax",), {"bins": 64}, "bins"),
                                          (("entropy", "per_token"), {}, "per_token"),
                                          (("minmax", "per_group"), {}, "group_size")])
def test_bad_names_and_options(args, kw, word):
    with pytest.raises(BadInput, match=word):
        make_observer(*args, **kw)


def test_group_size_must_divide_channels():
    with pytest.raises(BadInput, match="group_size"):
        make_observer("minmax", "per_group", group_size=5).update(torch.randn(4, 32))


def test_nan_names_the_module():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 8))
    model.forward = lambda x: model.proj(x)
    x = torch.randn(2, 3, 8)
    x[1, 2, 5] = float("nan")
    for m in METHODS:
        with pytest.raises(BadInput, match="proj.*NaN"):
            observe(model, {"proj": [make_observer(m)]}, [{"x": x}])
    with pytest.raises(BadInput, match="no calibration data reached"):
        make_observer("mse", name="layer").amax()


def test_export_calibration_methods(minilm_int8):
    from lathe.export.onnx import calibrate_act_scales
    from lathe import load, text

    texts = list(text.calibration_texts(16))
    model = load(minilm_int8)
    inf = float("inf")
    base = calibrate_act_scales(model, minilm_int8, texts, max_act_error=inf)
    assert calibrate_act_scales(model, minilm_int8, texts, max_act_error=inf, method="minmax") == base
    clip = calibrate_act_scales(model, minilm_int8, texts, max_act_error=inf, method="percentile")
    assert clip.keys() == base.keys()
    # a percentile clip never exceeds the max (one bin of slack for the interpolation)
    assert all(0 < clip[k] <= base[k] * (1 + 2 / 2048) for k in base)
    assert any(clip[k] < base[k] for k in base)
    with pytest.raises(BadInput, match="calibration method"):
        calibrate_act_scales(model, minilm_int8, texts, method="kl")
