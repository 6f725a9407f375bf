"""Weight-only quantization handlers (int4 RTN/GPTQ/AWQ, int8 weight-only) and the FP8
simulation handler, registered for their configs; layer-by-layer calibration; a per-layer
sensitivity report.

Layer-by-layer calibration (GPTQ and AWQ): when the model exposes its blocks
(`model.encoder.layer` for BERT, `model.model.layers` for Llama-style decoders, ...; see
lathe.models.base.BLOCK_PATHS), the inputs of block 0 are captured once per calibration batch, then blocks are
processed one at a time: inside a block the Linear groups are quantized in order, each from
statistics of its input computed with the earlier groups already quantized (the block is run
on the captured inputs and stopped at the group's first Linear), and the quantized block's
outputs become the next block's inputs (as in the GPTQ reference implementation). Only one
block's inputs are held at a time; the statistics themselves (X^T X, mean |x|) are streamed.
Linears outside the blocks, and models without blocks, are calibrated with whole-model
passes (stopped at the Linear). Padding tokens (attention_mask == 0) are left out of every
statistic when the input is [batch, seq, features] and the batch has an attention_mask.
"""
from __future__ import annotations

import fnmatch
import logging
import resource
import time

import torch
import torch.nn as nn

from lathe.compress.awq import TokenSample, awq_clip, awq_search
from lathe.compress.calibration import ChannelSum, real_tokens, token_mask
from lathe.compress.config import Fp8Config, Int4Config, Int8WeightOnlyConfig, register_handler
from lathe.compress.formats import Int4Group, check_finite, sqnr_db
from lathe.compress.graph import groups as _groups, set_module as _set_module
from lathe.compress.gptq import HessianAccumulator, gptq_quantize
from lathe.compress.modules import QLinearFP8, QLinearW4A16, QLinearW8A16
from lathe.errors import BadInput
from lathe.models.base import BLOCK_PATHS, adapter_of  # noqa: F401  (BLOCK_PATHS re-exported)

log = logging.getLogger("lathe.compress")

AWQ_SAMPLE_TOKENS = 1024  # tokens of each group's input kept for AWQ's loss (the rest streams)


# ----------------------------------------------------------------------------- helpers


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def select_linears(model: nn.Module, skip: list, group_size: int | None):
    """(groups, skipped): groups are lists of Linear names reading the same input (the model's
    linear_groups(), else one a Linear); skipped lists "name: reason". Raises BadInput naming
    the layer when a weight to be quantized holds NaN/Inf."""
    modules = dict(model.named_modules())
    groups, skipped = [], []
    for _, names in _groups(model):
        keep = []
        for n in names:
            m = modules.get(n)
            if m is None:
                why = "not found in the model (renamed or fused by an earlier step?)"
            elif not isinstance(m, nn.Linear):
                why = f"{type(m).__name__} is not an nn.Linear"
            elif any(fnmatch.fnmatch(n, p) for p in skip):
                why = "skip list"
            elif group_size and m.in_features % group_size:
                why = f"in_features {m.in_features} is not a multiple of group_size {group_size}"
            else:
                check_finite(f"weight of {n}", m.weight)
                keep.append(n)
                continue
            log.info("skipping %s: %s", n, why)
            skipped.append(f"{n}: {why}")
        if keep:
            groups.append(keep)
    return groups, skipped


def _need_calib(calib, what: str):
    if calib is None:
        raise BadInput(f"{what} needs calibration data (calib=...: a list of input batches)")
    if len(calib) == 0:
        raise BadInput(f"the calibration set for {what} is empty: give at least one batch "
                       "(--calib FILE with at least one line)")


