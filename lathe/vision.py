"""Image models (CNNs): the compress flow and the quality measures (top-1 agreement and logits
cosine against the fp32 model on lathe's fixed image set)."""
from __future__ import annotations

from pathlib import Path

import torch

from lathe.errors import BadInput


def is_vision(source) -> bool:
    from lathe.models import VISION, family_of
    return family_of(source.config) in VISION


def benchable(source) -> bool:
    """An image classifier `lathe bench` times with images: a CNN family, or a transformers
    *ForImageClassification on the generic path (MobileNetV2, a ResNet variant, ...)."""
    if is_vision(source):
        return True
    from lathe.models.generic import hf_class, takes_pixels
    return takes_pixels(source.config) and hf_class(source.config).__name__.endswith("ForImageClassification")


def quality(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """top-1 agreement, mean / min cosine of the logits, NaN count."""
    cos = torch.nn.functional.cosine_similarity(ref_logits.double(), logits.double(), dim=-1)
    same = ref_logits.argmax(-1) == logits.argmax(-1)
    sure = ref_logits.softmax(-1).amax(-1) >= 0.5  # images fp32 classifies with p >= 0.5
    return {"top1_agreement": float(same.float().mean()),
            "top1_agreement_confident": float(same[sure].float().mean()) if sure.any() else None,
            "confident_images": int(sure.sum()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "images": int(ref_logits.shape[0]), "nan": int(torch.isnan(logits).any(-1).sum())}


def logits(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def image_size(source) -> int:
    return int(source.config.get("image_size", 224))


def compress(source, rec, out, progress=None, n_calib: int = 64) -> Path:
    """Run a recipe on a CNN: int8 (static per-tensor activations, per-channel weights) and
    channel pruning (prune-channels) are the steps it knows."""
    from lathe import images
    from lathe.compress.checkpoint import build_model, save

    model = build_model(source)
    size = image_size(source)
    calib = images.batches(images.image_set(n_calib, size, seed=1), 16)
    reports = []
    for step in rec.steps:
        method = getattr(step, "method", "?")
        if method == "int8":
            from lathe.compress.conv_quant import quantize_convnet
            reports.append(quantize_convnet(model, calib, getattr(step, "act_observer", None) or "mse",
                                            getattr(step, "skip", []), equalize=step.conv_equalize,
                                            gptq=step.conv_gptq, bias_correction=step.conv_bias_correction,
                                            float_first=step.conv_float_first))
        elif method == "prune-channels":
            from lathe.compress.channel_prune import prune_channels
            reports.append(prune_channels(model, step, calib, progress))
        else:
            raise BadInput(f"recipe step {method!r} is not supported for {source.model_type} "
                           "(CNNs take int8 and prune-channels)")
    save(model, source, out, rec.to_dict(), {"backend": "lathe", "steps": reports})
    return out
