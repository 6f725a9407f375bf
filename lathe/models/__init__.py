"""Model adapters: one small file a family, found by config.json's model_type."""
from __future__ import annotations

from lathe.errors import BadInput

FAMILIES = {"bert": "lathe.models.bert:BertEncoder",
            "llama": "lathe.models.llama:LlamaForCausalLM"}


def model_class(config: dict):
    import importlib

    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise BadInput(f"unsupported model_type {mt!r} in config.json; lathe supports {sorted(FAMILIES)}")
    mod, _, cls = FAMILIES[mt].partition(":")
    return getattr(importlib.import_module(mod), cls)
