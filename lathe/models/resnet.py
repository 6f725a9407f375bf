"""ResNet (basic and bottleneck blocks) built from a transformers ResNetConfig dict (model_type
"resnet"), on the shared conv units so lathe's int8 conv replaces every convolution with the
residual add and ReLU fused into the last conv of each block. Weights: a lathe checkpoint with
these names, a checkpoint transformers' ResNetForImageClassification saved (its names mapped
by from_hf_names), or random (`random_checkpoint`, for speed and coverage). Variants this
adapter does not build (stride in the bottleneck's first 1x1, no classifier head) decline
(handles) and run on the generic transformers path."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.models.convnet import ConvBNAct, MaxPool


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride, basic: bool):
        super().__init__()
        self.shortcut = ConvBNAct(cin, cout, 1, stride, act="none", padding=0, bn_eps=1e-5) \
            if cin != cout or stride != 1 else None
        if basic:
            self.convs = nn.ModuleList([ConvBNAct(cin, cout, 3, stride, act="relu", padding=1, bn_eps=1e-5),
                                        ConvBNAct(cout, cout, 3, 1, act="relu", padding=1, bn_eps=1e-5)])
        else:
            mid = cout // 4
            self.convs = nn.ModuleList([ConvBNAct(cin, mid, 1, act="relu", padding=0, bn_eps=1e-5),
                                        ConvBNAct(mid, mid, 3, stride, act="relu", padding=1, bn_eps=1e-5),
                                        ConvBNAct(mid, cout, 1, act="relu", padding=0, bn_eps=1e-5)])

    def forward(self, x):
        r = self.shortcut(x) if self.shortcut is not None else x
        h = x
        for c in self.convs[:-1]:
            h = c(h)
        return self.convs[-1](h, residual=r)  # relu(bn(conv) + shortcut)


class ResNet(nn.Module):
    is_decoder = False

    @staticmethod
    def handles(config: dict) -> bool:
        """False for what this adapter does not build: transformers' downsample_in_bottleneck
        (stride in the first 1x1) and a checkpoint without a classifier (ResNetModel)."""
        arch = config.get("architectures") or []
        return not config.get("downsample_in_bottleneck") and not (arch and "ResNetForImageClassification" not in arch)

    @staticmethod
    def from_hf_names(tensors: dict, config: dict) -> dict:
        """transformers' ResNetForImageClassification state-dict names -> this adapter's
        (stem / blocks.k.convs.l / blocks.k.shortcut, conv / bn; classifier.1 -> classifier).
        Names it does not know are kept, so check_tensors names them."""
        if any(k.startswith("stem.") for k in tensors):
            return tensors
        starts, k = [], 0
        for d in config.get("depths") or []:
            starts.append(k)
            k += int(d)
        out = {}
        for name, t in tensors.items():
            m = _HF_NAME.match(name)
            if name.startswith("classifier.1."):
                out["classifier." + name[len("classifier.1."):]] = t
            elif m and (m["stage"] is None or int(m["stage"]) < len(starts)):
                unit = "stem" if m["stage"] is None else f"blocks.{starts[int(m['stage'])] + int(m['layer'])}." + (
                    "shortcut" if m["conv"] is None else f"convs.{m['conv']}")
                out[f"{unit}.{'conv' if m['part'] == 'convolution' else 'bn'}.{m['rest']}"] = t
            else:
                out[name] = t
        return out

    def __init__(self, config: dict):
        super().__init__()
        try:
            emb, sizes, depths = int(config.get("embedding_size", 64)), list(config["hidden_sizes"]), list(config["depths"])
            basic = config.get("layer_type", "bottleneck") == "basic"
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"config.json is not a ResNet config: {e}") from None
        if len(sizes) != len(depths) or config.get("hidden_act", "relu") != "relu":
            raise BadInput("config.json: ResNet needs as many hidden_sizes as depths and hidden_act relu")
        self.config = dict(config)
        self.image_size = int(config.get("image_size", 224))
        self.stem = ConvBNAct(config.get("num_channels", 3), emb, 7, 2, act="relu", padding=3, bn_eps=1e-5)
        self.pool0 = MaxPool(3, 2, 1)
        blocks, cin = [], emb
        for i, (c, d) in enumerate(zip(sizes, depths)):
            for j in range(d):
                stride = 2 if j == 0 and (i > 0 or config.get("downsample_in_first_stage", False)) else 1
                blocks.append(Bottleneck(cin, c, stride, basic))
                cin = c
        self.blocks = nn.ModuleList(blocks)
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1000
        self.classifier = nn.Linear(cin, int(labels))

    def features(self, x):
        if isinstance(x, torch.Tensor) and (x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 32):
            raise BadInput(f"expected images [batch, 3, >=32, >=32], got shape {tuple(x.shape)}")
        x = self.pool0(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return x

    def pool(self, h):
        return h.mean((-2, -1))

    def forward(self, pixel_values):
        h = self.features(pixel_values)
        if not isinstance(h, torch.Tensor):
            h = h.dequantize()
        return self.classifier(self.pool(h))

    def conv_units(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, ConvBNAct)]

    def fusable_act(self) -> list[str]:
        return ["relu"]


_HF_NAME = re.compile(r"^(?:resnet\.)?(?:embedder\.embedder|encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<layer>\d+)"
                      r"\.(?:shortcut|layer\.(?P<conv>\d+)))\.(?P<part>convolution|normalization)\.(?P<rest>.+)$")


def random_checkpoint(config: dict, out, seed: int = 0):
    """A lathe checkpoint of `config` (a transformers ResNetConfig dict) with random weights
    and BatchNorm statistics that keep activations in a sane range."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from lathe.io import atomic_dir

    torch.manual_seed(seed)
    m = ResNet(config)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.2, 0.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(dict(config) | {"model_type": "resnet"}, indent=2))
    return out
