"""Model adapters: one small file a family, found by config.json's model_type."""
from __future__ import annotations

from lathe.errors import BadInput

FAMILIES = {"bert": "lathe.models.bert:BertEncoder",
            "llama": "lathe.models.llama:LlamaForCausalLM",
            "efficientnet-lite": "lathe.models.efficientnet:EfficientNetLite",
            "resnet": "lathe.models.resnet:ResNet"}
VISION = ("efficientnet-lite", "resnet")  # image models: pixel_values in, logits out


def model_class(config: dict):
    import importlib

    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise BadInput(f"unsupported model_type {mt!r} in config.json; lathe supports {sorted(FAMILIES)}")
    mod, _, cls = FAMILIES[mt].partition(":")
    return getattr(importlib.import_module(mod), cls)


def family_of(config: dict) -> str | None:
    """The lathe family that runs this config.json, or None: the generic transformers path
    (lathe.models.generic). A family may decline a variant it does not implement
    (its class's handles(config) is False, e.g. a ResNet with the stride in the first 1x1)."""
    mt = config.get("model_type")
    if mt not in FAMILIES:
        return None
    handles = getattr(model_class(config), "handles", None)
    return mt if handles is None or handles(config) else None


def tokenizer(model_dir):
    """model_dir's tokenizer.json (lathe.text.Tokenizer) with its family's TokenizerSettings:
    the adapter's `tokenizer` for lathe's families, the protocol's defaults for any other
    transformers model (and a directory without config.json)."""
    from pathlib import Path

    from lathe.models.base import ModelAdapter
    from lathe.source import read_json
    from lathe.text import Tokenizer

    cfg = Path(model_dir) / "config.json"
    config = read_json(cfg, "config.json") if cfg.is_file() else {}
    family = model_class(config) if family_of(config) is not None else ModelAdapter
    return Tokenizer(model_dir, getattr(family, "tokenizer", ModelAdapter.tokenizer))


def split_factored(model, groups):
    """linear_groups with low-rank Linears (modules with `factored`, two inner Linears `down`
    then `up`) expanded: `down` takes the group's input, `up` is a group of its own."""
    for owner, names in groups:
        first, extra = [], []
        for n in names:
            try:
                m = model.get_submodule(n)
            except AttributeError:
                m = None
            if getattr(m, "factored", False):
                first.append(f"{n}.down")
                extra.append((f"{n}.up", [f"{n}.up"]))
            else:
                first.append(n)
        yield owner, first
        yield from extra


def any_factored(*modules) -> bool:
    """True when one of the modules is low-rank factored (its weight cannot be concatenated)."""
    return any(getattr(m, "factored", False) for m in modules)
