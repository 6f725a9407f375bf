"""The `modelopt` backend: NVIDIA ModelOpt calibrates (mtq.quantize with its own configs and
algorithms), lathe converts the result into its own modules and checkpoint format, so the
output runs on lathe's kernels.

Guarded: importing lathe never imports modelopt; using this backend without it installed is a
BadInput naming the extra to install. Supported recipe steps:

  int8 (Int8Config)          INT8_SMOOTHQUANT_CFG (smoothquant, the recipe's alpha) or
                             INT8_DEFAULT_CFG (smoothquant: false) -> QLinearW8A8. ModelOpt's
                             per-Linear pre_quant_scale becomes the module's smooth vector;
                             activations run lathe's per-token dynamic int8 (ModelOpt's static
                             per-tensor input amax is recorded in the report, not used).
  fp8  (Fp8Config)           FP8_DEFAULT_CFG (per-tensor weight and input amax) -> QLinearFP8
                             with a per-tensor weight scale and per-token dynamic activations.
  int4 algo awq (Int4Config) INT4_AWQ_CFG (awq_lite, symmetric blocks of group_size) ->
                             QLinearW4A16 (Int4Group symmetric: ModelOpt's code c in [-8, 7]
                             is lathe's code c + 8 with zero point 8), smooth = pre_quant_scale.

Every converted weight is checked against ModelOpt's own fake-quantized weight: lathe's
dequantized weight equals it within fp32 rounding, or the conversion fails.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.models.base import adapter_of

INSTALL_HINT = "pip install 'lathe[modelopt]'"


def import_mtq():
    """modelopt.torch.quantization, or a BadInput that says how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "transformers version not tested" notice
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise BadInput(f"--backend modelopt needs NVIDIA ModelOpt ({e.name} is missing): "
                       f"{INSTALL_HINT}") from None
    return mtq


def modelopt_version() -> str:
    import modelopt

    return getattr(modelopt, "__version__", "?")


# ----------------------------------------------------------------------------- configs


def mtq_config(mtq, step, model: nn.Module) -> tuple[dict, str]:
    """(ModelOpt config dict, its name) for one lathe recipe step. The step's skip patterns,
    and for int4 the Linears whose in_features is not a multiple of group_size (lathe keeps
    those in fp32 too), are disabled in the config so calibration sees what the output runs."""
    from lathe.compress.config import Fp8Config, Int4Config, Int8Config

    if isinstance(step, Int8Config):
        name = "INT8_SMOOTHQUANT_CFG" if step.smoothquant else "INT8_DEFAULT_CFG"
        cfg = copy.deepcopy(getattr(mtq, name))
        if step.smoothquant:
            cfg["algorithm"] = {"method": "smoothquant", "alpha": float(step.alpha)}
    elif isinstance(step, Fp8Config):
        name, cfg = "FP8_DEFAULT_CFG", copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    elif isinstance(step, Int4Config) and step.algo == "awq":
        name, cfg = "INT4_AWQ_CFG", copy.deepcopy(mtq.INT4_AWQ_CFG)
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"]["block_sizes"] = {-1: step.group_size, "type": "static"}
    else:
        what = getattr(step, "method", type(step).__name__)
        algo = f" algo {step.algo}" if isinstance(step, Int4Config) else ""
        raise BadInput(f"--backend modelopt runs the int8, fp8 and int4-awq recipes; this recipe's "
                       f"step is {what}{algo} (use --backend lathe)")
    off = [f"{p}.*" for p in step.skip]
    if isinstance(step, Int4Config):
        off += [f"{n}.*" for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and m.in_features % step.group_size]
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in off]
    return cfg, name


# ----------------------------------------------------------------------------- conversion


@torch.no_grad()
def _fake_quant_weight(qlin) -> torch.Tensor:
    """ModelOpt's own fake-quantized weight (the ground truth the lathe module must equal)."""
    return qlin.weight_quantizer(qlin.weight).detach().float()


