"""Compression configs: dataclasses, validated on construction, serialisable to dicts (YAML
/JSON), each mapped by a registry to the handler that applies it (torchao's pattern)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from lathe.errors import BadInput


@dataclass
class Int8Config:
    """W8A8: int8 per-channel weights, per-token dynamic int8 activations (lathe's int8 kernel).
    smoothquant migrates activation outliers into the weights (alpha: migration strength)."""

    method: ClassVar[str] = "int8"
    smoothquant: bool = True
    alpha: float = 0.5
    act_symmetric: bool = False  # True: zero point 0 activations (what TensorRT QDQ accepts)
    fuse_act: bool = True
    fuse_qkv: bool = True  # one GEMM for query/key/value (exact; needs no layer skipped)
    skip: list = field(default_factory=list)  # fnmatch patterns of module names kept in fp32

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise BadInput(f"int8.alpha must be within [0, 1], got {self.alpha}")
        if not isinstance(self.skip, list):
            raise BadInput(f"int8.skip must be a list of name patterns, got {self.skip!r}")


CONFIGS: dict[str, type] = {c.method: c for c in (Int8Config,)}
HANDLERS: dict[type, Callable] = {}


def register_handler(config_type: type):
    def deco(fn):
        HANDLERS[config_type] = fn
        return fn
    return deco


def config_from_dict(d: dict, where: str = "step"):
    if not isinstance(d, dict) or "method" not in d:
        raise BadInput(f"{where}: each step needs a 'method' (one of {sorted(CONFIGS)})")
    method = d["method"]
    if method not in CONFIGS:
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
