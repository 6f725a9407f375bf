"""Channel pruning that shrinks a CNN: each MBConv block's expansion channels are ranked by
importance (l1 / l2: the norm of the channel's expand-conv filter times its BatchNorm gain,
plus the norm of the projection column that reads it; activation: mean |output| of the
depthwise unit on the calibration images) and the least important are removed from the expand
conv + BN, the depthwise conv + BN and the projection's inputs. The width kept is a multiple
of `multiple` (16: whole vector lanes for the int8 kernels). The keep ratio is searched so that
`flops_removed` of the model's multiply-adds go. With refit (default), each block's projection
is then refitted by least squares to give, from the channels kept, the output it gave from all
of them on the calibration images (He et al. 2017 / ThiNet's reconstruction: closed form from
the second moments of the depthwise outputs, one pass); recalibrate_bn re-estimates the
BatchNorm statistics; the pruned model is then distilled briefly (KL on logits) from the
original on the sample images."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.compress.calibration import run_batches
from lathe.compress.config import CONFIGS, register_handler
from lathe.errors import BadInput

log = logging.getLogger("lathe.compress")
IMPORTANCE = ("l1", "l2", "activation")


@dataclass
class PruneChannelsConfig:
    method: ClassVar[str] = "prune-channels"
    flops_removed: float = 0.3
    importance: str = "l2"
    multiple: int = 16
    distill_steps: int = 40
    lr: float = 1e-4
    batch_size: int = 16
    refit: bool = True
    recalibrate_bn: bool = False

    def __post_init__(self):
        if not isinstance(self.flops_removed, (int, float)) or not 0.0 < self.flops_removed < 0.9:
            raise BadInput(f"prune-channels.flops_removed must be in (0, 0.9), got {self.flops_removed!r}")
        if self.importance not in IMPORTANCE:
            raise BadInput(f"prune-channels.importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise BadInput(f"prune-channels.multiple must be a positive integer, got {self.multiple!r}")
        for f in ("refit", "recalibrate_bn"):
            if not isinstance(getattr(self, f), bool):
                raise BadInput(f"prune-channels.{f} must be true or false, got {getattr(self, f)!r}")
        if not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise BadInput(f"prune-channels.distill_steps must be >= 0, got {self.distill_steps!r}")


CONFIGS[PruneChannelsConfig.method] = PruneChannelsConfig


def conv_macs(model: nn.Module, size: int = 224) -> int:
    """Multiply-adds of every Conv2d and Linear at one image of size x size."""
    total, hooks = [0], []

    def hook(m, a, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def _bn_gain(bn):
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()


def _importance(block, kind: str, act_mean=None) -> torch.Tensor:
    if kind == "activation":
        return act_mean
    p = 1 if kind == "l1" else 2
    e = block.expand.conv.weight.flatten(1).norm(p=p, dim=1) * _bn_gain(block.expand.bn)
    d = block.dw.conv.weight.flatten(1).norm(p=p, dim=1) * _bn_gain(block.dw.bn)
    r = block.project.conv.weight.flatten(1).t().norm(p=p, dim=1)
    return (e / e.mean()) * (d / d.mean()) * (r / r.mean())


def _take(conv_bn, idx, out: bool):
    """Keep channels idx of a ConvBNAct: its outputs (conv out + BN; depthwise: also groups) or
    its inputs."""
    c = conv_bn.conv
    with torch.no_grad():
        if out:
            w = c.weight[idx].clone()
            dw = c.groups != 1
            new = nn.Conv2d(len(idx) if dw else c.in_channels, len(idx), c.kernel_size, c.stride, c.padding,
                            groups=len(idx) if dw else 1, bias=c.bias is not None)
            new.weight.copy_(w)
            bn = conv_bn.bn
            nb = nn.BatchNorm2d(len(idx), eps=bn.eps)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(nb, name).copy_(getattr(bn, name)[idx])
            conv_bn.bn = nb
        else:
            new = nn.Conv2d(len(idx), c.out_channels, c.kernel_size, c.stride, c.padding, bias=c.bias is not None)
            new.weight.copy_(c.weight[:, idx])
        if c.bias is not None:
            new.bias.copy_(c.bias[idx] if out else c.bias)
    conv_bn.conv = new


def _activation_means(model, batches) -> dict:
    stats, hooks = {}, []
    for i, b in enumerate(model.blocks):
        if b.expand is None:
            continue

        def h(m, a, out, i=i):
            stats[i] = stats.get(i, 0) + out.detach().abs().mean((0, 2, 3))
        hooks.append(b.dw.register_forward_hook(h))
    run_batches(model, batches, hooks, {}, mode=torch.no_grad)
    return stats


def _moments(model, batches) -> dict:
    """Per expanding block: E[h h^T] and E[h] of the projection's input h (the depthwise
    output, channels as features), float64."""
    st, hooks = {}, []
    for i, b in enumerate(model.blocks):
        if b.expand is None:
            continue

        def h(m, a, out, i=i):
            x = out.detach().double().permute(0, 2, 3, 1).reshape(-1, out.shape[1])
            S, mu, n = st.get(i, (0, 0, 0))
            st[i] = (S + x.t() @ x, mu + x.sum(0), n + x.shape[0])
        hooks.append(b.dw.register_forward_hook(h))
    run_batches(model, batches, hooks, {}, mode=torch.no_grad)
    return {i: (S / n, mu / n) for i, (S, mu, n) in st.items()}


def _refit(block, idx, W: torch.Tensor, S: torch.Tensor, mu: torch.Tensor, damp: float = 1e-4):
    """Projection weight over the kept channels idx minimising E||W h - W' h[idx] - d||^2
    (W [N, C]: the unpruned projection; d: a per-output offset, moved into the BatchNorm's
    running mean). Affine least squares from the moments S = E[h h^T], mu = E[h] of the
    unpruned model; call after _take."""
    W = W.double()
    C = S - torch.outer(mu, mu)  # covariance: the offset d takes the means
    Ck = C[idx][:, idx]
    Ck = Ck + damp * Ck.diagonal().mean().clamp(min=1e-12) * torch.eye(len(idx), dtype=Ck.dtype)
    Wk = torch.linalg.solve(Ck, (W @ C[:, idx]).t()).t()  # [N, k]
    d = W @ mu - Wk @ mu[idx]
    with torch.no_grad():
        block.project.conv.weight.copy_(Wk[:, :, None, None].to(block.project.conv.weight.dtype))
        block.project.bn.running_mean.sub_(d.float())  # bn((z + d) - mean) = bn(z - (mean - d))


def _keep(hidden: int, keep: float, multiple: int) -> int:
    k = int(round(hidden * keep / multiple)) * multiple
    return max(multiple, min(hidden, k))


def shrink(model, keep: float, cfg: PruneChannelsConfig, act_means=None, moments=None) -> list:
    """Prunes every expanding block to keep x its width (rounded to cfg.multiple), in place;
    moments (from _moments): refit each projection on the channels kept."""
    widths = []
    for i, b in enumerate(model.blocks):
        if b.expand is None:
            widths.append(b.dw.conv.out_channels)
            continue
        hidden = b.expand.conv.out_channels
        k = _keep(hidden, keep, cfg.multiple)
        score = _importance(b, cfg.importance, None if act_means is None else act_means[i])
        idx = torch.sort(torch.topk(score, k).indices).values
        _take(b.expand, idx, out=True)
        _take(b.dw, idx, out=True)
        w_full = b.project.conv.weight.detach()[:, :, 0, 0].clone()
        _take(b.project, idx, out=False)
        if moments is not None:
            _refit(b, idx, w_full, *moments[i])
        widths.append(k)
    return widths


def _recalibrate_bn(model, batches):
    """Re-estimate BatchNorm running statistics on the images (cumulative average)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for b in batches:
            model(**b)
    model.eval()


