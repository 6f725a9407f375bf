"""Static int8 for CNNs: calibrate every conv unit (conv + BN + activation, the adapter's
conv_units()) on images with lathe's observers, then swap each for QConv2dInt8 with BN folded,
the activation fused and int8 kept between units (a unit whose output only feeds other units
writes u8 codes; the others write fp32). Which unit feeds which is traced, not hard-coded.

The recipe's accuracy steps, each optional (the kernel format is the same with or without):
- equalize: range equalization between consecutive units (lathe.compress.conv_equalize),
  before calibration; fp32 outputs unchanged.
- gptq: weights rounded to minimise each unit's output error on the calibration inputs
  (lathe.compress.conv_gptq) instead of to nearest.
- bias_correction: the expected output shift of the rounded weights, from the calibration
  inputs' patch means, removed through the bias.
- float_first: the units that read the image stay fp32 (their input would be quantized per
  tensor over three differently scaled colour channels, and every later unit amplifies the
  error), as FloatConvAct (lathe.compress.fconv): BN folded, writing the u8 codes the next
  unit reads, on lathe's fp32-in, u8-out kernel (the first layer of the conv chain).
The input statistics of gptq / bias_correction come from the same pass as the activation
ranges."""
from __future__ import annotations

import torch
import torch.nn as nn

from lathe.compress.calibration import MinMaxObserver, make_observer
from lathe.compress.fconv import FloatConvAct
from lathe.compress.qconv import QConv2dInt8, affine_params
from lathe.errors import BadInput


def _trace(model, units, batch):
    """(producer of each unit's input, producer of its residual, units fed by each unit);
    producer "input" = the image, None = something that is not a conv unit."""
    made, prod, res, fed = {}, {}, {}, {n: set() for n, _ in units}
    hooks = []

    def pre(name):
        def h(mod, args, kwargs):
            x = args[0]
            r = kwargs.get("residual")
            prod[name] = made.get(x.data_ptr(), None)
            res[name] = None if r is None else made.get(r.data_ptr(), None)
            for p in (prod[name], res[name]):
                if p not in (None, "input"):
                    fed[p].add(name)
        return h

    def post(name):
        def h(mod, args, kwargs, out):
            made[out.data_ptr()] = name
        return h

    for n, m in units:
        hooks.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
        hooks.append(m.register_forward_hook(post(n), with_kwargs=True))
    from lathe.models.convnet import MaxPool

    def passthrough(mod, args, out):  # max pooling keeps its input's producer (and int8)
        made[out.data_ptr()] = made.get(args[0].data_ptr())
    hooks += [m.register_forward_hook(passthrough) for m in model.modules() if isinstance(m, MaxPool)]
    x = batch["pixel_values"]
    made[x.data_ptr()] = "input"
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return prod, res, fed


def _observe(model, units, batches, method, patches=None):
    """Per unit: observers of its input and output (after residual and activation); patches:
    {name: PatchStats} also fed the (padded) input of the unit's conv."""
    obs = {n: (MinMaxObserver(name=f"{n} input"), MinMaxObserver(name=n),
               make_observer(method, name=n) if method != "minmax" else None) for n, _ in units}
    hooks = []
    mods = dict(units)
    for n, st in (patches or {}).items():
        hooks.append(mods[n].conv.register_forward_pre_hook(lambda mod, a, st=st: st.update(a[0])))
    for n, m in units:
        def pre(mod, a, n=n):
            obs[n][0].update(a[0], n)  # returns None: a pre-hook's return value replaces the input
        hooks.append(m.register_forward_pre_hook(pre))

        def post(mod, a, out, n=n):
            obs[n][1].update(out, n)
            if obs[n][2] is not None:
                obs[n][2].update(out, n)
        hooks.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return obs


