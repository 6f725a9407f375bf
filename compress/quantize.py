"""`quantize(model, config, calib=...)`: one verb, a config dataclass, a registered handler."""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from lathe.compress.alpha_search import search_alpha
from lathe.compress.calibration import (AbsMaxObserver, RowSample, Scaled, make_observer, observe,
                                       smoothquant_scales)
from lathe.compress.config import HANDLERS, Int8Config, register_handler
from lathe.compress.formats import check_finite, sqnr_db  # noqa: F401  (sqnr_db re-exported)
from lathe.compress.graph import groups as _groups, set_module as _set_module
from lathe.compress.modules import QLinearW8A8
from lathe.errors import BadInput
from lathe.models.base import adapter_of


def quantize(model: nn.Module, config, calib=None, progress=None, ctx=None) -> dict:
    """Apply `config` to `model` in place (quantize, prune, distill, low-rank: any registered
    step); returns a report of what was done.

    calib: a list of input dicts (model(**batch)) for methods that calibrate.
    ctx: a StepContext (lathe.compress.context) with what a recipe run shares between steps
    (the source, a teacher, a work folder); None outside a recipe.
    """
    from lathe.compress.config import ensure_registered

    ensure_registered()
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise BadInput(f"no handler for config type {type(config).__name__}")
    return handler(model, config, calib, progress, ctx)


def _smoothing(model, cfg: Int8Config, groups, modules, calib, progress):
    """SmoothQuant's s per Linear name (alpha fixed, or searched per group on a row sample),
    and the report entries that say what was chosen."""
    firsts = [names[0] for _, names in groups]
    obs = {n: [AbsMaxObserver()] + ([RowSample(cfg.search_rows)] if cfg.alpha_search else []) for n in firsts}
    observe(model, obs, calib, progress)
    smooth, alphas, errors, static = {}, {}, {}, {}
    for _, names in groups:
        amax = obs[names[0]][0].all_reduce().amax
        ws = [modules[n].weight for n in names]
        alpha = cfg.alpha
        if cfg.alpha_search:
            rows = obs[names[0]][1].rows
            x = rows if rows is not None else torch.zeros(0, ws[0].shape[1])
            alpha, err = search_alpha(x, amax, ws, cfg.alpha_grid, not cfg.act_symmetric)
            alphas[names[0]], errors[names[0]] = alpha, {"chosen": err[alpha], "at_0.5": err.get(0.5)}
        s = smoothquant_scales(amax, ws, alpha)
        a = float((amax.float() / s.float()).max())  # the smoothed input's max |x|: free here
        for n in names:
            smooth[n] = s
            static[n] = a / 127.0 if a > 0 else 1.0
    report = {"alphas": alphas, "search_error": errors} if cfg.alpha_search else {}
    # what a static-activation export (TensorRT QDQ) quantizes with, unless act_observer records its own
    return smooth, report | {"act_observer": "minmax", "act_scales": static}


def _static_act_scales(model, cfg: Int8Config, groups, smooth, calib) -> dict:
    """Per-tensor static scale (amax / 127, symmetric) of each group's smoothed input, by
    cfg.act_observer: what a static-activation (TensorRT QDQ) export quantizes with."""
    obs = {}
    for _, names in groups:
        o = make_observer(cfg.act_observer, name=names[0])
        s = smooth.get(names[0])
        obs[names[0]] = [Scaled(o, 1.0 / s) if s is not None else o]
    observe(model, obs, calib)
    out = {}
    for _, names in groups:
        o = obs[names[0]][0]
        a = float((o.obs if isinstance(o, Scaled) else o).reduce_().amax())
        for n in names:
            out[n] = a / 127.0 if a > 0 else 1.0
    return out


@register_handler(Int8Config)
def _int8(model, cfg: Int8Config, calib, progress, ctx=None):
    adapter = adapter_of(model)
    extra = {}
    if getattr(model, "lathe_generic", False) and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # any transformers model: its Conv2d layers first (the Linears then calibrate on them)
        from lathe.compress.generic_conv import quantize_convs
        extra["conv2d"] = quantize_convs(model, calib or [], cfg.skip)
    groups = _groups(model)
    modules = dict(model.named_modules())
    skipped, done = [], []
    smooth = {}
    for _, names in groups:  # before calibration: a bad weight is named, not seen as NaN later
        for n in names:
            if isinstance(modules[n], nn.Linear):
                check_finite(f"weight of {n}", modules[n].weight)
    if cfg.smoothquant or cfg.act_observer:
        if calib is None:
            raise BadInput("int8 with smoothquant or act_observer needs calibration data (calib=...; "
                           "or set smoothquant: false)")
    if cfg.smoothquant:
        smooth, sq = _smoothing(model, cfg, groups, modules, calib, progress)
        extra |= sq
    if cfg.act_observer:  # a second pass: the static scale is of the smoothed input
        extra |= {"act_observer": cfg.act_observer,
                  "act_scales": _static_act_scales(model, cfg, groups, smooth, calib)}
    for _, names in groups:
        for n in names:
            lin = modules[n]
            if not isinstance(lin, nn.Linear):
                skipped.append((n, f"{type(lin).__name__} is not an nn.Linear"))
                continue
            if any(fnmatch.fnmatch(n, p) for p in cfg.skip):
                skipped.append((n, "skip list"))
                continue
            act = (cfg.fuse_act and adapter.fusable_act(n)) or "none"
            if act != "none":
                adapter.mark_act_fused(n)
            _set_module(model, n, QLinearW8A8.from_linear(lin, n, act, smooth.get(n), not cfg.act_symmetric))
            done.append(n)
    transforms = []
    if cfg.fuse_qkv and hasattr(model, "transform") and not skipped:
        model.transform("fuse_qkv")
        transforms.append("fuse_qkv")
    return {"method": "int8", "quantized": done, "skipped": [f"{n}: {why}" for n, why in skipped],
            "transforms": transforms, **extra}