def _check_same(name: str, ours: torch.Tensor, theirs: torch.Tensor):
    tol = 1e-6 * theirs.abs().amax().clamp(min=1e-30)
    if not torch.isfinite(ours).all() or (ours - theirs).abs().amax() > tol:
        raise RuntimeError(f"{name}: lathe's converted weight differs from ModelOpt's fake-quantized "
                           f"weight by {float((ours - theirs).abs().amax()):.3g} (unsupported "
                           f"ModelOpt quantizer setting?)")


def _smooth(qlin):
    pqs = qlin.input_quantizer.pre_quant_scale
    return None if pqs is None else pqs.detach().float().reshape(-1)


def _step(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    amax = amax.detach().float()
    return torch.where(amax > 1.0 / (1 << 24), amax / qmax, torch.ones_like(amax))


def _copy_common(m, qlin, smooth):
    if qlin.bias is not None:
        m.bias.copy_(qlin.bias.detach().float())
    if smooth is not None:
        m.smooth.copy_(smooth)


def to_w8a8(qlin, name: str = "linear", act: str = "none", act_asym: bool = True):
    """QLinearW8A8 from a ModelOpt int8 QuantLinear (per-channel weight amax)."""
    from lathe.compress.modules import QLinearW8A8

    fq = _fake_quant_weight(qlin)
    step = _step(qlin.weight_quantizer.amax.reshape(-1), 127.0)
    if step.numel() == 1:
        step = step.expand(fq.shape[0]).clone()
    codes = torch.round(fq / step[:, None]).clamp(-127, 127)
    smooth = _smooth(qlin)
    m = QLinearW8A8(qlin.in_features, qlin.out_features, qlin.bias is not None, act,
                    smooth is not None, act_asym)
    m.weight.copy_(codes.to(torch.int8))
    m.weight_scale.copy_(step)
    _copy_common(m, qlin, smooth)
    _check_same(name, m.format.dequantize(m.weight, m.weight_scale), fq)
    return m.prepare()


def to_fp8(qlin, name: str = "linear"):
    """QLinearFP8 from a ModelOpt FP8 QuantLinear (per-tensor or per-channel weight amax)."""
    from lathe.compress.formats import FP8_E4M3_MAX
    from lathe.compress.modules import QLinearFP8

    fq = _fake_quant_weight(qlin)
    step = _step(qlin.weight_quantizer.amax.reshape(-1), FP8_E4M3_MAX)
    gran = "per_tensor" if step.numel() == 1 else "per_channel"
    m = QLinearFP8(qlin.in_features, qlin.out_features, qlin.bias is not None, gran, "per_token")
    m.weight.copy_((fq / step.reshape(-1, 1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn))
    m.weight_scale.copy_(step)
    _copy_common(m, qlin, None)
    _check_same(name, m.format.dequantize(m.weight, m.weight_scale), fq)
    return m.prepare()


def to_w4a16(qlin, name: str = "linear", group_size: int = 128):
    """QLinearW4A16 (symmetric Int4Group, zero point 8) from a ModelOpt INT4 block QuantLinear."""
    from lathe.compress.modules import QLinearW4A16

    fq = _fake_quant_weight(qlin)
    N, K = fq.shape
    step = _step(qlin.weight_quantizer.amax, 7.0).reshape(N, K // group_size)
    smooth = _smooth(qlin)
    m = QLinearW4A16(K, N, qlin.bias is not None, group_size, True, smooth is not None)
    qw, s, z = m.format.quantize(fq, step, torch.full_like(step, 8.0))
    m.qweight.copy_(qw)
    m.scales.copy_(s)
    m.zeros.copy_(z)
    _copy_common(m, qlin, smooth)
    _check_same(name, m.dequantize(), fq)
    return m.prepare()


# ----------------------------------------------------------------------------- the run


def _forward_loop(batches, progress):
    def loop(model):
        with torch.no_grad():
            for i, b in enumerate(batches):
                model(**b)
                if progress:
                    progress(i + 1, len(batches))
    return loop


def _quantized_linears(qmodel):
    from modelopt.torch.quantization.utils import is_quantized_linear

    for n, m in qmodel.named_modules():
        if is_quantized_linear(m) and m.weight_quantizer.is_enabled:
            yield n, m


def _convert_w8a8(q, name, step, adapter):
    act = (step.fuse_act and adapter.fusable_act(name)) or "none"
    if act != "none":
        adapter.mark_act_fused(name)
    return to_w8a8(q, name, act, not step.act_symmetric)


# lathe format name -> converter (ModelOpt QuantLinear, name, recipe step, model adapter) -> module
CONVERTERS = {"int8_per_channel_sym": _convert_w8a8,
              "int4_group": lambda q, name, step, adapter: to_w4a16(q, name, step.group_size),
              "fp8_e4m3": lambda q, name, step, adapter: to_fp8(q, name)}
STEP_FORMAT = {"int8": "int8_per_channel_sym", "int4": "int4_group", "fp8": "fp8_e4m3"}  # recipe method -> format


def quantize_step(model: nn.Module, step, batches, progress=None, fresh=None) -> tuple[nn.Module, dict]:
    """Calibrate `model` (lathe's fp32 model; ModelOpt modifies it in place) with ModelOpt for
    one recipe step and return (a model holding lathe's quantized modules, the step report).
    fresh: an unmodified copy of the model to put the converted modules into (default: a
    deep copy taken before calibration)."""
    from lathe.compress.formats import check_finite
    from lathe.compress.graph import set_module as _set_module

    mtq = import_mtq()
    if not batches:
        raise BadInput("the calibration set is empty: give --calib FILE with at least one line")
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            check_finite(f"weight of {n}", m.weight)
    target = fresh if fresh is not None else copy.deepcopy(model)
    cfg, cfg_name = mtq_config(mtq, step, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, _forward_loop(batches, progress))
    done, input_amax = [], {}
    for n, q in _quantized_linears(model):
        if any(fnmatch.fnmatch(n, p) for p in step.skip):
            continue
        for what, t in (("pre_quant_scale", q.input_quantizer.pre_quant_scale),
                        ("weight amax", q.weight_quantizer.amax)):
            if t is not None and not torch.isfinite(t).all():
                raise BadInput(f"ModelOpt's calibration gave NaN/Inf {what} for {n}: the calibration "
                               "activations hold NaN/Inf")
        new = CONVERTERS[STEP_FORMAT[step.method]](q, n, step, adapter_of(target))
        if q.input_quantizer.is_enabled and q.input_quantizer.amax is not None:
            input_amax[n] = float(q.input_quantizer.amax.float().amax())
        _set_module(target, n, new)
        done.append(n)
    if not done:
        raise BadInput("ModelOpt quantized no Linear layer of this model (all skipped or unsupported)")
    skipped = [n for n, m in target.named_modules() if isinstance(m, nn.Linear)]
    report = {"method": step.method, "backend": "modelopt", "modelopt_version": modelopt_version(),
              "modelopt_config": cfg_name, "algorithm": cfg.get("algorithm"),
              "quantized": done, "skipped": [f"{n}: kept in fp32" for n in skipped], "transforms": []}
    if input_amax:
        report["modelopt_static_input_amax"] = input_amax
        report["activations"] = "lathe per-token dynamic (ModelOpt's static per-tensor amax recorded, unused)"
    return target, report


def run_recipe(source, recipe, batches, progress=None) -> tuple[nn.Module, dict]:
    """The modelopt backend of lathe.compress.pipeline.compress_checkpoint: one quantization step."""
    from lathe.compress.checkpoint import build_model

    import_mtq()
    if len(recipe.steps) != 1:
        raise BadInput(f"--backend modelopt runs one-step recipes (int8, fp8, int4-awq); "
                       f"{recipe.name} has {len(recipe.steps)} steps")
    model, fresh = build_model(source), build_model(source)
    model, report = quantize_step(model, recipe.steps[0], batches, progress, fresh)
    return model, {"backend": "modelopt", "modelopt_version": report["modelopt_version"],
                   "steps": [report]}