_token_mask, _tokens = token_mask, real_tokens  # the driver's one padding selection


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    for k in ("logits", "last_hidden_state"):
        if hasattr(out, k):
            return getattr(out, k)
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the statistic it needs is taken."""


def find_blocks(model: nn.Module):
    """(path, ModuleList) of the model's repeated blocks (its adapter's), or None."""
    a = adapter_of(model)
    blocks = a.blocks()
    return (a.blocks_path, blocks) if blocks is not None and len(blocks) > 0 else None


def _block_index(name: str, path: str):
    pre = path + "."
    if not name.startswith(pre):
        return None
    head = name[len(pre):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


# ----------------------------------------------------------------------------- layerwise driver


def run_layerwise(model: nn.Module, groups: list, calib: list, process, progress=None) -> str:
    """Calls process(names, stream) for each group in order; stream(fn) runs the calibration
    data through the (partly quantized) model and calls fn(x [T, K]) with the input of the
    group's first Linear, batch by batch. Returns a description of the mode used."""
    masks = [_token_mask(b) for b in calib]
    state = {"mask": None}
    total, done = len(groups), [0]

    def make_stream(name, run_all):
        def stream(fn):
            def pre(mod, args):
                fn(_tokens(args[0].detach(), state["mask"]))
                raise _Stop

            h = model.get_submodule(name).register_forward_pre_hook(pre)
            try:
                run_all()
            finally:
                h.remove()
        return stream

    def run_model():
        for j, b in enumerate(calib):
            state["mask"] = masks[j]
            try:
                model(**b)
            except _Stop:
                pass

    def step(names, run_all):
        process(names, make_stream(names[0], run_all))
        done[0] += 1
        if progress:
            progress(done[0], total)

    found = find_blocks(model)
    staged, rest = {}, []
    for names in groups:
        i = _block_index(names[0], found[0]) if found else None
        (staged.setdefault(i, []) if i is not None else rest).append(names)

    modes = []
    with torch.no_grad():
        inputs = _capture_block_inputs(model, found[1][0], calib) if found and staged else None
        if inputs is not None:
            path, blocks = found
            last = max(staged)
            for i in range(last + 1):
                block = blocks[i]

                def run_block(block=block):
                    for j, (a, kw) in enumerate(inputs):
                        state["mask"] = masks[j]
                        try:
                            block(*a, **kw)
                        except _Stop:
                            pass

                for names in staged.get(i, []):
                    step(names, run_block)
                if i < last:
                    inputs = [_next_inputs(a, kw, _first(block(*a, **kw))) for a, kw in inputs]
            inputs = None
            modes.append(f"layer by layer over {path} (blocks 0..{last} of {len(blocks)})")
        else:
            rest = [n for i in sorted(staged) for n in staged[i]] + rest
        for names in rest:
            step(names, run_model)
        if rest:
            modes.append(f"whole-model passes for {len(rest)} group(s)")
    return ", then ".join(modes) or "nothing to calibrate"


def _capture_block_inputs(model, block, calib):
    """(args, kwargs) of block 0 for each batch; None when the block does not run once a batch."""
    got = []

    def pre(mod, args, kwargs):
        got.append((tuple(args), dict(kwargs)))
        raise _Stop

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in calib:
            n = len(got)
            try:
                model(**b)
            except _Stop:
                pass
            if len(got) != n + 1:
                return None
    finally:
        h.remove()
    return got


