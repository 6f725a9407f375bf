"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") for lathe's int4 group format.

Per Linear y = x W^T the layer-wise objective is ||X W^T - X Q^T||^2, whose Hessian in each
row of W is H = 2 X^T X (X: the layer's calibration inputs, flattened over tokens). Columns
are quantized one at a time and the error of each is spread over the columns not yet
quantized through the inverse Hessian (OBS update), computed once as the upper Cholesky
factor of H^-1, with lazy batch updates of `block` columns.

- H is accumulated streaming (HessianAccumulator.update per batch of tokens), never holding
  the activations.
- Dampening: damp * mean(diag(H)) is added to the diagonal; if the Cholesky factorisation
  still fails, the dampening is raised tenfold (up to 4 times).
- Dead columns (H_jj == 0: the input channel was zero on every calibration token): H_jj is
  set to 1 so H stays invertible. Their weights are kept (quantized as RTN would, with no
  error spread to other columns) instead of being zeroed as the reference implementation
  does, so inputs that do fire on that channel after calibration still see the weight.
- act_order: columns are solved by descending diag(H) (the most active inputs first). lathe's
  int4 format has no g_idx (no per-column group index), so the group of column k must stay
  k // group_size. We take option (a): the groups are defined in the ORIGINAL column order
  and their scale/zero are computed up front from the original weights ("static groups");
  the permuted solve then rounds each column on the grid of its original group, and the
  result is un-permuted. The layer's input features are never permuted, so the checkpoint
  is the plain format and nothing else in the model changes.
- Without act_order the group scale/zero are computed when the solve reaches the group's
  first column, from the weights as updated so far (the reference behaviour; groups of
  32/64/128 never straddle a 128-column block).
"""
from __future__ import annotations

import contextlib

import torch

from lathe.compress.formats import Int4Group


class HessianAccumulator:
    """H = 2/n sum_t x_t x_t^T over the n tokens seen, as a running mean (fp32).

    Under torch.distributed each rank accumulates its share of the calibration tokens; the
    first read of `H` or `n` after an update combines the ranks (all-reduce SUM of n_r * H_r
    and of n_r, then H = sum / n), so the solve sees the Hessian of all the data. Reading is
    then a collective: every rank reads in the same order, as the layer-by-layer loop does.
    In a single process nothing is reduced (bit-identical)."""

    def __init__(self, in_features: int, device=None):
        self._H = torch.zeros(in_features, in_features, device=device)
        self._n = 0
        self._pending = True  # even a rank that sees no token must join the first reduction

    def update(self, x: torch.Tensor):
        """x: [T, K] tokens (padding already removed)."""
        self._pending = True
        x = x.detach().reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        if t == 0:
            return
        n = self._n + t
        self._H.addmm_(x.t(), x, beta=self._n / n, alpha=2.0 / n)
        self._n = n

    def _sync(self):
        from lathe.compress import distributed as dist

        if self._pending and dist.is_distributed():
            total = int(dist.all_reduce_count(self._n))
            if total:
                # fp64 for the weighted sum so the result does not depend on rank order much
                H = dist.all_reduce_sum_(self._H.double() * self._n)
                self._H = (H / total).to(self._H.dtype)
            self._n = total
        self._pending = False

    @property
    def H(self) -> torch.Tensor:
        self._sync()
        return self._H

    @property
    def n(self) -> int:
        self._sync()
        return self._n


def group_params(fmt: Int4Group, w: torch.Tensor):
    """The format's own RTN scale and zero of each row of w [N, g]: -> (scale [N], zero [N])
    (zero as float). Uses Int4Group.quantize so GPTQ rounds on exactly the format's grid."""
    _, s, z = fmt.quantize(w)
    return s[:, 0], z[:, 0].float()


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(clamp(round(w / s) + z, 0, 15) - z) * s: the value the int4 code stands for."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 15)
    return (q - zero) * scale


def _inverse_cholesky(H: torch.Tensor, damp: float):
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, in float64 for robustness."""
    H = H.double()
    K = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U.float(), lam
        lam *= 10.0
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after 10^4x dampening")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, fmt: Int4Group, damp: float = 0.01,
                  act_order: bool = False, block: int = 128):
    """Quantize weight [N, K] with Hessian H [K, K] on `fmt`'s grid.

    Returns (Q [N, K] fp32: the dequantized int4 values, in the original column order;
    scales [N, K/g]; zeros [N, K/g] (float codes); info dict).
    """
    W = weight.detach().float().clone()
    N, K = W.shape
    g = fmt.group_size
    if K % g:
        raise ValueError(f"in_features {K} is not a multiple of group_size {g}")
    G = K // g
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    scales = torch.empty(N, G, device=W.device)
    zeros = torch.empty(N, G, device=W.device)
    if act_order:
        # static groups, original order (see the module docstring, option (a))
        for j in range(G):
            scales[:, j], zeros[:, j] = group_params(fmt, W[:, j * g:(j + 1) * g])
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        col_group = (perm // g).tolist()
    else:
        perm = col_group = None

    with few_threads(N, K):
        Hinv, lam = _inverse_cholesky(H, damp)
        Q, loss = _solve(W, Hinv, fmt, scales, zeros, col_group, block)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    info = {"loss": float(loss.sum()), "dead_columns": int(dead.sum()), "damp": float(lam)}
    if not torch.isfinite(Q).all():
        raise RuntimeError("GPTQ produced non-finite weights")
    return Q, scales, zeros, info


@contextlib.contextmanager
def few_threads(rows: int, cols: int):
    """The column loop runs thousands of tiny ops ([N] vectors, [N, <=128] rank-1 updates) and
    the factorisations of a small H take milliseconds; for layers this small intra-op
    threading costs more in synchronisation than it gains (several times over on a loaded
    machine), so they run on one thread; the previous setting is restored."""
    n = torch.get_num_threads()
    if rows > 8192 or cols > 2048 or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _solve(W, Hinv, fmt, scales, zeros, col_group, block):
    """The GPTQ column loop with lazy block updates; fills scales/zeros when col_group is None."""
    N, K = W.shape
    g = fmt.group_size
    act_order = col_group is not None
    Q = torch.zeros_like(W)
    loss = torch.zeros(N, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                j = col_group[col]
                s, z = scales[:, j], zeros[:, j]
            else:
                if col % g == 0:  # a group starts here: its grid from the updated weights
                    j = col // g
                    scales[:, j], zeros[:, j] = group_params(fmt, W1[:, i:i + g])
                s, z = scales[:, col // g], zeros[:, col // g]
            w = W1[:, i]
            d = Hinv1[i, i]
            q = fake_quant(w, s, z)
            Q1[:, i] = q
            err = (w - q) / d
            loss += (w - q).pow(2) / d ** 2 / 2
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if i2 < K:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    return Q, loss


def rtn_dequant(weight: torch.Tensor, fmt: Int4Group) -> torch.Tensor:
    """RTN on fmt's grid, dequantized (for comparisons)."""
    N, K = weight.shape
    qw, s, z = fmt.quantize(weight)
    return fmt.dequantize(qw, s, z, K).float()


__all__ = ["HessianAccumulator", "gptq_quantize", "few_threads", "group_params", "fake_quant", "rtn_dequant"]
