"""Builders the test files share: attention math at a chosen precision, and the harness that
compiles Triton kernels ahead of time for a GPU this machine lacks."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch


def allowed_mask(B, Sq, Sk, causal, mask, device=None) -> torch.Tensor:
    """bool [B, 1, Sq, Sk]: the keys each query may see (causal: aligned to the last key)."""
    allowed = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        qi = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
        allowed = allowed & (torch.arange(Sk, device=device)[None, :] <= qi)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    return allowed


def attention_at(q, k, v, causal, mask, dtype, scale=None):
    """reference.attention's math carried out in `dtype` (the reference hard-codes fp32)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(rep, 1), v.to(dtype).repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(D))
    p = torch.softmax(s.masked_fill(~allowed_mask(B, Sq, Sk, causal, mask, q.device), float("-inf")), dim=-1)
    return torch.nan_to_num(p, nan=0.0) @ v


_AOT_HEADER = r'''
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(e); sys.exit(77)

def build(kern, sig, consts, cap, warps, stages):
    fn = kern
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # unwrap the autotuner
    full = {n: "constexpr" if n in consts else sig.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if full[n][0] == "*"}
    k = triton.compile(ASTSource(fn, full, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
    assert k.asm["cubin"]
'''


def compile_ahead(body: str) -> None:
    """Run `body` (it calls build(kernel, signature, constexprs, capability, warps, stages))
    in a fresh interpreter with the real Triton compiler (not the interpreter); skips when this
    triton lacks the ahead-of-time API, fails with the compiler's error."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _AOT_HEADER + body + '\nprint("ok")\n'], env=env,
                       capture_output=True, text=True)
    if r.returncode == 77:
        pytest.skip(f"this triton has no ASTSource/GPUTarget API: {r.stdout.strip()}")
    assert r.returncode == 0, r.stderr[-3000:]


class One(torch.nn.Module):
    """A model with a single Linear (no linear_groups: each Linear is its own group)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def attention_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, mask, seed=0, device="cpu"):
    """q, k, v and an optional key mask [B, Sk] (the last key real; with B > 1 the last batch
    row has no real key: its outputs must be 0, not NaN)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(device, dtype)
    m = None
    if mask:
        m = torch.rand(B, Sk, generator=g) > 0.3
        m[:, -1] = True
        if B > 1:
            m[-1] = False
        m = m.to(device)
    return q, k, v, m
