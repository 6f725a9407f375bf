"""The decode path that is not launch-bound: the Llama adapter's static KV cache gives the
eager path's logits exactly, greedy generation through it gives the same tokens, and every
lathe op in a decode step traces under torch.compile(fullgraph=True) (no host sync, no
.item(), no size that depends on data: what a CUDA graph needs), as does the GPU code of
the `torch` backend (torch._int_mm / torch._scaled_mm) and the SDPA attention path."""
from pathlib import Path

import pytest
import torch

import lathe
from lathe.errors import BadInput
from lathe.models.static_cache import GraphedStep, generate_static

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"
RECIPES = ["int8-dynamic", "int4-rtn", "int8-weight-only", "fp8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lathe.bench.synthetic import quantize_checkpoint, write_llama

    d = tmp_path_factory.mktemp("tiny")
    src = write_llama(d / "src", hidden=128, intermediate=256, heads=4, kv_heads=2, layers=2,
                      vocab=160, dtype=torch.float32)
    return {"none": src, **{r: quantize_checkpoint(src, r, d / r) for r in RECIPES}}


def _ids(B, S, vocab):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(1))


def _check_static_equals_eager(m, vocab, B=2, S=9, max_len=24):
    ids = _ids(B, S, vocab)
    with torch.no_grad():
        ref, cache = m(ids, use_cache=True)
        m.setup_static_cache(B, max_len)
        assert torch.equal(m.forward_static(ids, torch.arange(S), start=0), ref)
        pos = torch.tensor([S])
        nxt = ref[:, -1:].argmax(-1)
        for _ in range(3):  # a few steps: the cache fills position by position
            ref, cache = m(nxt, past_key_values=cache, use_cache=True)
            assert torch.equal(m.forward_static(nxt, pos), ref)
            nxt, pos = ref[:, -1:].argmax(-1), pos + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_decoder_static_equals_eager(dtype):
    _check_static_equals_eager(lathe.load(DECODER, dtype=dtype), 4096)


@pytest.mark.parametrize("recipe", ["none"] + RECIPES)
def test_compressed_static_equals_eager(tiny, recipe):
    _check_static_equals_eager(lathe.load(tiny[recipe], dtype=torch.float32), 160)


def test_generate_static_gives_the_eager_tokens():
    m = lathe.load(DECODER)
    ids = _ids(2, 12, 4096)
    m.setup_static_cache(2, 12 + 10)
    assert torch.equal(generate_static(m, ids, 10), m.generate(ids, 10))
    step = GraphedStep(m)  # on the CPU: the same forward_static, called directly
    assert step.graph is None


def test_static_cache_bad_use_is_one_line():
    m = lathe.load(DECODER)
    with pytest.raises(BadInput, match="setup_static_cache"):
        m.forward_static(torch.tensor([[1]]), torch.tensor([0]))
    m.setup_static_cache(1, 8)
    with pytest.raises(BadInput, match="one token"):
        m.forward_static(torch.tensor([[1, 2]]), torch.tensor([0, 1]))
    with pytest.raises(BadInput, match="max_len"):
        m.forward_static(torch.zeros(1, 9, dtype=torch.long), torch.arange(9), start=0)
    with pytest.raises(BadInput, match="rows"):
        m.forward_static(torch.tensor([[1], [2]]), torch.tensor([0]))


@pytest.mark.parametrize("recipe", ["none"] + RECIPES)
def test_decode_step_compiles_fullgraph(tiny, recipe):
    """Every op of the step (the four quantized linears, attention over the static cache,
    index_copy_ into it) traces through its fake with fullgraph=True, and the compiled step
    computes the eager one's logits."""
    torch._dynamo.reset()
    m = lathe.load(tiny[recipe], dtype=torch.float32)
    m.setup_static_cache(1, 16)
    ids = _ids(1, 5, 160)
    with torch.no_grad():
        m.forward_static(ids, torch.arange(5), start=0)
        tok, pos = torch.tensor([[7]]), torch.tensor([5])
        ref = m.forward_static(tok, pos)
        step = torch.compile(m.forward_static, fullgraph=True, backend="aot_eager")
        assert torch.equal(step(tok, pos), ref)
        # the next position reuses the graph (no recompile on the position's value)
        ref2 = m.forward_static(tok, pos + 1)
        assert torch.equal(step(tok, pos + 1), ref2)


