"""Static int8 for CNNs: calibrate every conv unit (conv + BN + activation, the adapter's
conv_units()) on images with lathe's observers, then swap each for QConv2dInt8 with BN folded,
the activation fused and int8 kept between units (a unit whose output only feeds other units
writes u8 codes; the others write fp32). Which unit feeds which is traced, not hard-coded."""
from __future__ import annotations

import torch
import torch.nn as nn

from lathe.compress.calibration import MinMaxObserver, make_observer
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


def _observe(model, units, batches, method):
    """Per unit: observers of its input and output (after residual and activation)."""
    obs = {n: (MinMaxObserver(name=f"{n} input"), MinMaxObserver(name=n),
               make_observer(method, name=n) if method != "minmax" else None) for n, _ in units}
    hooks = []
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


def quantize_convnet(model: nn.Module, batches: list, observer: str = "minmax", skip=()) -> dict:
    """In place. batches: [{"pixel_values": [B, 3, H, W]}]. Returns the report."""
    import fnmatch

    if not hasattr(model, "conv_units"):
        raise BadInput(f"{type(model).__name__} has no conv_units(): not a CNN adapter")
    if not batches:
        raise BadInput("int8 for CNNs needs calibration images")
    units = [(n, m) for n, m in model.conv_units() if not any(fnmatch.fnmatch(n, p) for p in skip)]
    prod, res, fed = _trace(model, units, batches[0])
    obs = _observe(model, units, batches, observer)
    qp = {n: _qparams(obs[n]) for n, _ in units}
    in_qp = {n: affine_params(*(float(v) for v in obs[n][0].min_max())) for n, _ in units}
    swapped = {}
    for n, m in units:
        p = prod.get(n)
        src_qp = qp[p] if p in qp else in_qp[n]  # the image or an fp32 producer: its own range
        u8_out = bool(fed[n]) and all(prod.get(c) == n or res.get(c) == n for c in fed[n])
        r = res.get(n)
        if r is not None and r not in qp:
            raise BadInput(f"{n}: its residual does not come from an int8 conv unit")
        swapped[n] = QConv2dInt8.from_float(m.conv, m.bn, m.act, in_qparams=src_qp,
                                            out_qparams=qp[n] if u8_out else None,
                                            res_qparams=qp[r] if r else (1.0, 0), padding=m.padding,
                                            name=n)
    for n, q in swapped.items():
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    report = {"method": "int8-static-conv", "observer": observer, "units": len(swapped),
              "int8_between_units": sum(q.out_scale > 0 for q in swapped.values())}
    if getattr(model, "classifier", None) is not None and isinstance(model.classifier, nn.Linear):
        from lathe.compress.modules import QLinearW8A8
        model.classifier = QLinearW8A8.from_linear(model.classifier, "classifier")
        report["classifier"] = "QLinearW8A8 (per-token dynamic)"
    return report

