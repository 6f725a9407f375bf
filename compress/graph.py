"""Model surgery shared by the compression methods: swap a submodule by name, and the groups
of Linear layers that read the same input (what SmoothQuant, AWQ and GPTQ calibrate together)."""
from __future__ import annotations

import torch.nn as nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def groups(model: nn.Module) -> list:
    """(input-owner, [linear names]) groups, the model adapter's; models without an adapter get
    one group a Linear."""
    from lathe.models.base import adapter_of

    return list(adapter_of(model).linear_groups())
