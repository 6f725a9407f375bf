"""lathe._C_cuda: the build and its argument checks (any machine), and the kernels against
lathe.kernels.reference (GPU only).

Tolerances come from the reference itself: lathe's error against the fp32 reference must be
at most twice the error of the same math done by PyTorch in the low precision (plus a tiny
epsilon), so they follow the dtype and the data, not a magic atol.
"""
import contextlib
import importlib
import math
import os
import shutil

import pytest
import torch

from lathe.kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMMY = 1 << 20  # a non-null, 16-byte aligned fake device pointer; never dereferenced here


def _nvcc_present() -> bool:
    return bool(shutil.which("nvcc")) or os.path.exists("/usr/local/cuda/bin/nvcc")


def _cuda_ext():
    try:
        return importlib.import_module("lathe._C_cuda")
    except ImportError:
        return None


@pytest.fixture(scope="module")
def ext():
    mod = _cuda_ext()
    if mod is None:
        pytest.skip("lathe._C_cuda is not built")
    return mod


@pytest.fixture(scope="module")
def ext_no_device(ext):
    """The raw module on a machine without a CUDA device: the tests that hand it fake pointers
    (DUMMY) run only there. With a device present a fake pointer that passed a check by mistake
    would reach the driver (the H200 run segfaulted here); the wrapper tests with real tensors
    (test_gpu_wrapper_shape_errors) cover that machine."""
    if ext.has_device():
        pytest.skip("a CUDA device is present: fake pointers are never handed to it")
    return ext


# Valid argument sets for the raw module; tests override one field at a time.
def _w4_args(**kw):
    a = dict(x=DUMMY, qweight=DUMMY, scales=DUMMY, zeros=DUMMY, bias=0, out=DUMMY,
             M=1, N=64, K=256, group_size=128, dtype=0, stream=0)
    a.update(kw)
    return a


def _attn_args(**kw):
    a = dict(q=DUMMY, k=DUMMY, v=DUMMY, seq_lens=0, out=DUMMY, B=2, Hq=8, Hkv=2, S=17, D=128,
             scale=None, dtype=1, stream=0)
    a.update(kw)
    return a


# ----------------------------------------------------------------------------- build / checks


def test_extension_builds_where_nvcc_is():
    if os.environ.get("LATHE_CUDA") == "0":
        pytest.skip("LATHE_CUDA=0 disables the CUDA build")
    if not _nvcc_present():
        pytest.skip("nvcc not found: the CUDA extension is not built on this machine")
    if not os.path.exists(os.path.join(ROOT, "csrc", "cuda", "bindings_cuda.cpp")):
        pytest.skip("csrc/cuda is not in this checkout")
    mod = _cuda_ext()
    assert mod is not None, "nvcc is present but lathe._C_cuda did not build/import"
    for name in ("device_count", "has_device", "w4a16_linear", "decode_attention"):
        assert hasattr(mod, name), name
    assert isinstance(mod.device_count(), int)
    assert mod.has_device() == (mod.device_count() > 0)


def test_no_device_raises_runtime_error(ext_no_device):
    ext = ext_no_device
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ext.w4a16_linear(**_w4_args())
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ext.decode_attention(**_attn_args())
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ext.decode_attention(**_attn_args(seq_lens=DUMMY, scale=0.1, dtype=0))


@pytest.mark.parametrize("bad, match", [
    (dict(group_size=48), r"group_size.*48"),
    (dict(K=96, group_size=64), r"K \(96\).*multiple of group_size \(64\)"),
    (dict(M=0), r"M must be positive, got 0"),
    (dict(N=-3), r"N must be positive, got -3"),
    (dict(dtype=2), r"dtype.*got 2"),
    (dict(qweight=0), r"qweight pointer is null"),
    (dict(x=DUMMY + 2), r"x pointer .* not 16-byte aligned"),
    (dict(scales=DUMMY + 1), r"scales pointer .* not 2-byte aligned"),
])
def test_w4a16_bad_arguments_raise_value_error(ext_no_device, bad, match):
    with pytest.raises(ValueError, match=match):
        ext_no_device.w4a16_linear(**_w4_args(**bad))


@pytest.mark.parametrize("bad, match", [
    (dict(Hq=6, Hkv=4), r"Hq \(6\) must be a multiple of Hkv \(4\)"),
    (dict(D=80), r"head dim D = 80"),
    (dict(S=0), r"S must be positive, got 0"),
    (dict(B=70000), r"B = 70000"),
    (dict(scale=float("inf")), r"scale must be finite"),
    (dict(v=0), r"v pointer is null"),
    (dict(seq_lens=DUMMY + 2), r"seq_lens pointer .* not 4-byte aligned"),
    (dict(dtype=-1), r"dtype.*got -1"),
])
def test_attention_bad_arguments_raise_value_error(ext_no_device, bad, match):
    with pytest.raises(ValueError, match=match):
        ext_no_device.decode_attention(**_attn_args(**bad))


