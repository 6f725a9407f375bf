"""The AVX512-BF16 attention body (csrc/cpu/attention_bf16.cpp), forced with the avx512_bf16
level, against an fp64 evaluation of the same math; the tolerance is test_cpu_attention's: at
most 2x the error of torch SDPA on the same bf16 tensors (plus one bf16 epsilon at the output's
largest magnitude). The amx level runs the same body (no AMX-BF16 attention yet)."""
import pytest
import torch

from lathe.kernels import cpu
from lathe.kernels.cpu_attention import attention

from test_cpu_attention import _inputs, assert_close_to_truth, check_case, check_views, views

bf16 = torch.bfloat16
LEVELS = ["avx512_bf16", "amx"]

# B, Hq, Hkv, Sq, Sk, D, causal, mask: odd sizes (1, 3, 17, 257), tiles of 64 keys and blocks
# of 48 / 6 rows cut at every place, GQA, odd and large head dims.
CASES = [
    (1, 2, 2, 16, 1, 32, False, False),
    (2, 3, 3, 17, 3, 64, False, True),
    (1, 6, 2, 17, 17, 80, True, False),
    (2, 4, 1, 128, 128, 64, True, True),
    (1, 8, 2, 257, 257, 128, True, False),
    (2, 2, 2, 17, 257, 256, False, True),
    (1, 4, 4, 257, 17, 32, False, False),
    (1, 3, 1, 49, 65, 1, True, True),
    (1, 2, 1, 53, 130, 3, False, True),
    (1, 2, 2, 300, 40, 17, True, False),  # Sq > Sk: the first causal rows see no key
    (2, 12, 12, 128, 128, 32, False, True),  # MiniLM's head dim
]


def _level_or_skip(level):
    why = cpu.isa_missing(level)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal,mask", CASES)
def test_matches_reference(level, B, Hq, Hkv, Sq, Sk, D, causal, mask):
    _level_or_skip(level)
    check_case(level, B, Hq, Hkv, Sq, Sk, D, causal, mask, bf16)


@pytest.mark.parametrize("scale", [0.05, -0.1, 0.0, 0.3])
def test_explicit_scale(scale):
    _level_or_skip("avx512_bf16")
    q, k, v, m = _inputs(2, 4, 2, 33, 70, 40, bf16, mask=True, seed=3)
    with cpu.force_isa("avx512_bf16"):
        out = attention(q, k, v, m, False, scale)
    assert_close_to_truth(out, q, k, v, False, m, scale)


def test_transposed_views_give_the_contiguous_bits():
    _level_or_skip("avx512_bf16")
    check_views("avx512_bf16", *views(bf16))


def test_nan_in_is_nan_out_for_the_rows_that_see_it():
    _level_or_skip("avx512_bf16")
    q, k, v, _ = _inputs(1, 2, 2, 40, 100, 64, bf16, mask=False, seed=9)
    k[0, 0, 70, 5] = float("nan")  # key 70: seen by causal rows i >= 70 - (Sk - Sq) = 10
    v[0, 1, 3, 0] = float("nan")   # value 3 of head 1: every row of head 1 that sees key 3
    q[0, 0, 2, 1] = float("nan")   # query row 2 of head 0
    with cpu.force_isa("avx512_bf16"):
        out = attention(q, k, v, None, causal=True)
    nan_rows = torch.isnan(out).any(-1)[0]  # [H, Sq]
    expect = torch.zeros(2, 40, dtype=torch.bool)
    expect[0, 10:] = True
    expect[0, 2] = True
    expect[1, :] = True  # key 3 is visible to every row (lim >= 60)
    assert torch.equal(nan_rows, expect)
    assert torch.isnan(out[0, 1, :, 0]).all() and not torch.isnan(out[0, 1, :, 1:]).any()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 3]), Sq=st.integers(1, 150),
       Sk=st.integers(1, 200), D=st.integers(1, 160), causal=st.booleans(), mask=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_any_shape(B, Hkv, rep, Sq, Sk, D, causal, mask, seed):
    _level_or_skip("avx512_bf16")
    q, k, v, m = _inputs(B, Hkv * rep, Hkv, Sq, Sk, D, bf16, mask, seed)
    with cpu.force_isa("avx512_bf16"):
        out = attention(q, k, v, m, causal)
    assert_close_to_truth(out, q, k, v, causal, m)
