"""lathe::conv_chain_int8 (csrc/cpu/conv_chain.h): a quantized EfficientNet's convolutions in
one call, against the same units run one by one on the PyTorch reference, on every ISA path,
1 and 2 threads, odd image sizes, batch changes (the arena is planned again) and NaN images."""
import pytest
import torch

import lathe.kernels  # noqa: F401
from lathe.errors import BadInput
from lathe.kernels.dispatch import use_backend

pytest.importorskip("lathe._C")
from lathe.kernels import cpu as cpu_levels  # noqa: E402
from lathe.kernels.cpu import best_isa, force_isa  # noqa: E402

ISAS = ["scalar", "avx2", "avx512_vnni"]
RANK = {n: i for i, n in enumerate(cpu_levels.ISAS)}


def _isa(isa):
    if RANK[isa] > RANK[best_isa()]:
        pytest.skip(f"this CPU lacks {isa} (best: {best_isa()})")
    return force_isa(isa)


@pytest.fixture(scope="module", params=[True, False], ids=["fp32-stem", "int8-stem"])
def qmodel(request):
    """float_first: the stem stays fp32 and writes the codes the chain of the rest reads; else
    the whole network is one chain from the images. (A stem of 8 channels: TINY's 16 would feed
    the first block's residual, which keeps it int8.)"""
    from test_efficientnet import _images, _tiny

    from lathe import images
    from lathe.compress.conv_quant import quantize_convnet
    from lathe.compress.fconv import FloatConvAct
    m = _tiny(seed=1, stem_channels=8 if request.param else 16)
    quantize_convnet(m, images.batches(_images(8), 4), float_first=request.param)
    assert isinstance(m.stem, FloatConvAct) == request.param
    return m


def _x(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g) * 1.5


def _reference(m, x):
    with use_backend("reference"):
        return m(x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_chain_matches_units_on_the_reference(qmodel, isa, threads):
    from lathe.kernels import conv_chain as qconv
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), _isa(isa):
            for B, H, W in [(3, 64, 64), (1, 67, 45), (2, 33, 40), (3, 64, 64)]:  # re-plans the arena
                x = _x(B, H, W, seed=B * H)
                got = qmodel(x)
                assert qconv._OWNED.get(qmodel) is not None  # the chain ran, not the units
                assert torch.equal(got, _reference(qmodel, x)), (B, H, W)
    finally:
        torch.set_num_threads(old)


def test_nan_image_and_new_packing(qmodel):
    from lathe.compress.qconv import QConv2dInt8
    from lathe.kernels import conv_chain
    x = _x(3, 64, 64, seed=7)
    x[1, 2, 10, 10] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    with torch.inference_mode():
        y = qmodel(x)
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[0]).all()
        for m in qmodel.modules():  # packed again (new tensors): the chain must follow
            if isinstance(m, QConv2dInt8):
                m.prepare()
        before = conv_chain._OWNED.get(qmodel)
        assert torch.equal(qmodel(x)[0], _reference(qmodel, x)[0])
        assert conv_chain._OWNED.get(qmodel) is not before  # built again over the new packing


def test_fake_shapes_and_bad_chains(qmodel):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lathe.kernels import conv_chain as qconv
    c = qconv._OWNED.get(qmodel) or qconv.int8_chain(qmodel, qmodel.int8_steps)
    x = _x(2, 65, 64)
    with torch.inference_mode():
        if c.in_channels != 3:  # an fp32 stem: the chain reads its u8 NHWC codes
            x = qmodel.stem(x).q
        y, bad = torch.ops.lathe.conv_chain_int8(x, c.key)
    with FakeTensorMode() as mode:
        fy, fbad = torch.ops.lathe.conv_chain_int8(mode.from_tensor(x), c.key)
    assert fy.shape == y.shape and fy.dtype == y.dtype and fbad.shape == bad.shape
    steps = qmodel.int8_steps()
    with pytest.raises(BadInput, match="fp32 output"):
        qconv.ConvChain([(steps[-1][0], -1, -1), (steps[1][0], 0, -1)])
    with pytest.raises(BadInput, match="come before"):
        qconv.ConvChain([(steps[0][0], 0, -1)])
    with pytest.raises(BadInput, match="expected images|expects"):
        c(torch.randn(1, 4, 64, 64))


def test_unquantized_model_runs_the_float_path():
    from test_efficientnet import _tiny

    from lathe.kernels import conv_chain as qconv
    m = _tiny()
    assert qconv.int8_chain(m, m.int8_steps) is None
    assert m(_x(1, 64, 64)).shape == (1, 10)


def test_chain_after_openmp_and_from_python_threads(qmodel):
    """The chain's loops are served by the OpenMP team (TaskPool::host): right after torch's own
    OpenMP loops, and from two Python threads at once (each its own team; one run at a time per
    chain), the results stay those of the reference."""
    import threading

    x = _x(2, 48, 40, seed=5)
    want = _reference(qmodel, x)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    errors = []

    def work():
        try:
            with torch.inference_mode():
                for _ in range(4):
                    torch.randn(1 << 16).add_(1.0)  # an OpenMP loop of torch's just before
                    assert torch.equal(qmodel(x), want)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    try:
        ts = [threading.Thread(target=work) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        torch.set_num_threads(old)
    assert not errors, errors


def test_layer_times(qmodel):
    from lathe.kernels import conv_chain
    x = _x(1, 64, 64)
    with torch.inference_mode():
        qmodel(x)
    c = conv_chain._OWNED[qmodel]
    times = c.layer_times(x, runs=3)
    assert len(times) == len(c.layers) + 1 and times[0][0] == "quantize images"
    assert all(t >= 0 for _, t in times) and sum(t for _, t in times) > 0
    assert "dw k3" in " ".join(n for n, _ in times)
    with torch.inference_mode():  # profiling is off again and the results unchanged
        assert torch.equal(qmodel(x), _reference(qmodel, x))
