"""The calibration driver: runs batches through a model and feeds the input of chosen modules
to observers (lathe.compress.calibration.observers: update(x, where), all_reduce()). The one
place that selects real tokens: an observer with `real_tokens` sees only the rows the batch's
attention_mask marks real (padding never enters a statistic). The layer-by-layer driver of
GPTQ/AWQ/low-bit methods (lathe.compress.weight_only.run_layerwise) streams with the same
selection. Ctrl-C stops cleanly between batches."""
from __future__ import annotations

import torch

from lathe.errors import BadInput


def token_mask(batch):
    """The batch's attention_mask as bool [B, S], or None."""
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if m is None else m.bool()


def real_tokens(x: torch.Tensor, mask) -> torch.Tensor:
    """x [..., K] -> [T, K]: padding tokens dropped when the mask fits x's leading dims."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def observe(model, observers: dict, batches, progress=None) -> dict:
    """Feed the input of each module named in `observers` ({name: [observer, ...]}) to its
    observers, batch by batch (a list of dicts of model inputs). Observers with `real_tokens`
    see only the rows the batch's attention_mask marks real."""
    if not batches:
        raise BadInput("the calibration set is empty: give --calib FILE with at least one line")
    modules = dict(model.named_modules())
    state = {}

    def hook(n):
        def pre(mod, args):
            real = None
            for o in observers[n]:
                if getattr(o, "real_tokens", False):
                    real = real_tokens(args[0], state.get("mask")) if real is None else real
                    o.update(real, n)
                else:
                    o.update(args[0], n)
        return pre

    run_batches(model, batches, [modules[n].register_forward_pre_hook(hook(n)) for n in observers],
                state, progress)
    return observers


def run_batches(model, batches, hooks, state: dict, progress=None, mode=torch.inference_mode):
    """Run every batch through `model` under `mode`, with state["mask"] the batch's real-token
    mask for the hooks to select with; the hooks (handles) are removed at the end, also on error."""
    try:
        with mode():
            for i, b in enumerate(batches):
                state["mask"] = token_mask(b)
                model(**b)
                if progress:
                    progress(i + 1, len(batches))
    finally:
        for h in hooks:
            h.remove()