def _int8_case(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    return x, w, torch.rand(N, generator=g) / 100, torch.randn(N, generator=g)


@pytest.mark.parametrize("M,K,N", [(1, 64, 16), (3, 136, 40), (17, 64, 24), (257, 32, 8)])
@pytest.mark.parametrize("asym", [False, True])
def test_torch_backend_w8a8_is_the_reference(M, K, N, asym):
    """torch._int_mm with the zero point through the weight's row sums is exact: the same
    bits as the reference (int32 accumulation, then the reference's fp32 epilogue)."""
    from lathe.kernels import reference, torch_mm

    x, w, s, b = _int8_case(M, K, N)
    smooth = torch.rand(K) + 0.5
    colsum = w.sum(1, dtype=torch.int32)
    for act in ("none", "silu"):
        got = torch_mm.linear_w8a8(x, w, s, b, act, smooth, asym, colsum)
        ref = reference.linear_w8a8(x, w, s, b, act, smooth, asym)
        assert torch.equal(got, ref)
        compiled = torch.compile(torch_mm.linear_w8a8, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x, w, s, b, act, smooth, asym, colsum), ref)
        torch._dynamo.reset()


@pytest.mark.parametrize("M,K,N", [(1, 32, 16), (3, 64, 48), (17, 32, 32)])
@pytest.mark.parametrize("gran,act", [("per_channel", "per_token"), ("per_tensor", "per_token"),
                                      ("per_channel", "per_tensor"), ("per_tensor", "per_tensor")])
def test_torch_backend_fp8_is_within_the_reference(M, K, N, gran, act):
    """torch._scaled_mm against the reference simulation: the same FP8 codes, so the only
    difference is fp32 accumulation order, bounded by K ulp-sized errors of |x||w|."""
    from lathe.compress.formats import FP8E4M3
    from lathe.kernels import reference, torch_mm

    g = torch.Generator().manual_seed(M + K + N)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    q, s = FP8E4M3(gran, act).quantize(w)
    got = torch_mm.linear_fp8(x, q, s, b, act)
    ref = reference.linear_fp8(x, q, s, b, act)
    bound = K * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t()) + 1e-6
    assert ((got - ref).abs() <= bound).all()
    compiled = torch.compile(torch_mm.linear_fp8, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, q, s, b, act), got)
    torch._dynamo.reset()


def test_torch_backend_through_the_ops(tiny):
    """Forcing the `torch` backend on the CPU runs the GPU's code path end to end."""
    from lathe.kernels.dispatch import use_backend

    ids = _ids(1, 6, 160)
    for recipe, op in (("int8-dynamic", "linear_w8a8"), ("fp8", "linear_fp8")):
        with torch.no_grad():
            with use_backend("reference", op):
                ref = lathe.load(tiny[recipe])(ids)
            with use_backend("torch", op):
                got = lathe.load(tiny[recipe])(ids)
        assert (got - ref).norm() / ref.norm() < 1e-5


def test_sdpa_attention_with_padding_compiles_fullgraph():
    """The SDPA path (attention on a GPU without Triton) no longer syncs on padding rows."""
    from lathe.kernels import ops, reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 17, 16, generator=g),
               torch.randn(2, 2, 17, 16, generator=g))
    mask = torch.arange(17).expand(2, -1) <= torch.tensor([[5], [-1]])  # row 1: no key at all
    f = torch.compile(ops._sdpa, fullgraph=True, backend="aot_eager")
    got = f(q, k, v, mask, False, None)
    ref = reference.attention(q, k, v, False, mask, None)
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(got[1], torch.zeros_like(got[1]))
