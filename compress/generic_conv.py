"""nn.Conv2d on the generic transformers path (int8 recipe): each Conv2d that lathe's int8 conv
kernel runs becomes QConv2dInt8 (lathe.compress.qconv), with the BatchNorm2d that reads its
output folded in; transformers keeps running everything else (activations, pooling, residual
adds, TF-style padding). Each converted conv takes fp32 NCHW in and gives fp32 out: its input
is quantized on entry with a static per-tensor u8 (scale, zero point) calibrated on the
recipe's batches (min/max). lathe's CNN families go further (activation fused, int8 kept
between convs); here the model's own code sits between the convs, so that is not known.

Only where Conv2d layers hold most of the Linear + Conv2d weights (a CNN, not a transformer's
patch embedding); undone, and named in the report, if the model's output on a calibration
batch breaks with them (model code that reads a conv's .weight.dtype, as ViT's does).
Which BatchNorm2d folds into which conv is traced on one calibration batch (the BN whose input
is the conv's output tensor), not read from module names. Convs the kernel cannot run (grouped
but not depthwise, dilated, non-square) stay fp32 and are listed in the report."""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from lathe.compress.calibration import MinMaxObserver, observe, run_batches
from lathe.compress.modules import register_module
from lathe.compress.qconv import QConv2dInt8, affine_params
from lathe.errors import BadInput


class _Pair(int):
    """An int that also unpacks as (v, v), as nn.Conv2d's stride / kernel_size do: lathe's conv
    module keeps ints, model code such as MobileNetV2's TF padding unpacks them."""

    def __iter__(self):
        return iter((int(self), int(self)))

    def __getitem__(self, i):
        return (int(self), int(self))[i]

    def __len__(self):
        return 2


class HFConv2dInt8(QConv2dInt8):
    """QConv2dInt8 in a transformers model: nn.Conv2d's attributes for the model's own code,
    and under torch.export (ONNX) the same math in quantize/dequantize ops (QuantizeLinear /
    DequantizeLinear around an fp32 Conv; lathe's kernel is not traceable)."""

    dilation = (1, 1)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.stride, self.kernel_size = _Pair(self.stride), _Pair(self.kernel_size)
        # the bias as a (frozen) parameter: a CNN whose every weight is quantized would have
        # none left, and transformers' model.device (from_pretrained reads it) needs one
        bias = self._buffers.pop("bias")
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x, residual=None):
        if torch.compiler.is_exporting() and residual is None and isinstance(x, torch.Tensor):
            return self._qdq(x)
        return super().forward(x, residual)

    def _qdq(self, x):
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (quantized_decomposed ops)
        from torch.nn import functional as F

        from lathe.models.convnet import activate

        qd = torch.ops.quantized_decomposed
        xq = qd.quantize_per_tensor(x, self.in_scale, self.in_zp, 0, 255, torch.uint8)
        xd = qd.dequantize_per_tensor(xq, self.in_scale, self.in_zp, 0, 255, torch.uint8)
        w = qd.dequantize_per_channel(self.weight.permute(0, 3, 1, 2).contiguous(), self.weight_scale,
                                      torch.zeros_like(self.weight_scale, dtype=torch.int64), 0, -127, 127,
                                      torch.int8)
        y = F.conv2d(xd, w, self.bias, int(self.stride), int(self.padding), 1, self.groups)
        return activate(y, self.act)


class FoldedNorm(nn.Identity):
    """Where a BatchNorm2d was: folded into the QConv2dInt8 that feeds it (no tensors)."""

    def manifest_args(self) -> dict:
        return {}


register_module(HFConv2dInt8)
register_module(FoldedNorm)


def _padding(conv: nn.Conv2d):
    """The symmetric int padding QConv2dInt8 takes, or None (from_float then names the problem)."""
    p = conv.padding
    if conv.padding_mode != "zeros" or not isinstance(p, str) and p[0] != p[1]:
        return None
    if p == "valid":
        return 0
    if p == "same" and conv.stride == (1, 1) and conv.kernel_size[0] % 2 == 1:
        return conv.kernel_size[0] // 2
    return None if isinstance(p, str) else p[0]


def _trace(model, convs, batch) -> dict:
    """{conv name: name of the BatchNorm2d whose input is that conv's output}."""
    out_of, folds = {}, {}
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def post(name):
        def h(mod, args, out):
            out_of[id(out)] = (name, out)  # kept alive: no later tensor reuses the id
        return h

    def pre(name):
        def h(mod, args):
            hit = out_of.get(id(args[0]))
            if hit is not None and hit[1] is args[0] and mod.num_features == hit[1].shape[1]:
                folds.setdefault(hit[0], name)
        return h

    run_batches(model, [batch], [m.register_forward_hook(post(n)) for n, m in convs]
                + [m.register_forward_pre_hook(pre(n)) for n, m in norms], {})
    return folds


def quantize_convs(model: nn.Module, batches: list, skip=()) -> dict:
    """In place. batches: calibration inputs (model(**batch)). Returns the report."""
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not any(fnmatch.fnmatch(n, p) for p in skip)]
    if not convs:
        return {"convs": 0}
    share = _conv_share(model)
    if share < 0.5:  # a transformer's patch embedding: small, and its model may read .weight.dtype
        return {"convs": 0, "note": f"Conv2d layers hold {share:.0%} of the Linear + Conv2d weights: left fp32"}
    if not batches:
        raise BadInput("int8 for Conv2d layers needs calibration batches")
    if any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        raise BadInput("BatchNorm2d in training mode: put the model in eval() before quantizing")
    folds = _trace(model, convs, batches[0])
    obs = observe(model, {n: [MinMaxObserver(name=f"{n} input")] for n, _ in convs}, batches)
    mods = dict(model.named_modules())
    swapped, kept = {}, {}
    for n, conv in convs:
        bn = mods[folds[n]] if n in folds else None
        lo, hi = (float(v) for v in obs[n][0].min_max())
        try:
            swapped[n] = HFConv2dInt8.from_float(conv, bn, "none", in_qparams=affine_params(lo, hi),
                                                out_qparams=None, padding=_padding(conv), name=n)
        except BadInput as e:  # a shape the kernel does not run: fp32, and said so
            kept[n] = str(e)
    with torch.inference_mode():
        before = model(**batches[0])
    for n, q in swapped.items():
        _set(model, n, q)
        if n in folds:
            _set(model, folds[n], FoldedNorm())
    with torch.inference_mode():
        cos = _cosine(before, model(**batches[0]))
    if not cos >= 0.9:  # the model's own code broke on them (e.g. it casts its input to a conv's weight dtype)
        for n in swapped:
            _set(model, n, mods[n])
            if n in folds:
                _set(model, folds[n], mods[folds[n]])
        why = f"reverted: the model's output on a calibration batch fell to cosine {cos:.3f} with them"
        return {"convs": 0, "fp32_convs": {n: why for n in swapped} | kept}
    return {"convs": len(swapped), "batchnorm_folded": sum(n in folds for n in swapped),
            "fp32_convs": kept, "activations": "static per-tensor u8 input (minmax), fp32 output",
            "calibration_batch_cosine": cos}


def _conv_share(model) -> float:
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return conv / max(1, conv + lin)


def _cosine(a, b) -> float:
    a, b = (getattr(t, "logits", t) for t in (a, b))
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def _set(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
