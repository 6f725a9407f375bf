"""lathe.load(path, device=, dtype=): weights straight to the device in the activation dtype,
quantized modules' scales/biases stored once at load, and a forward that converts, copies
or packs none of a module's buffers."""
from pathlib import Path

import pytest
import torch

import lathe
from lathe.errors import BadInput

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"
RECIPES = ["int8-dynamic", "int4-rtn", "int8-weight-only", "fp8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama (K = 128 or 384: every Linear quantizes with groups of 128) and its
    compressed forms."""
    from lathe.bench.synthetic import quantize_checkpoint, write_llama

    d = tmp_path_factory.mktemp("tiny")
    src = write_llama(d / "src", hidden=128, intermediate=384, heads=4, kv_heads=2, layers=2,
                      vocab=160, dtype=torch.float32)
    return {"src": src, **{r: quantize_checkpoint(src, r, d / r) for r in RECIPES}}


def _ids(vocab=160):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_weights_arrive_in_the_dtype_and_compute_as_a_cast_model(dtype):
    """load(dtype=) is the fp32 model cast to dtype, bit for bit, without the fp32 detour."""
    m = lathe.load(DECODER, dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {dtype}
    ref = lathe.load(DECODER).to(dtype)
    ids = _ids(4096)
    with torch.no_grad(), lathe.kernels.dispatch.use_backend("reference", "attention"):
        assert torch.equal(m(ids), ref(ids))


@pytest.mark.parametrize("recipe", RECIPES)
def test_float32_is_the_default_load(tiny, recipe):
    a, b = lathe.load(tiny[recipe]), lathe.load(tiny[recipe], dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("recipe", RECIPES)
def test_bfloat16_is_within_the_reference_error(tiny, recipe):
    """The quantized model in bf16 strays from the fp32 truth (every op on its reference
    backend, fp32) by no more than twice what bf16 costs the same math in plain PyTorch."""
    from lathe.kernels.dispatch import use_backend

    ids = _ids()

    def run(dtype):
        return lathe.load(tiny[recipe], dtype=dtype)(ids).double()

    with torch.no_grad():
        b16 = run(torch.bfloat16)
        with use_backend("reference"):
            r32, r16 = run(torch.float32), run(torch.bfloat16)
    err = (b16 - r32).norm() / r32.norm()
    ref_err = (r16 - r32).norm() / r32.norm()
    assert err <= 2 * ref_err, (float(err), float(ref_err))


def test_scales_and_biases_are_stored_once_in_the_kernels_dtype(tiny):
    m = lathe.load(tiny["int4-rtn"], dtype=torch.bfloat16)
    q = m.model.layers[0].mlp.up_proj
    # the CPU int4 kernel keeps its own fp32 copy (packed at load); the rest is bf16
    assert q._packed is not None and q._packed[1].dtype == torch.float32
    assert m.model.norm.weight.dtype == torch.bfloat16
    w8 = lathe.load(tiny["int8-dynamic"], dtype=torch.bfloat16).model.layers[0].mlp.up_proj
    assert w8.weight_scale.dtype == torch.float32 and w8._packed is not None  # C++ kernel's contract


def _buffer_shapes(model):
    from lathe.compress.modules import QUANT_MODULES

    return {tuple(b.shape) for m in model.modules() if type(m).__name__ in QUANT_MODULES
            for b in m.buffers(recurse=False) if b is not None}


COPIES = ("aten::_to_copy", "aten::clone", "aten::copy_", "aten::contiguous")


@pytest.mark.parametrize("recipe,dtype", [(r, torch.float32) for r in RECIPES[:3]]
                         + [("int4-rtn", torch.bfloat16), ("int8-weight-only", torch.bfloat16)])
def test_a_decode_step_converts_no_buffer(tiny, recipe, dtype, monkeypatch):
    """A static-cache decode step: no copy or conversion of any quantized module's buffer
    (the profiler sees inside the ops' bodies), and no packing (packers patched to fail).
    FP8 on the CPU is the reference simulation and W8A8's C++ kernel takes fp32 only: both
    convert activations by design and are left out here."""
    from lathe.kernels import cpu, cpu_int4, cpu_w8a16

    m = lathe.load(tiny[recipe], dtype=dtype)
    m.setup_static_cache(1, 16)
    tok, pos = torch.tensor([[3]]), torch.tensor([5])
    for mod, name in ((cpu, "int8_pack"), (cpu_int4, "int4_pack"), (cpu_w8a16, "w8a16_pack")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("packed on the hot path"))
    shapes = _buffer_shapes(m)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        m.forward_static(tok, pos)
    bad = [(e.name, e.input_shapes) for e in prof.events()
           if e.name in COPIES and any(tuple(s) in shapes for s in e.input_shapes if s)]
    assert not bad
    assert any(e.name.startswith("lathe::") for e in prof.events())  # the ops were seen


def test_bad_device_and_dtype_are_one_line_errors():
    with pytest.raises(BadInput, match="dtype"):
        lathe.load(DECODER, dtype=torch.int8)
    with pytest.raises(BadInput, match="device"):
        lathe.load(DECODER, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no usable CUDA GPU"):
            lathe.load(DECODER, device="cuda")