def _next_inputs(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kw = dict(kwargs)
    key = "hidden_states" if "hidden_states" in kw else next(
        k for k, v in kw.items() if isinstance(v, torch.Tensor))
    kw[key] = hidden
    return args, kw


# ----------------------------------------------------------------------------- int4


def _int4_group(model, names, cfg: Int4Config, fmt: Int4Group, stream, details, n_batches) -> dict:
    """Quantize one group of Linears (sharing an input); returns {name: new module}."""
    lins = {n: model.get_submodule(n) for n in names}
    new = {}
    if cfg.algo == "rtn":
        for n, lin in lins.items():
            new[n] = QLinearW4A16.from_linear(lin, n, fmt.group_size, fmt.symmetric)
        return new
    K = lins[names[0]].in_features
    if cfg.algo == "gptq":
        acc = HessianAccumulator(K)
        stream(acc.update)
        for n, lin in lins.items():
            if acc.n == 0:
                details[n] = {"note": "no calibration token reached this layer: RTN"}
                new[n] = QLinearW4A16.from_linear(lin, n, fmt.group_size, fmt.symmetric)
                continue
            Q, s, z, info = gptq_quantize(lin.weight, acc.H, fmt, cfg.damp, cfg.act_order)
            details[n] = {"tokens": acc.n, **{k: round(v, 6) if isinstance(v, float) else v
                                              for k, v in info.items()}}
            new[n] = QLinearW4A16.from_linear(lin, n, fmt.group_size, fmt.symmetric,
                                              weight=Q, scales=s, zeros=z)
        return new
    # awq
    stats, sample = ChannelSum(K, power=1), TokenSample(AWQ_SAMPLE_TOKENS, n_batches)

    def both(x):
        stats.update(x)
        sample.update(x)

    stream(both)
    stats.all_reduce()  # under torchrun: every rank's share of the calibration tokens
    X = sample.tensor(K)
    if stats.n == 0:
        for n, lin in lins.items():
            details[n] = {"note": "no calibration token reached this layer: RTN"}
            new[n] = QLinearW4A16.from_linear(lin, n, fmt.group_size, fmt.symmetric)
        return new
    s, info = awq_search([lins[n].weight for n in names], stats.mean, X, fmt, cfg.awq_grid)
    for n, lin in lins.items():
        details[n] = {"tokens": stats.n, "alpha": info["alpha"],
                      "loss": float(f"{info['loss']:.6g}"), "loss_rtn": float(f"{info['loss_rtn']:.6g}")}
        w = lin.weight
        if cfg.awq_clip:
            wc, cinfo = awq_clip(w.detach().float() * s[None, :], X / s, fmt)
            w = wc / s[None, :]
            details[n] |= cinfo
        new[n] = QLinearW4A16.from_linear(lin, n, fmt.group_size, fmt.symmetric, weight=w, smooth=s)
    return new


def _standin(q: QLinearW4A16) -> nn.Linear:
    """An fp32 nn.Linear computing what q computes: x @ (dequant(W) * smooth)^T + bias."""
    w = q.dequantize()
    if q.smooth is not None:
        w = w * q.smooth[None, :]
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    return lin.requires_grad_(False)


@register_handler(Int4Config)
def _int4(model, cfg: Int4Config, calib, progress, ctx=None):
    t0, rss0 = time.perf_counter(), _rss_mb()
    fmt = Int4Group(cfg.group_size, cfg.symmetric)
    groups, skipped = select_linears(model, cfg.skip, cfg.group_size)
    details, done, final = {}, [], {}
    calibrating = cfg.algo != "rtn"

    def process(names, stream):
        for n, m in _int4_group(model, names, cfg, fmt, stream, details, len(calib or ())).items():
            # While calibrating the later layers, a quantized layer runs as a plain Linear with
            # its dequantized weight (the same math as the reference op, without dequantizing
            # on every call); the QLinearW4A16 modules go in at the end.
            _set_module(model, n, _standin(m) if calibrating else m)
            final[n] = m
            done.append(n)

    if cfg.algo == "rtn":
        mode = "none (round to nearest)"
        with torch.no_grad():
            for i, names in enumerate(groups):
                process(names, None)
                if progress:
                    progress(i + 1, len(groups))
    else:
        _need_calib(calib, f"int4 with algo {cfg.algo}")
        mode = run_layerwise(model, groups, calib, process, progress)
        for n, m in final.items():
            _set_module(model, n, m)
    report = {"method": "int4", "algo": cfg.algo, "group_size": cfg.group_size,
              "symmetric": cfg.symmetric, "format": fmt.name, "quantized": done,
              "skipped": skipped, "calibration": mode,
              "seconds": round(time.perf_counter() - t0, 2),
              "peak_rss_mb": _rss_mb(), "peak_rss_mb_before": rss0}
    if cfg.algo == "gptq":
        report |= {"act_order": cfg.act_order, "damp": cfg.damp,
                   "act_order_groups": "static, original column order (no g_idx)" if cfg.act_order else None}
    if cfg.algo == "awq":
        report |= {"awq_grid": cfg.awq_grid, "awq_clip": cfg.awq_clip,
                   "smooth": "explicit per-input-channel multiplier"}
    if details:
        report["layers"] = details
    return report


# ----------------------------------------------------------------------------- int8 weight-only, fp8


def _rtn_handler(method: str, make):
    def handler(model, cfg, calib, progress, ctx=None):
        t0 = time.perf_counter()
        groups, skipped = select_linears(model, cfg.skip, getattr(cfg, "group_size", None))
        done = []
        with torch.no_grad():
            for i, names in enumerate(groups):
                for n in names:
                    _set_module(model, n, make(model.get_submodule(n), n, cfg))
                    done.append(n)
                if progress:
                    progress(i + 1, len(groups))
        return {"method": method, "quantized": done, "skipped": skipped,
                "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": _rss_mb()}
    return handler


def _make_w8a16(lin, n, cfg):
    return QLinearW8A16.from_linear(lin, n, cfg.group_size)


def _make_fp8(lin, n, cfg):
    return QLinearFP8.from_linear(lin, n, cfg.granularity, cfg.act_granularity)


register_handler(Int8WeightOnlyConfig)(_rtn_handler("int8-weight-only", _make_w8a16))
register_handler(Fp8Config)(_rtn_handler("fp8", _make_fp8))


# ----------------------------------------------------------------------------- sensitivity


def sensitivity(model: nn.Module, calib: list, config, max_batches: int = 4) -> list:
    """[(layer name, SQNR dB)]: the SQNR of the model's output (fp32 model as reference) when
    only that layer is quantized as `config` says (GPTQ/AWQ calibrated on the fp32 model's
    inputs of that layer), in model order. Uses the first `max_batches` batches of calib (and
    all of calib for GPTQ/AWQ statistics); the model is left unchanged."""
    if not isinstance(config, (Int4Config, Int8WeightOnlyConfig, Fp8Config)):
        raise BadInput(f"sensitivity supports int4, int8-weight-only and fp8 configs, "
                       f"not {type(config).__name__}")
    _need_calib(calib, "sensitivity")
    batches = list(calib)[:max_batches]
    masks = [_token_mask(b) for b in batches]
    group_size = getattr(config, "group_size", None)
    groups, _ = select_linears(model, config.skip, group_size)
    calibrated = isinstance(config, Int4Config) and config.algo != "rtn"
    fmt = Int4Group(config.group_size, config.symmetric) if isinstance(config, Int4Config) else None
    was_training = model.training
    model.eval()

    def outputs():
        return torch.cat([_tokens(_first(model(**b)).float(), m) for b, m in zip(batches, masks)])

    out = []
    try:
        with torch.no_grad():
            ref = outputs()
            for names in groups:
                if isinstance(config, Int4Config):
                    stream = None
                    if calibrated:
                        stream = _whole_model_stream(model, names[0], calib)
                    new = _int4_group(model, names, config, fmt, stream, {}, len(calib))
                else:
                    make = _make_w8a16 if isinstance(config, Int8WeightOnlyConfig) else _make_fp8
                    new = {n: make(model.get_submodule(n), n, config) for n in names}
                for n in names:
                    orig = model.get_submodule(n)
                    _set_module(model, n, new[n])
                    try:
                        out.append((n, sqnr_db(ref, outputs())))
                    finally:
                        _set_module(model, n, orig)
    finally:
        model.train(was_training)
    return out


def _whole_model_stream(model, name, calib):
    masks = [_token_mask(b) for b in calib]

    def stream(fn):
        state = {}

        def pre(mod, args):
            fn(_tokens(args[0].detach(), state["mask"]))
            raise _Stop

        h = model.get_submodule(name).register_forward_pre_hook(pre)
        try:
            for b, m in zip(calib, masks):
                state["mask"] = m
                try:
                    model(**b)
                except _Stop:
                    pass
        finally:
            h.remove()
    return stream


__all__ = ["select_linears", "run_layerwise", "find_blocks", "sensitivity", "BLOCK_PATHS"]
