"""Range equalization between conv units (cross-layer equalization, Nagel et al. 2019
"Data-Free Quantization", driven here by calibration ranges): output channel i of the units
writing an activation is multiplied by a_i >= 1 and the weights of the units reading channel i
are divided by a_i, so that the per-tensor u8 activation spends its 256 levels on every channel
instead of on the widest few. a_i raises channel i's range up to the tensor's own [min, max]
(so no range grows), at most max_gain.

Streams, not just pairs: a unit that adds another's output as its residual writes the same
channels, so a stage's residual stream (every MBConv projection of the stage, and the expand
convs reading it) is one stream with one a.

Exactness: BN-folded per-output-channel scaling is exact; so is ReLU and a linear output
(positively homogeneous), hence the default: only streams written without ReLU6. ReLU6 is not
homogeneous: relu6(a x) = a relu6(x) only where a x <= 6. With through_relu6 the gains keep
every channel under the clip on the calibration images (a channel already at 6 keeps a = 1),
which is exact there but not on images that push a raised channel further (DFQ replaces ReLU6
by ReLU instead; lathe keeps the model's function). The fp32 logits of a calibration batch are
checked unchanged afterwards, or the equalization is undone and the report says so.

Cost on the readers: a depthwise reader has per-channel weight scales, so dividing its channel
i by a_i is free; a dense reader quantizes each output row with one scale, so shrinking an
input column costs that column precision: a stream with a dense reader uses a_i **
dense_strength (0.5: the geometric middle, CLE's balance of the two ranges)."""
from __future__ import annotations

import torch

from lathe.compress.calibration import run_batches



def streams(units: dict, prod: dict, res: dict, fed: dict) -> list[tuple[list, list]]:
    """(writers, readers) of each activation tensor whose channels can be rescaled as one:
    writers are the units producing it (a unit adding another's output as its residual
    writes the same channels, so residual chains are one stream, e.g. a stage's residual
    stream of MBConv projections), readers the units taking it as their main input. Only
    streams that no unit outside reads and whose every writer has a reader."""
    root = {n: n for n in units}

    def find(n):
        while root[n] != n:
            root[n] = root[root[n]]
            n = root[n]
        return n
    for c, r in res.items():
        if r in units and c in units:
            root[find(c)] = find(r)
    groups = {}
    for n in units:
        groups.setdefault(find(n), []).append(n)
    out = []
    for writers in groups.values():
        ws = set(writers)
        readers = [c for c in units if prod.get(c) in ws]
        if readers and all(fed.get(w) and fed[w] <= ws | set(readers) for w in writers):
            out.append((writers, readers))
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
    run_batches(model, batches, hooks, {}, mode=torch.no_grad)
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
             max_gain: float = 64.0, through_relu6: bool = False, check=None) -> dict:
    """In place. units: {name: ConvBNAct}; prod/res/fed: conv_quant's trace. through_relu6:
    also streams written through ReLU6 (exact on the calibration ranges only). check: a batch
    whose fp32 logits must not change (default batches[0]). Returns the report."""
    ok = ("relu", "none", "relu6") if through_relu6 else ("relu", "none")
    ss = [(w, r) for w, r in streams(units, prod, res, fed) if all(units[n].act in ok for n in w)]
    if not ss:
        return {"streams": 0}
    check = check if check is not None else batches[0]
    with torch.no_grad():
        before = model(**check).double()
    touched = {n for w, r in ss for n in w + r}
    saved = {n: {k: v.clone() for k, v in units[n].state_dict().items()} for n in touched}
    rng = _channel_range(model, units, [n for w, _ in ss for n in w], batches)
    gains = []
    for writers, readers in ss:
        g = torch.stack([_gains(*rng[n], 6.0 if units[n].act == "relu6" else float("inf"))
                         for n in writers]).amin(0).clamp(1.0, max_gain)
        if not all(_depthwise(units[n]) for n in readers):
            g = g.pow(dense_strength)  # one a for the whole stream: the dense readers' compromise
        for n in writers:
            _scale_out(units[n], g)
        for n in readers:
            _scale_in(units[n], g)
        gains.append(float(g.max()))
    with torch.no_grad():
        after = model(**check).double()
    # the same logits up to float rounding: a relative error far above fp32's (a consumer the
    # trace did not see, or a ReLU6 channel clipping differently) undoes it
    err = float((after - before).norm() / before.norm().clamp(min=1e-30))
    if not err <= 1e-4:
        for n, sd in saved.items():
            units[n].load_state_dict(sd)
        return {"streams": 0, "undone": f"changed the fp32 logits by {err:.2e} (relative)"}
    return {"streams": len(gains), "max_gain": max(gains, default=1.0), "fp32_rel_change": err}
