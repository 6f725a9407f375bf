"""Small random CNN checkpoints built from transformers' config classes (nothing downloaded):
MobileNetV2 (depthwise convs, ReLU6, TF padding) and ResNet, 32x32 images, 10 labels.
BatchNorm statistics are randomised so that folding them is exercised (fresh BN is identity)."""
from __future__ import annotations

from pathlib import Path

import torch

CNNS = ("mobilenet_v2", "resnet", "resnet-generic")


def _model(name: str):
    import transformers as t

    if name == "mobilenet_v2":
        return t.MobileNetV2ForImageClassification(t.MobileNetV2Config(depth_multiplier=0.35, image_size=32,
                                                                       num_labels=10))
    # "resnet": what lathe's ResNet family builds; "resnet-generic": the stride in the
    # bottleneck's first 1x1 (downsample_in_bottleneck), which the family declines
    cfg = t.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], layer_type="bottleneck",
                         image_size=32, num_labels=10, downsample_in_bottleneck=name == "resnet-generic")
    return t.ResNetForImageClassification(cfg)


def write(name: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    m = _model(name).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.0)
                mod.bias.uniform_(-0.1, 0.1)
    m.save_pretrained(Path(out))
    return Path(out)


def images(path: Path, batch: int = 4, seed: int = 7) -> dict:
    """Inputs from the distribution lathe calibrates vision models on (lathe.models.generic)."""
    import json

    from lathe.models.generic import image_batches

    return image_batches(json.loads((Path(path) / "config.json").read_text()), batch, batch, seed=seed)[0]


def reference(path: Path, x: dict) -> torch.Tensor:
    from lathe.models.generic import reference_model

    with torch.no_grad():
        return reference_model(path)(**x).logits.float()