def test_wrapper_imports_without_cuda_init():
    cuda_ops = importlib.import_module("lathe.kernels.cuda_ops")
    assert hasattr(cuda_ops, "w4a16_linear") and hasattr(cuda_ops, "decode_attention")
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


def test_wrapper_rejects_cpu_tensors():
    from lathe.kernels import cuda_ops
    x = torch.zeros(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_ops.w4a16_linear(x, torch.zeros(4, 32, dtype=torch.uint8),
                              torch.zeros(4, 2, dtype=torch.float16),
                              torch.zeros(4, 2, dtype=torch.uint8), 32)
    q = torch.zeros(1, 2, 64, dtype=torch.float16)
    kv = torch.zeros(1, 2, 5, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        cuda_ops.decode_attention(q, kv, kv)


# ----------------------------------------------------------------------------- GPU: W4A16

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float16, torch.bfloat16]


@contextlib.contextmanager
def _full_fp32():
    """The fp32 references must not silently run in TF32 (another test may have enabled it)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _bound(err_lowp: torch.Tensor, ref: torch.Tensor) -> float:
    """2x PyTorch's own low-precision error, plus an epsilon far below one ulp of the output."""
    return 2.0 * float(err_lowp) + 1e-6 * (float(ref.abs().max()) + 1.0)


def _make_int4(N, K, g, dtype, symmetric, gen):
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    # Scales of a real RTN quantizer: ~ amax / 7, so W has unit-ish magnitude / sqrt(K).
    scales = (torch.rand(N, K // g, generator=gen) * 0.02 + 0.005).to(dtype)
    if symmetric:
        zeros = torch.full((N, K // g), 8, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 16, (N, K // g), generator=gen, dtype=torch.uint8)
    return qweight, scales, zeros


W4_SHAPES = [  # (M, N, K, group_size, symmetric, bias)
    (1, 4096, 4096, 128, True, False),
    (3, 11008, 4096, 128, False, True),
    (16, 4096, 11008, 64, False, False),
    (1, 257, 257 * 128, 128, False, True),
    (5, 100, 96, 32, False, True),     # N not a multiple of 16, K not a multiple of 128
    (9, 33, 320, 64, True, False),     # second mma column tile, partial
    (20, 48, 256, 32, False, True),    # M > 16 runs in slices of 16
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("M, N, K, g, symmetric, with_bias", W4_SHAPES)
def test_w4a16_matches_reference(M, N, K, g, symmetric, with_bias, dtype):
    from lathe.kernels import cuda_ops
    gen = torch.Generator().manual_seed(M * 1000003 + N * 31 + K)
    qweight, scales, zeros = _make_int4(N, K, g, dtype, symmetric, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    dev = torch.device("cuda")
    x, qweight, scales, zeros = (t.to(dev) for t in (x, qweight, scales, zeros))
    bias = bias.to(dev) if bias is not None else None

    y = cuda_ops.w4a16_linear(x, qweight, scales, zeros, g, bias)
    torch.cuda.synchronize()
    assert y.shape == (M, N) and y.dtype == dtype

    # fp32 reference (x in fp32, W dequantized in the scales' dtype as the format defines).
    with _full_fp32():
        ref = reference.linear_w4a16(x.float(), qweight, scales, zeros, g,
                                     None if bias is None else bias.float())
    # The same math in PyTorch at the activation precision.
    w = reference.dequant_int4(qweight, scales, zeros, g, K)
    lowp = x @ w.t()
    if bias is not None:
        lowp = lowp + bias
    err = (y.float() - ref).abs().max()
    err_lowp = (lowp.float() - ref).abs().max()
    assert torch.isfinite(y).all()
    assert float(err) <= _bound(err_lowp, ref), (float(err), float(err_lowp))


@pytest.mark.gpu
@requires_gpu
def test_w4a16_leading_dims_and_unaligned_view():
    from lathe.kernels import cuda_ops
    gen = torch.Generator().manual_seed(7)
    qweight, scales, zeros = _make_int4(64, 256, 64, torch.float16, False, gen)
    dev = torch.device("cuda")
    qweight, scales, zeros = qweight.to(dev), scales.to(dev), zeros.to(dev)
    base = torch.randn(2 * 3 * 256 + 1, generator=gen).half().to(dev)
    x = base[1:].view(2, 3, 256)  # 2-byte offset: the wrapper copies it to an aligned buffer
    y = cuda_ops.w4a16_linear(x, qweight, scales, zeros, 64)
    with _full_fp32():
        ref = reference.linear_w4a16(x.float(), qweight, scales, zeros, 64)
    w = reference.dequant_int4(qweight, scales, zeros, 64, 256)
    err_lowp = ((x @ w.t()).float() - ref).abs().max()
    assert y.shape == (2, 3, 64)
    assert float((y.float() - ref).abs().max()) <= _bound(err_lowp, ref)


# ----------------------------------------------------------------------------- GPU: attention


def _lowp_attention(q4, k, v, mask, scale):
    """reference.attention's math, but every step in q's dtype (what plain PyTorch would do)."""
    rep = q4.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q4 @ kr.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return p @ vr


ATTN_SHAPES = [  # (B, Hq, Hkv, S, D, seq_lens or None)
    (1, 32, 32, 1, 128, None),
    (2, 32, 8, 17, 128, [17, 5]),
    (3, 32, 4, 4099, 128, [4099, 1, 0]),     # one batch with no key at all
    (2, 8, 1, 4099, 64, None),               # MQA, ratio 8
    (1, 64, 8, 4099, 128, [4000]),
    (2, 12, 2, 300, 96, [300, 123]),         # ratio 6: padded head group
    (1, 32, 2, 77, 64, None),                # ratio 16: two head groups per KV head
    (2, 6, 2, 513, 32, [513, 64]),           # ratio 3
    (2, 4, 4, 250, 256, [250, 249]),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("B, Hq, Hkv, S, D, lens", ATTN_SHAPES)
def test_decode_attention_matches_reference(B, Hq, Hkv, S, D, lens, dtype):
    from lathe.kernels import cuda_ops
    gen = torch.Generator().manual_seed(B * 7919 + Hq * 131 + S + D)
    dev = torch.device("cuda")
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).to(dev)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype).to(dev)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype).to(dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev) if lens is not None else None
    if seq_lens is not None:
        # Garbage (NaN) past each sequence's end must not leak into the result.
        pos = torch.arange(S, device=dev)
        tail = pos[None, :] >= seq_lens[:, None].long()
        k = k.masked_fill(tail[:, None, :, None], float("nan"))
        v = v.masked_fill(tail[:, None, :, None], float("nan"))
    scale = 1.0 / math.sqrt(D)

    out = cuda_ops.decode_attention(q, k, v, seq_lens)
    torch.cuda.synchronize()
    assert out.shape == (B, Hq, D) and out.dtype == dtype

    mask = None
    kc, vc = k, v
    if seq_lens is not None:
        mask = torch.arange(S, device=dev)[None, :] < seq_lens[:, None].long()
        kc = k.masked_fill(~mask[:, None, :, None], 0.0)  # the references must not see NaN
        vc = v.masked_fill(~mask[:, None, :, None], 0.0)
    q4 = q.unsqueeze(2)
    with _full_fp32():
        ref = reference.attention(q4.float(), kc.float(), vc.float(), key_padding_mask=mask,
                                  scale=scale).squeeze(2)
    lowp = _lowp_attention(q4, kc, vc, mask, scale).squeeze(2)
    err = (out.float() - ref).abs().max()
    err_lowp = (lowp.float() - ref).abs().max()
    assert torch.isfinite(out).all()
    assert float(err) <= _bound(err_lowp, ref), (float(err), float(err_lowp))
    if lens is not None:
        for b, n in enumerate(lens):
            if n == 0:
                assert (out[b] == 0).all()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_decode_attention_custom_scale_and_int64_lens(dtype):
    from lathe.kernels import cuda_ops
    gen = torch.Generator().manual_seed(3)
    dev = torch.device("cuda")
    B, Hq, Hkv, S, D = 2, 16, 4, 1000, 128
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).to(dev)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype).to(dev)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype).to(dev)
    lens = torch.tensor([1000, 333], device=dev)  # int64: the wrapper casts to int32
    out = cuda_ops.decode_attention(q, k, v, lens, scale=0.3)
    mask = torch.arange(S, device=dev)[None, :] < lens[:, None]
    q4 = q.unsqueeze(2)
    with _full_fp32():
        ref = reference.attention(q4.float(), k.float(), v.float(), key_padding_mask=mask,
                                  scale=0.3).squeeze(2)
    err_lowp = (_lowp_attention(q4, k, v, mask, 0.3).squeeze(2).float() - ref).abs().max()
    assert float((out.float() - ref).abs().max()) <= _bound(err_lowp, ref)


@pytest.mark.gpu
@requires_gpu
def test_gpu_wrapper_shape_errors():
    from lathe.kernels import cuda_ops
    dev = torch.device("cuda")
    q = torch.zeros(1, 6, 64, dtype=torch.float16, device=dev)
    kv = torch.zeros(1, 4, 8, 64, dtype=torch.float16, device=dev)
    with pytest.raises(ValueError, match=r"q heads \(6\) must be a multiple of kv heads \(4\)"):
        cuda_ops.decode_attention(q, kv, kv)
    x = torch.zeros(1, 256, dtype=torch.float16, device=dev)
    qw = torch.zeros(8, 128, dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match="group_size"):
        cuda_ops.w4a16_linear(x, qw, torch.zeros(8, 5, dtype=torch.float16, device=dev),
                              torch.zeros(8, 5, dtype=torch.uint8, device=dev), 48)
    with pytest.raises(ValueError, match="bfloat16"):
        cuda_ops.w4a16_linear(x.float(), qw, torch.zeros(8, 2, device=dev),
                              torch.zeros(8, 2, dtype=torch.uint8, device=dev), 128)
