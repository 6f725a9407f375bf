"""Building blocks the CNN adapters share: a convolution with its BatchNorm and activation
(the unit lathe's int8 conv kernel replaces, BN folded, activation fused) and TF "same"
padding (EfficientNet's weights were trained with it: asymmetric for stride 2)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTS = ("none", "relu", "relu6")


def same_pad(size: int, k: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding along one axis: (before, after), the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_geometry(h: int, w: int, k: int, stride: int, padding) -> tuple[int, int, int, int]:
    """(pad_top, pad_left, out_h, out_w) for padding "same" (TF) or a symmetric int."""
    if padding == "same":
        (pt, pb), (pl, pr) = same_pad(h, k, stride), same_pad(w, k, stride)
    else:
        pt = pb = pl = pr = int(padding)
    return pt, pl, (h + pt + pb - k) // stride + 1, (w + pl + pr - k) // stride + 1


def activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    return y


class ConvBNAct(nn.Module):
    """y = act(bn(conv(x)) + residual). groups = channels: depthwise. padding "same" or int."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: str = "relu6", padding="same", bn_eps: float = 1e-3):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"unknown activation {act!r}; expected one of {ACTS}")
        self.k, self.stride, self.padding, self.act = k, stride, padding, act
        self.conv = nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps)

    def forward(self, x, residual=None):
        H, W = x.shape[-2:]
        pt, pl, oh, ow = conv_geometry(H, W, self.k, self.stride, self.padding)
        pb = (oh - 1) * self.stride + self.k - H - pt
        pr = (ow - 1) * self.stride + self.k - W - pl
        if pt or pl or pb > 0 or pr > 0:
            x = F.pad(x, (pl, max(pr, 0), pt, max(pb, 0)))
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return activate(y, self.act)


class MaxPool(nn.Module):
    """Max pooling that also takes lathe's int8 activations (QAct): max commutes with the
    monotonic u8 quantization, so it runs on the codes (padding never wins: -inf for floats,
    and codes >= 0 after ReLU's zero point 0)."""

    def __init__(self, k: int, stride: int, padding: int):
        super().__init__()
        self.k, self.stride, self.padding = k, stride, padding

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return F.max_pool2d(x, self.k, self.stride, self.padding)
        if hasattr(x, "g"):  # lathe.export.vision's symbolic activation: one ONNX MaxPool node
            return x.g.maxpool(x, self.k, self.stride, self.padding)
        from dataclasses import replace
        if x.zp != 0:  # a zero-padded border would beat negative values
            raise ValueError("int8 max pooling needs activations with zero point 0 (after ReLU)")
        # contiguous NCHW: torch 2.13 rejects a uint8 channels_last view here
        q = F.max_pool2d(x.q.permute(0, 3, 1, 2).contiguous(), self.k, self.stride, self.padding)
        return replace(x, q=q.permute(0, 2, 3, 1).contiguous())
