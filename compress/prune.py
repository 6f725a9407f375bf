"""Unstructured and N:M (2:4) pruning: magnitude, Wanda and SparseGPT.

- magnitude: |W|, per layer (`scope: layer`) or one threshold over all layers (`global`).
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij| * ||X_j||_2 (X: the layer's calibration inputs), compared within each output row.
- SparseGPT (Frantar & Alistarh 2023): OBS-style one-shot pruning; each pruned weight's error
  is spread over the columns not yet visited through the inverse Hessian H = 2 X^T X (the
  GPTQ machinery of lathe.compress.gptq, with its dampening and lazy block updates).

Wanda and SparseGPT calibrate layer by layer (weight_only.run_layerwise): each group's
statistics come from inputs that already went through the pruned earlier layers.
Weights stay dense nn.Linear holding zeros, so a checkpoint is plain dense safetensors (no
smaller on disk unless quantized after) and runs no faster on lathe's dense kernels. N:M
masks keep N of every M consecutive weights along K (the input dimension), the layout
torch.sparse.to_sparse_semi_structured (cuSPARSELt) takes for 2:4.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from lathe.compress.calibration import ChannelSum
from lathe.compress.config import CONFIGS, _check_bool, _check_skip, register_handler
from lathe.compress.gptq import HessianAccumulator, _inverse_cholesky, few_threads
from lathe.errors import BadInput

log = logging.getLogger("lathe.compress")

NO_SPEEDUP = ("N:M sparsity on CPU brings a size/quality trade-off but no speed-up: lathe has "
              "no sparse CPU kernel, the zeros are multiplied like any weight")
DENSE_FILE = ("weights stay dense (zeros in nn.Linear): the checkpoint is plain dense "
              "safetensors, not smaller on disk unless quantized after")


def parse_pattern(p) -> tuple[int, int]:
    """"2:4" -> (2, 4): keep N of every M consecutive weights along the input dimension."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", p) if isinstance(p, str) else None
    if not m or not 0 < int(m.group(1)) < int(m.group(2)) <= 256:
        raise BadInput(f"prune.pattern must be 'N:M' with 0 < N < M <= 256 (e.g. '2:4'), got {p!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass
class PruneConfig:
    """Zero a fraction of each Linear's weights (see the module docstring).

    sparsity: fraction of weights zeroed, in [0, 1) (default 0.5; with a pattern it follows
    from N:M and may be left out). pattern: "N:M" or null. scope: layer | global (magnitude
    only). skip: fnmatch patterns of Linear names left dense. damp/blocksize: SparseGPT's
    dampening (fraction of the mean Hessian diagonal) and lazy-update block (a multiple of M).
    accelerate: on CUDA, convert 2:4 weights with torch.sparse.to_sparse_semi_structured (in
    memory only; a recipe's checkpoint stays dense)."""

    method: ClassVar[str] = "prune"
    algo: str = "magnitude"
    sparsity: float | None = None
    scope: str = "layer"
    pattern: str | None = None
    skip: list = field(default_factory=lambda: ["lm_head"])
    damp: float = 0.01
    blocksize: int = 128
    accelerate: bool = False

    def __post_init__(self):
        if self.algo not in ("magnitude", "wanda", "sparsegpt"):
            raise BadInput(f"prune.algo must be one of magnitude, wanda, sparsegpt, got {self.algo!r}")
        if self.scope not in ("layer", "global"):
            raise BadInput(f"prune.scope must be layer or global, got {self.scope!r}")
        nm = parse_pattern(self.pattern) if self.pattern is not None else None
        if self.sparsity is not None:
            s = self.sparsity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
                raise BadInput(f"prune.sparsity must be a number in [0, 1), got {s!r}")
            self.sparsity = float(s)
            if nm and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
                raise BadInput(f"prune.sparsity {s} contradicts pattern {self.pattern} "
                               f"({1 - nm[0] / nm[1]:g}); leave sparsity out")
        if self.scope == "global" and (self.algo != "magnitude" or nm):
            raise BadInput("prune.scope global applies to algo magnitude without a pattern only")
        _check_skip("prune", self.skip)
        _check_bool("prune", "accelerate", self.accelerate)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) \
                or not 0.0 < float(self.damp) <= 1.0:
            raise BadInput(f"prune.damp must be a number in (0, 1], got {self.damp!r}")
        b = self.blocksize
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or (nm and b % nm[1]):
            raise BadInput(f"prune.blocksize must be a positive integer (a multiple of M with a "
                           f"pattern), got {b!r}")

    @property
    def nm(self):
        return parse_pattern(self.pattern) if self.pattern is not None else None

    @property
    def target(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else (0.5 if self.sparsity is None else self.sparsity)


CONFIGS[PruneConfig.method] = PruneConfig


# ----------------------------------------------------------------------------- masks


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask [N, K]: the n highest scores of every m consecutive ones along K."""
    N, K = score.shape
    g = score.reshape(N, K // m, m)
    drop = torch.topk(g, m - n, dim=-1, largest=False).indices
    keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(N, K)


def row_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask: the lowest round(sparsity * K) scores of each row dropped (Wanda's rule)."""
    k = int(round(sparsity * score.shape[1]))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    return keep


def layer_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask: the lowest round(sparsity * numel) scores of the whole matrix dropped."""
    k = int(round(sparsity * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
    return keep.reshape(score.shape)


def wanda_score(weight: torch.Tensor, xnorm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2."""
    return weight.detach().float().abs() * xnorm.float()[None, :]


# ----------------------------------------------------------------------------- SparseGPT


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm=None,
                    damp: float = 0.01, block: int = 128):
    """SparseGPT on weight [N, K] with Hessian H [K, K]: -> (pruned weight [N, K] fp32, info).

    Unstructured: within each block of columns, the weights with the lowest w^2 / [H^-1]_jj^2
    (over the block, all rows) are pruned, `sparsity` of them (the reference's adaptive mask
    selection). N:M: in each group of M columns the M-N lowest of that score per row."""
    W = weight.detach().float().clone()
    N, K = W.shape
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # an input never seen: its weights carry no measured signal
    with few_threads(N, K):
        Hinv, lam = _inverse_cholesky(H, damp)
        loss = torch.zeros(N, device=W.device)
        for i1 in range(0, K, block):
            i2 = min(i1 + block, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            if nm is None:
                score = W1.pow(2) / d[None, :].pow(2)
                prune1 = ~layer_keep(score, sparsity)
            else:
                prune1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    score = W1[:, i:i + nm[1]].pow(2) / d[None, i:i + nm[1]].pow(2)
                    prune1[:, i:i + nm[1]] = ~nm_keep(score, *nm)
                w = W1[:, i]
                q = torch.where(prune1[:, i], torch.zeros_like(w), w)
                err = (w - q) / d[i]
                loss += (w - q).pow(2) / d[i].pow(2) / 2
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            if i2 < K:
                W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    if not torch.isfinite(W).all():
        raise RuntimeError("SparseGPT produced non-finite weights")
    return W, {"loss": float(loss.sum()), "dead_columns": int(dead.sum()), "damp": float(lam)}


# ----------------------------------------------------------------------------- handler


def _sparsity(w: torch.Tensor) -> float:
    return round(float((w == 0).sum()) / w.numel(), 6)


def _accelerate(model, names) -> str:
    """2:4 weights -> torch.sparse semi-structured tensors (cuSPARSELt / CUTLASS), CUDA only."""
    to_sparse = getattr(torch.sparse, "to_sparse_semi_structured", None)
    if to_sparse is None:
        return "not applied: this torch has no torch.sparse.to_sparse_semi_structured"
    done = 0
    for n in names:
        lin = model.get_submodule(n)
        if lin.weight.device.type != "cuda":
            return "not applied: the model is not on a CUDA device"
        try:
            lin.weight = nn.Parameter(to_sparse(lin.weight.detach()), requires_grad=False)
            done += 1
        except (RuntimeError, ValueError, TypeError) as e:  # shape/dtype/GPU not supported
            return f"applied to {done} layers, then stopped at {n}: {str(e).splitlines()[0]}"
    return f"applied to {done} layers (torch.sparse.to_sparse_semi_structured)"


@register_handler(PruneConfig)
def _prune(model, cfg: PruneConfig, calib, progress, ctx=None):
    from lathe.compress.weight_only import _need_calib, run_layerwise, select_linears

    t0 = time.perf_counter()
    nm, target = cfg.nm, cfg.target
    groups, skipped = select_linears(model, cfg.skip, None)
    if nm:  # a row must split into whole groups of M
        kept = []
        for names in groups:
            ok = [n for n in names if model.get_submodule(n).in_features % nm[1] == 0]
            skipped += [f"{n}: in_features {model.get_submodule(n).in_features} is not a "
                        f"multiple of M={nm[1]}" for n in names if n not in ok]
            if ok:
                kept.append(ok)
        groups = kept
    names_all = [n for g in groups for n in g]
    details, mode = {}, "none (magnitude)"

    def apply(n, keep=None, new=None):
        lin = model.get_submodule(n)
        with torch.no_grad():
            if new is not None:
                lin.weight.copy_(new)
            else:
                lin.weight.mul_(keep.to(lin.weight.dtype))

    def magnitude(n):
        s = model.get_submodule(n).weight.detach().float().abs()
        return nm_keep(s, *nm) if nm else layer_keep(s, target)

    if cfg.algo == "magnitude":
        if cfg.scope == "global" and names_all:
            scores = [model.get_submodule(n).weight.detach().float().abs().flatten() for n in names_all]
            allv = torch.cat(scores)
            k = int(round(target * allv.numel()))
            thr = torch.kthvalue(allv, k).values if k else allv.min() - 1
            for n in names_all:
                apply(n, model.get_submodule(n).weight.detach().float().abs() > thr)
        else:
            for i, n in enumerate(names_all):
                apply(n, magnitude(n))
                if progress:
                    progress(i + 1, len(names_all))
    else:
        _need_calib(calib, f"prune with algo {cfg.algo}")

        def process(names, stream):
            if cfg.algo == "wanda":
                acc = ChannelSum(model.get_submodule(names[0]).in_features, power=2)
                stream(acc.update)
                acc.all_reduce()
            else:
                acc = HessianAccumulator(model.get_submodule(names[0]).in_features)
                stream(acc.update)
            for n in names:
                if acc.n == 0:
                    details[n] = {"note": "no calibration token reached this layer: magnitude"}
                    apply(n, magnitude(n))
                elif cfg.algo == "wanda":
                    s = wanda_score(model.get_submodule(n).weight, acc.norm)
                    apply(n, nm_keep(s, *nm) if nm else row_keep(s, target))
                else:
                    w, info = sparsegpt_prune(model.get_submodule(n).weight, acc.H, target, nm,
                                              cfg.damp, cfg.blocksize)
                    details[n] = {"tokens": acc.n, **info}
                    apply(n, new=w)

        mode = run_layerwise(model, groups, calib, process, progress)

    layers = {n: _sparsity(model.get_submodule(n).weight) for n in names_all}
    total = sum(model.get_submodule(n).weight.numel() for n in names_all)
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in names_all)
    notes = [DENSE_FILE]
    if nm:
        log.warning("%s; the checkpoint stays dense (%s:%s pattern in the zeros)", NO_SPEEDUP, *nm)
        notes.append(NO_SPEEDUP + "; on CUDA, 2:4 with accelerate: true uses "
                     "torch.sparse.to_sparse_semi_structured")
    else:
        notes.append("unstructured sparsity: no speed-up on lathe's dense kernels")
    report = {"method": "prune", "algo": cfg.algo, "target_sparsity": round(target, 6),
              "pattern": cfg.pattern, "scope": cfg.scope, "pruned": names_all,
              "sparsity": round(zeros / total, 6) if total else 0.0, "layers": layers,
              "skipped": skipped, "calibration": mode, "notes": notes,
              "seconds": round(time.perf_counter() - t0, 2)}
    if details:
        report["details"] = details
    if cfg.accelerate:
        if nm != (2, 4):
            report["accelerate"] = "not applied: needs pattern 2:4"
        elif ctx is not None:
            report["accelerate"] = "not applied in a recipe: the checkpoint stays dense"
        else:
            report["accelerate"] = _accelerate(model, names_all)
        log.info("prune accelerate: %s", report["accelerate"])
    return report


__all__ = ["PruneConfig", "parse_pattern", "nm_keep", "row_keep", "layer_keep", "wanda_score",
           "sparsegpt_prune"]
