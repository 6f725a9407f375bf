"""FSDP for distillation (`distill.fsdp: true` under torchrun): the student's parameters,
gradients and optimizer state are sharded over the ranks (PyTorch's FSDP2, `fully_shard`), so
a student that does not fit one device trains across several.

Each transformer block is one FSDP unit (its weights are gathered for its forward and
backward, then freed), and the root holds the rest (embeddings, final norm, head). Gradients
are averaged over ranks by the reduce-scatter, as DDP's all-reduce does, so the loop's loss
scaling is the same for both.

The teacher is sharded the same way (frozen; its forward gathers one block at a time), so
neither model has to fit on one device.

The training runs on a sharded copy of the model (fully_shard changes the modules in place
and has no inverse); at the end every rank gathers the full weights back into the caller's
plain model, which the later recipe steps (quantization) and the single writer use.

Checkpoints hold FULL state dicts (gathered on every rank, written by rank 0), keyed by
parameter name, so a run resumes on any number of ranks.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lathe.compress import distributed as dist


def _api():
    from torch.distributed.checkpoint import state_dict as sd

    return sd


def shard(model: nn.Module, blocks_of, device: torch.device) -> nn.Module:
    """A sharded copy of `model`, each rank's shard on `device`; blocks_of(m) gives m's
    transformer layers (the FSDP units). The copy is made where `model` is (the CPU, typically)
    and fully_shard moves only the rank's shard to the device, so the whole model never has to
    fit on one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world(),))
    copied = copy.deepcopy(model)
    for block in blocks_of(copied):
        fully_shard(block, mesh=mesh)
    fully_shard(copied, mesh=mesh)
    return copied


def model_state(model: nn.Module) -> dict:
    """Full (unsharded) state dict on CPU; for a sharded model every rank must call it."""
    sd = _api()
    opts = sd.StateDictOptions(full_state_dict=True)
    return {k: v.detach().cpu() for k, v in sd.get_model_state_dict(model, options=opts).items()}


def optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (collective for a sharded model)."""
    sd = _api()
    return sd.get_optimizer_state_dict(model, opt, options=sd.StateDictOptions(full_state_dict=True))


def load(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load full state dicts (as model_state / optim_state wrote them) into a plain or sharded
    model and its optimizer; every rank passes the same full dicts."""
    sd = _api()
    opts = sd.StateDictOptions(full_state_dict=True)
    sd.set_model_state_dict(model, model_sd, options=opts)
    sd.set_optimizer_state_dict(model, opt, optim_sd, options=opts)


__all__ = ["shard", "model_state", "optim_state", "load"]