def _distill(student, teacher, batches, steps: int, lr: float):
    if steps == 0:
        return []
    for m in student.modules():  # BN statistics stay as recalibrated
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        targets = [teacher(**b) for b in batches]
    losses = []
    for s in range(steps):
        j = s % len(batches)
        with torch.enable_grad():
            out = student(**batches[j])
            loss = F.kl_div(F.log_softmax(out, -1), F.log_softmax(targets[j], -1), log_target=True,
                            reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        if s % 10 == 0:
            log.info("prune-channels distill step %d/%d: KL %.4f", s + 1, steps, losses[-1])
    student.eval()
    return losses


@register_handler(PruneChannelsConfig)
def prune_channels(model, cfg: PruneChannelsConfig, calib, progress=None, ctx=None) -> dict:
    if not hasattr(model, "blocks") or not all(hasattr(b, "expand") for b in model.blocks):
        raise BadInput(f"prune-channels needs MBConv blocks (EfficientNet-Lite); {type(model).__name__} has none")
    from lathe.compress.qconv import QConv2dInt8
    if any(isinstance(m, QConv2dInt8) for m in model.modules()):
        raise BadInput("prune-channels must come before int8 in the recipe")
    size = int(model.config.get("image_size", 224))
    teacher = copy.deepcopy(model).eval()
    before = conv_macs(model, size)
    act = _activation_means(model, calib) if cfg.importance == "activation" else None
    lo, hi = 0.05, 1.0  # bisect the keep ratio for the FLOPs target
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        shrink(trial, mid, cfg, act)
        if 1 - conv_macs(trial, size) / before >= cfg.flops_removed:
            lo = mid
        else:
            hi = mid
    widths = shrink(model, lo, cfg, act, _moments(model, calib) if cfg.refit else None)
    after = conv_macs(model, size)
    model.config["expand_channels"] = widths
    if cfg.recalibrate_bn:
        _recalibrate_bn(model, calib)
    losses = _distill(model, teacher, calib, cfg.distill_steps, cfg.lr)
    return {"method": "prune-channels", "importance": cfg.importance, "keep_ratio": round(lo, 4),
            "macs_before": before, "macs_after": after, "flops_removed": 1 - after / before,
            "expand_channels": widths, "distill_kl_first_last": losses[:1] + losses[-1:]}
