"""transformers knows lathe's outputs: `quant_method: "lathe"` in config.json.

Importing this module registers a quantization config and an HfQuantizer under "lathe", so
`AutoModel*.from_pretrained(lathe_output)` builds the transformers model on the meta device,
swaps in the quantized modules the config lists (lathe.compress.modules, running on
torch.ops.lathe.*), and lets transformers read the packed tensors into them. `import lathe`
alone does not import transformers; `import lathe.integrations.transformers_quantizer` (or
lathe.load of such an output) registers it.

Without lathe, transformers 5 would skip an unknown quant_method and load the packed tensors
as if they were fp32 weights. lathe's writer therefore stores one small 1-D tensor of every
quantized output with a leading axis of 1 (`sentinel` in the config, e.g. a norm weight as
[1, H]); transformers then stops with its own size-mismatch error instead of returning a
model that computes garbage, and this quantizer gives the tensor its real shape back.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from lathe.integrations import quiet_torchao

with quiet_torchao():  # transformers' registry imports torchao when installed
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "lathe"


class LatheQuantConfig(QuantizationConfigMixin):
    """modules: {name: {class, args, format}} (lathe's manifest entries); transforms: the
    structural rewrites to replay first (e.g. normalize:Conv1D); sentinel: the tensor stored
    with an extra leading axis (see the module docstring)."""

    def __init__(self, modules=None, transforms=None, sentinel=None, recipe=None, format_version=1,
                 lathe_version=None, **kwargs):
        self.quant_method = METHOD
        self.modules = modules or {}
        self.transforms = list(transforms or [])
        self.sentinel = sentinel
        self.recipe = recipe
        self.format_version = format_version
        self.lathe_version = lathe_version

    def to_dict(self):
        return {"quant_method": METHOD, "format_version": self.format_version,
                "lathe_version": self.lathe_version, "recipe": self.recipe,
                "sentinel": self.sentinel, "transforms": self.transforms, "modules": self.modules}


class LatheHfQuantizer(HfQuantizer):
    requires_calibration = True  # lathe outputs are pre-quantized; quantizing on load is lathe's CLI

    def validate_environment(self, *args, **kwargs):
        import lathe.kernels  # noqa: F401  (the custom ops the modules call)

    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        qc = self.quantization_config.to_dict()
        replay(model, qc, meta=True)
        quant = tuple(n + "." for n in qc["modules"])
        # a quantized lm_head no longer shares the embedding's tensor
        tied = getattr(model, "all_tied_weights_keys", None)
        if tied:
            model.all_tied_weights_keys = {k: v for k, v in tied.items() if not k.startswith(quant)}
        # transformers initialises what the checkpoint lacks through the model's _init_weights,
        # which reads `.weight` of the Linears it knows; lathe's modules are all loaded
        for m in model.modules():  # each PreTrainedModel inside (GPT2Model in GPT2LMHeadModel) too
            if hasattr(m, "_init_weights"):
                m._init_weights = _skip_lathe(m._init_weights)

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish(model, self.quantization_config.to_dict())
        return model

    def is_serializable(self):
        return False  # lathe writes its outputs (lathe.compress.checkpoint.save), not save_pretrained

    @property
    def is_trainable(self):
        return False


def _skip_lathe(init):
    def init_weights(module):
        if not any(type(c).__name__ in _QUANT_NAMES for c in (module, *module.children())):
            init(module)
    return init_weights


def _quant_names():
    from lathe.compress.config import ensure_registered
    from lathe.compress.modules import QUANT_MODULES
    ensure_registered()
    return set(QUANT_MODULES)


# lathe's fast adapters fuse q/k/v into one module (transform fuse_qkv); transformers' attention
# reads three, so the fused module is loaded as it is stored and split by rows afterwards (exact:
# every quantized format here is per output row)
FUSED = {"qkv": ("query", "key", "value"), "qkv_proj": ("q_proj", "k_proj", "v_proj")}


def replay(model: nn.Module, qc: dict, meta: bool = True):
    """On the (meta) model: the recorded transforms, then the quantized modules, then the
    sentinel's stored shape. Returns nothing; remembers fused modules to split in finish()."""
    from lathe.compress.modules import module_class
    from lathe.errors import BadInput
    from lathe.models.generic import apply_transform

    for t in qc.get("transforms") or []:
        if t != "fuse_qkv":  # undone by the split below
            apply_transform(model, t)
    splits = []
    for name, entry in (qc.get("modules") or {}).items():
        qcls = module_class(entry.get("class"), "quantization_config")
        parent, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            owner = None
        parts = FUSED.get(leaf, ())
        if owner is not None and not hasattr(owner, leaf) and parts and all(hasattr(owner, p) for p in parts):
            splits.append((parent, leaf, parts, [getattr(owner, p).out_features for p in parts]))
            for p in parts:  # their tensors are in the fused one: not "missing"
                delattr(owner, p)
        elif owner is None or not hasattr(owner, leaf):
            raise BadInput(f"quantization_config names module {name!r} that {type(model).__name__} lacks")
        args = dict(entry["args"])
        if args.get("act") not in (None, "none"):
            args["act"] = "none"  # lathe's adapter fused the activation; transformers applies it itself
        with torch.device("meta") if meta else torch.device("cpu"):
            setattr(owner, leaf, qcls(**args))
    model._lathe_splits = splits
    s = qc.get("sentinel")
    if s:
        owner, leaf = _owner(model, s)
        p = getattr(owner, leaf)
        setattr(owner, leaf, nn.Parameter(torch.empty((1, *p.shape), device="meta"), requires_grad=False))


def split_rows(m: nn.Module, sizes: list) -> list:
    """A quantized module cut into modules of `sizes` output rows (per-row tensors sliced,
    per-input ones such as SmoothQuant's vector shared)."""
    out, start = [], 0
    for n in sizes:
        part = type(m)(**{**m.manifest_args(), "out_features": n})
        for bname, b in m.named_buffers(recurse=False):
            if b is None or bname.startswith("_") or bname not in dict(part.named_buffers(recurse=False)):
                continue
            rows = bname != "smooth" and b.dim() >= 1 and b.shape[0] == m.out_features
            setattr(part, bname, b[start:start + n].clone() if rows else b.clone())
        out.append(part)
        start += n
    return out


def finish(model: nn.Module, qc: dict):
    """After the weights are read: fused modules split, the sentinel back to its shape, the
    kernels' packed layouts."""
    for parent, leaf, parts, sizes in getattr(model, "_lathe_splits", []):
        owner = model.get_submodule(parent) if parent else model
        for p, mod in zip(parts, split_rows(getattr(owner, leaf), sizes)):
            setattr(owner, p, mod)
        delattr(owner, leaf)
    model._lathe_splits = []
    s = qc.get("sentinel")
    if s:
        owner, leaf = _owner(model, s)
        p = getattr(owner, leaf)
        setattr(owner, leaf, nn.Parameter(p.data.reshape(p.shape[1:]), requires_grad=p.requires_grad))
    for m in model.modules():
        if hasattr(m, "prepare") and hasattr(m, "manifest_args"):
            m.prepare()


def _owner(model, name):
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


_QUANT_NAMES = _quant_names()
if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(METHOD)(LatheQuantConfig)
if METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(METHOD)(LatheHfQuantizer)
