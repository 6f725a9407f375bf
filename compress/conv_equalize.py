"""Range equalization between consecutive conv units (cross-layer equalization, Nagel et al.
2019 "Data-Free Quantization", driven here by calibration ranges): for a unit A whose output
feeds only unit B, output channel i of A is multiplied by a_i and B's weights reading channel
i are divided by a_i. With a_i >= 1 raising the channels whose range is small up to the
tensor's range, the per-tensor u8 activation between A and B spends its 256 levels on every
channel instead of on the widest few (depthwise networks spread channel ranges over orders of
magnitude).

Exactness: BN-folded A scaled per output channel is exact; ReLU commutes with a_i > 0; ReLU6
does where the scaled channel stays below 6 (relu6(a x) = a relu6(x) for a x <= 6): a_i is
chosen so that a_i * max_i <= the tensor's max (<= 6) on the calibration images, and a
channel that already clips at 6 keeps a_i = 1, as in DFQ's treatment of ReLU6 where it
cannot be removed. The model's fp32 outputs are checked unchanged afterwards (otherwise the
equalization is undone and the report says so).

Cost on B: a depthwise B has per-channel weight scales, so dividing its channel i by a_i is
free; a dense B (1x1 projection) quantizes each output row with one scale, so shrinking an
input column costs that column precision: there a_i is damped to gain ** dense_strength
(0.5: the geometric middle, CLE's balance of the two ranges)."""
from __future__ import annotations

import torch

ACTS = ("relu", "relu6", "none")


def pairs(units: dict, prod: dict, res: dict, fed: dict) -> list[tuple[str, str]]:
    """(A, B) unit names where A's output is B's main input and nothing else's (no other unit
    reads it, as input or residual), and A adds no residual (that would not scale with A)."""
    out = []
    for a, consumers in fed.items():
        if len(consumers) != 1:
            continue
        b = next(iter(consumers))
        if prod.get(b) == a and res.get(b) != a and res.get(a) is None and units[a].act in ACTS:
            out.append((a, b))
    return out


def _channel_range(model, units: dict, names, batches) -> dict:
    """Per-channel (min, max) of each named unit's output over the batches."""
    mx, hooks = {}, []
    for n in names:
        def h(mod, args, kwargs, out, n=n):
            o = out.detach().float()
            lo, hi = o.amin((0, 2, 3)), o.amax((0, 2, 3))
            mx[n] = (lo, hi) if n not in mx else (torch.minimum(mx[n][0], lo), torch.maximum(mx[n][1], hi))
        hooks.append(units[n].register_forward_hook(h, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return mx


def _gains(lo: torch.Tensor, hi: torch.Tensor, clip: float) -> torch.Tensor:
    """Per channel the largest a >= 1 keeping a * [lo_i, hi_i] inside the tensor's [min lo,
    max hi] (what the u8 range covers) and below the activation's clip (a channel at the clip
    keeps 1)."""
    LO, HI = float(lo.min()), float(hi.max())
    inf = torch.full_like(hi, float("inf"))
    up = torch.where(hi > 0, HI / hi.clamp(min=1e-30), inf)
    down = torch.where(lo < 0, LO / lo.clamp(max=-1e-30), inf)
    g = torch.minimum(up, down)
    live = (hi > lo) & torch.isfinite(g) & (hi < clip * (1 - 1e-6))
    return torch.where(live, g, torch.ones_like(g))


def _scale_out(unit, a: torch.Tensor):
    """Multiply unit's output channels by a (its BN gain and shift if it has one)."""
    with torch.no_grad():
        if unit.bn is not None:
            unit.bn.weight.mul_(a)
            unit.bn.bias.mul_(a)
        else:
            unit.conv.weight.mul_(a[:, None, None, None])
            if unit.conv.bias is not None:
                unit.conv.bias.mul_(a)


def _scale_in(unit, a: torch.Tensor):
    """Divide unit's weights reading input channel i by a_i."""
    with torch.no_grad():
        w = unit.conv.weight
        if unit.conv.groups == w.shape[0] == unit.conv.in_channels and unit.conv.groups > 1:
            w.div_(a[:, None, None, None])  # depthwise: channel i is weight row i
        else:
            w.div_(a[None, :, None, None])


def _depthwise(unit) -> bool:
    c = unit.conv
    return c.groups > 1 and c.groups == c.in_channels == c.out_channels


def equalize(model, units: dict, prod: dict, res: dict, fed: dict, batches, dense_strength: float = 0.5,
             max_gain: float = 64.0, check=None) -> dict:
    """In place. units: {name: ConvBNAct}; prod/res/fed: conv_quant's trace. check: a batch whose
    fp32 logits must not change (default batches[0]). Returns the report."""
    ps = pairs(units, prod, res, fed)
    if not ps:
        return {"pairs": 0}
    check = check if check is not None else batches[0]
    with torch.no_grad():
        before = model(**check).double()
    saved = {n: {k: v.clone() for k, v in units[n].state_dict().items()} for p in ps for n in p}
    rng = _channel_range(model, units, [a for a, _ in ps], batches)
    gains = []
    for a, b in ps:
        g = _gains(*rng[a], 6.0 if units[a].act == "relu6" else float("inf")).clamp(1.0, max_gain)
        if not _depthwise(units[b]):
            g = g.pow(dense_strength)
        _scale_out(units[a], g)
        _scale_in(units[b], g)
        gains.append(float(g.max()))
    with torch.no_grad():
        after = model(**check).double()
    # the same logits up to float rounding: a relative error far above fp32's, or a channel the
    # calibration ranges did not cover clipping differently, undoes it
    err = float((after - before).norm() / before.norm().clamp(min=1e-30))
    if not err <= 1e-4:
        for n, sd in saved.items():
            units[n].load_state_dict(sd)
        return {"pairs": 0, "undone": f"changed the fp32 logits by {err:.2e} (relative)"}
    return {"pairs": len(gains), "max_gain": max(gains, default=1.0), "fp32_rel_change": err}