def _qparams(o):
    lo, hi = (float(v) for v in o[1].min_max())
    if o[2] is not None:  # a clipping observer narrows the range it saw
        a = float(o[2].amax())
        lo, hi = max(lo, -a), min(hi, a)
    return affine_params(lo, hi)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv with bn folded in, as QConv2dInt8.from_float folds them."""
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
    if bn is not None:
        k = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w, b = w * k[:, None, None, None], (b - bn.running_mean.float()) * k + bn.bias.detach().float()
    return w, b


def _set_weights(q: QConv2dInt8, w: torch.Tensor, b: torch.Tensor, st, gptq: bool, bias_correction: bool):
    """Replace q's RTN weights by GPTQ-rounded ones and/or correct its bias for the rounding."""
    from lathe.compress.conv_gptq import bias_shift, gptq_int8

    H, mean = st.finish()
    w2 = w.flatten(1)
    if gptq:
        codes, scale = gptq_int8(w2, H)
        q.weight.copy_(codes.reshape(w.shape).permute(0, 2, 3, 1))
        q.weight_scale.copy_(scale)
    wq = q.dequantized_weight().flatten(1)
    if bias_correction:
        q.bias.copy_(b - bias_shift(w2, wq, mean))
    q.prepare()


def quantize_convnet(model: nn.Module, batches: list, observer: str = "mse", skip=(), equalize: bool = True,
                     gptq: bool = True, bias_correction: bool = True, float_first: bool = True) -> dict:
    """In place. batches: [{"pixel_values": [B, 3, H, W]}]. Returns the report. The four flags:
    the module docstring."""
    import fnmatch

    from lathe.compress.conv_gptq import PatchStats

    if not hasattr(model, "conv_units"):
        raise BadInput(f"{type(model).__name__} has no conv_units(): not a CNN adapter")
    if not batches:
        raise BadInput("int8 for CNNs needs calibration images")
    all_units = model.conv_units()
    graph = _trace(model, all_units, batches[0])
    # the units reading the image, unless a quantized unit adds their output as its residual
    # (the kernel takes an int8 residual only)
    first = [n for n, _ in all_units if graph[0].get(n) == "input" and n not in graph[1].values()]
    units = [(n, m) for n, m in all_units if not any(fnmatch.fnmatch(n, p) for p in skip)]
    # observed like the others, swapped for FloatConvAct
    floats = {n for n, _ in units if n in first} if float_first else set()
    # a unit kept fp32 is not a producer of int8 inputs: trace the quantized ones alone
    prod, res, fed = graph if len(units) == len(all_units) else _trace(model, units, batches[0])
    report = {"method": "int8-static-conv", "observer": observer}
    if equalize:  # on every unit, fp32 ones too: it changes no output
        from lathe.compress.conv_equalize import equalize as equalize_
        report["equalize"] = equalize_(model, dict(all_units), *graph, batches)
    patches = {n: PatchStats(m.conv) for n, m in units if n not in floats} if (gptq or bias_correction) else None
    obs = _observe(model, units, batches, observer, patches)
    qp = {n: _qparams(obs[n]) for n, _ in units}
    in_qp = {n: affine_params(*(float(v) for v in obs[n][0].min_max())) for n, _ in units}
    swapped = {}
    for n, m in units:
        p = prod.get(n)
        src_qp = qp[p] if p in qp else in_qp[n]  # the image or an fp32 producer: its own range
        u8_out = bool(fed[n]) and all(prod.get(c) == n or res.get(c) == n for c in fed[n])
        r = res.get(n)
        if graph[1].get(n) is not None and r not in qp:
            raise BadInput(f"{n}: its residual does not come from an int8 conv unit")
        if n in floats:
            swapped[n] = FloatConvAct.from_unit(m, qp[n] if u8_out else None)
            continue
        swapped[n] = QConv2dInt8.from_float(m.conv, m.bn, m.act, in_qparams=src_qp,
                                            out_qparams=qp[n] if u8_out else None,
                                            res_qparams=qp[r] if r else (1.0, 0), padding=m.padding,
                                            name=n)
        if patches is not None:
            _set_weights(swapped[n], *fold_bn(m.conv, m.bn), patches[n], gptq, bias_correction)
    for n, q in swapped.items():
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    report.update({"units": len(swapped) - len(floats),
                   "int8_between_units": sum(q.out_scale > 0 for n, q in swapped.items() if n not in floats),
                   "fp32_units": [n for n, _ in all_units if n not in swapped or n in floats], "gptq": gptq,
                   "bias_correction": bias_correction})
    if getattr(model, "classifier", None) is not None and isinstance(model.classifier, nn.Linear):
        from lathe.compress.modules import QLinearW8A8
        model.classifier = QLinearW8A8.from_linear(model.classifier, "classifier")
        report["classifier"] = "QLinearW8A8 (per-token dynamic)"
    return report

