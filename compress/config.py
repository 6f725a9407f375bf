"""Compression configs: dataclasses, validated on construction, serialisable to dicts (YAML
/JSON), each mapped by a registry to the handler that applies it (torchao's pattern)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from lathe.errors import BadInput


ACT_OBSERVERS = ("minmax", "percentile", "mse", "entropy")  # = lathe.compress.calibration.METHODS


def _default_alpha_grid():
    return [round(0.3 + 0.05 * i, 2) for i in range(11)]  # 0.3, 0.35, ..., 0.8


@dataclass
class Int8Config:
    """W8A8: int8 per-channel weights, per-token dynamic int8 activations (lathe's int8 kernel).
    smoothquant migrates activation outliers into the weights (alpha: migration strength).

    alpha_search (or alpha: "search"): pick alpha per linear group from alpha_grid, minimising
    the group's quantized output error on up to search_rows calibration tokens
    (lathe.compress.alpha_search); alpha is then unused. act_observer (minmax, percentile,
    mse, entropy; None: off): also calibrate a static per-tensor scale of each layer's
    smoothed input, recorded in the report (act_scales) for static-activation exports.

    CNNs (lathe.compress.conv_quant, static per-tensor activations) read act_observer (None:
    mse), skip and the conv_* fields: conv_gptq (error-aware weight rounding), conv_bias_correction
    (the rounding's mean output shift removed), conv_float_first (on by default: the units that
    read the image stay fp32 on lathe's fp32-in, u8-out kernel, at the speed of the int8 stem and
    with far better logits), conv_equalize (range equalization of the activations written without ReLU6, e.g.
    the MBConv residual streams: exact in fp32). The ablation: bench/results/efficientnet-lite0-quality.md."""

    method: ClassVar[str] = "int8"
    smoothquant: bool = True
    alpha: float = 0.5
    alpha_search: bool = False
    alpha_grid: list = field(default_factory=_default_alpha_grid)
    search_rows: int = 2048
    act_observer: str | None = None
    act_symmetric: bool = False  # True: zero point 0 activations (what TensorRT QDQ accepts)
    fuse_act: bool = True
    fuse_qkv: bool = True  # one GEMM for query/key/value (exact; needs no layer skipped)
    skip: list = field(default_factory=list)  # fnmatch patterns of module names kept in fp32
    conv_gptq: bool = True
    conv_bias_correction: bool = True
    conv_float_first: bool = True  # EfficientNet-Lite0: cos 0.9987 vs 0.9926 for the int8 stem, same speed
    conv_equalize: bool = True

    def __post_init__(self):
        for f in ("conv_gptq", "conv_bias_correction", "conv_float_first", "conv_equalize"):
            _check_bool("int8", f, getattr(self, f))
        if self.alpha == "search":
            self.alpha, self.alpha_search = 0.5, True
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0.0 <= float(self.alpha) <= 1.0:
            raise BadInput(f"int8.alpha must be within [0, 1] or \"search\", got {self.alpha!r}")
        _check_bool("int8", "alpha_search", self.alpha_search)
        g = self.alpha_grid
        if not isinstance(g, list) or not g or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in g):
            raise BadInput(f"int8.alpha_grid must be a non-empty list of numbers in [0, 1], got {g!r}")
        if self.alpha_search and not self.smoothquant:
            raise BadInput("int8.alpha_search needs smoothquant: true")
        if isinstance(self.search_rows, bool) or not isinstance(self.search_rows, int) \
                or not 16 <= self.search_rows <= 1 << 20:
            raise BadInput(f"int8.search_rows must be an integer in [16, 1048576], got {self.search_rows!r}")
        if self.act_observer is not None and self.act_observer not in ACT_OBSERVERS:
            raise BadInput(f"int8.act_observer must be null or one of {', '.join(ACT_OBSERVERS)}, "
                           f"got {self.act_observer!r}")
        _check_skip("int8", self.skip)


CONFIGS: dict[str, type] = {c.method: c for c in (Int8Config,)}
HANDLERS: dict[type, Callable] = {}


def register_handler(config_type: type):
    def deco(fn):
        HANDLERS[config_type] = fn
        return fn
    return deco


# Modules that define further configs and register them (and their handlers) on import. Loaded
# lazily so `import lathe.compress.config` stays light.
PLUGINS = ("lathe.compress.quantize", "lathe.compress.weight_only", "lathe.compress.prune",
           "lathe.compress.structured", "lathe.compress.lowrank", "lathe.compress.distill",
           "lathe.compress.channel_prune", "lathe.compress.qconv", "lathe.compress.generic_conv",
           "lathe.compress.fconv")


def ensure_registered():
    import importlib

    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the plugin: say so
                raise


def config_from_dict(d: dict, where: str = "step"):
    ensure_registered()
    if not isinstance(d, dict) or "method" not in d:
        raise BadInput(f"{where}: each step needs a 'method' (one of {sorted(CONFIGS)})")
    method = d["method"]
    if not isinstance(method, str) or method not in CONFIGS:
        raise BadInput(f"{where}: unknown method {method!r}; expected one of {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"method"})
    if unknown:
        raise BadInput(f"{where} ({method}): unknown field {unknown[0]!r}; expected one of {sorted(names)}")
    try:
        return cls(**{k: v for k, v in d.items() if k != "method"})
    except TypeError as e:
        raise BadInput(f"{where} ({method}): {e}") from None


def config_to_dict(cfg) -> dict:
    return {"method": cfg.method, **dataclasses.asdict(cfg)}


# ----------------------------------------------------------------------------- weight-only / fp8


def _check_skip(method: str, skip):
    if not isinstance(skip, list) or not all(isinstance(p, str) for p in skip):
        raise BadInput(f"{method}.skip must be a list of name patterns (fnmatch), got {skip!r}")


def _check_bool(method: str, name: str, v):
    if not isinstance(v, bool):
        raise BadInput(f"{method}.{name} must be true or false, got {v!r}")


@dataclass
class Int4Config:
    """W4A16: int4 weights in groups of `group_size` along K (lathe's Int4Group format), fp
    activations (torch.ops.lathe.linear_w4a16).

    algo: "rtn" (round to nearest, no calibration), "gptq" (Frantar et al.: Hessian-aware error
    compensation, layer by layer; act_order, damp), "awq" (Lin et al.: activation-aware
    per-input-channel scaling searched over awq_grid exponents, then, with awq_clip, a
    per-group weight clipping search as in the AWQ reference implementation).
    """

    method: ClassVar[str] = "int4"
    algo: str = "rtn"
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False  # gptq: solve columns by descending Hessian diagonal
    damp: float = 0.01  # gptq: dampening, a fraction of the mean Hessian diagonal
    awq_grid: int = 20  # awq: number of exponents alpha = i / awq_grid, i = 0 .. awq_grid - 1
    awq_clip: bool = True  # awq: also search each group's clipping range (AWQ's auto_clip)
    skip: list = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        if self.algo not in ("rtn", "gptq", "awq"):
            raise BadInput(f"int4.algo must be one of rtn, gptq, awq, got {self.algo!r}")
        if isinstance(self.group_size, bool) or self.group_size not in (32, 64, 128):
            raise BadInput(f"int4.group_size must be 32, 64 or 128, got {self.group_size!r}")
        _check_bool("int4", "symmetric", self.symmetric)
        _check_bool("int4", "act_order", self.act_order)
        if self.act_order and self.algo != "gptq":
            raise BadInput(f"int4.act_order applies to algo gptq only (algo is {self.algo!r})")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) \
                or not 0.0 < float(self.damp) <= 1.0:
            raise BadInput(f"int4.damp must be a number in (0, 1], got {self.damp!r}")
        self.damp = float(self.damp)
        if isinstance(self.awq_grid, bool) or not isinstance(self.awq_grid, int) \
                or not 1 <= self.awq_grid <= 1000:
            raise BadInput(f"int4.awq_grid must be an integer in [1, 1000], got {self.awq_grid!r}")
        _check_bool("int4", "awq_clip", self.awq_clip)
        _check_skip("int4", self.skip)


@dataclass
class Int8WeightOnlyConfig:
    """W8A16: symmetric int8 weights, one scale per output channel (group_size None) or per
    group of group_size along K; fp activations. Round to nearest, no calibration."""

    method: ClassVar[str] = "int8-weight-only"
    group_size: int | None = None
    skip: list = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 16):
            raise BadInput(f"int8-weight-only.group_size must be null (per channel) or a positive "
                           f"multiple of 16, got {g!r}")
        _check_skip("int8-weight-only", self.skip)


@dataclass
class Fp8Config:
    """FP8 E4M3 weights and dynamic FP8 activations (QLinearFP8). On CPU this is a simulation
    (quantize-dequantize in PyTorch) that measures accuracy; real FP8 matmuls need sm_89+.

    granularity: weight scales "per_channel" or "per_tensor"; act_granularity: activation
    scales "per_token" or "per_tensor" (both dynamic, no calibration)."""

    method: ClassVar[str] = "fp8"
    granularity: str = "per_channel"
    act_granularity: str = "per_token"
    skip: list = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        if self.granularity not in ("per_channel", "per_tensor"):
            raise BadInput(f"fp8.granularity must be per_channel or per_tensor, got {self.granularity!r}")
        if self.act_granularity not in ("per_token", "per_tensor"):
            raise BadInput(f"fp8.act_granularity must be per_token or per_tensor, got {self.act_granularity!r}")
        _check_skip("fp8", self.skip)


CONFIGS.update({c.method: c for c in (Int4Config, Int8WeightOnlyConfig, Fp8Config)})
