"""ONNX for CNNs. fp32: torch.onnx.export (dynamo) with a dynamic batch. int8: the graph is
written from lathe's quantized model itself (a symbolic pass through the adapter's forward:
each QConv2dInt8 emits its nodes), so the ONNX computes lathe's quantization:

- target onnxruntime: QDQ with lathe's own u8 (scale, zero point) per activation and int8
  per-channel weights: DequantizeLinear -> Conv (+ Add residual) -> Relu/Clip ->
  QuantizeLinear, which onnxruntime fuses into QLinearConv; validated against lathe's
  PyTorch int8 (top-1 agreement and logits cosine, exit 3 below the bar).
- target tensorrt: what TensorRT's explicit quantization accepts: symmetric int8 Q/DQ (zero
  point 0) on every conv input, scale = max|range| / 127 of the same calibration, symmetric
  per-channel weights (axis 0); fp32 between the Q/DQ pairs (TensorRT fuses them). This
  symmetric activation quantization differs from lathe's u8 one, so it is validated with a
  looser bar, and linted by lathe.export.trt_lint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lathe.errors import BadInput, ValidationFailed

# minimum (top-1 agreement, mean logits cosine) against lathe's PyTorch int8 model. onnxruntime's
# QLinearConv requantizes with a fixed-point multiplier, not lathe's fp32 one: codes differ by
# one here and there, which flips near-tie top-1 classes (the greyscale texture samples):
# measured 0.875 agreement at mean cosine 0.9993 on 16 images.
BARS = {"onnxruntime": (0.80, 0.995), "tensorrt": (0.70, 0.97)}


def export_fp32(model, out: Path, size: int = 224, opset: int = 18) -> Path:
    import contextlib
    import io

    from torch.export import Dim

    from lathe.io import atomic_file

    x = torch.zeros(2, 3, size, size)
    with atomic_file(Path(out)) as tmp, torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (x,), str(tmp), dynamo=True, opset_version=opset,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes={"pixel_values": {0: Dim("batch", min=1, max=1024)}},
                          external_data=False)
    return Path(out)


class _Sym:
    """A symbolic activation: an ONNX tensor name, its channels and spatial size, and how it is
    quantized (u8 codes with scale/zp, or fp32)."""

    def __init__(self, g, name, C, H, W, q=None):
        self.g, self.name, self.C, self.H, self.W, self.q = g, name, C, H, W, q

    def dim(self):
        return 4

    @property
    def shape(self):
        return (0, self.C, self.H, self.W)


class _Graph:
    def __init__(self, target: str):
        from onnx import helper
        self.h, self.target = helper, target
        self.nodes, self.inits, self.n = [], [], 0

    def uid(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, arr, p):
        from onnx import numpy_helper
        name = self.uid(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, ins, p, **attrs):
        out = self.uid(p)
        self.nodes.append(self.h.make_node(op, ins, [out], name=out, **attrs))
        return out

    def dq(self, x: _Sym) -> str:
        """fp32 view of an activation."""
        if x.q is None:
            return x.name
        s, z, dt = x.q
        return self.node("DequantizeLinear", [x.name, self.const(np.float32(s), "s"),
                                              self.const(np.array(z, dtype=dt), "z")], "dq")

    def quant(self, t: str, scale, zp, dt) -> str:
        return self.node("QuantizeLinear", [t, self.const(np.float32(scale), "s"),
                                            self.const(np.array(zp, dtype=dt), "z")], "q")

    def act(self, y: str, act: str) -> str:
        if act == "relu":
            return self.node("Relu", [y], "relu")
        if act == "relu6":
            return self.node("Clip", [y, self.const(np.float32(0), "lo"), self.const(np.float32(6), "hi")], "relu6")
        return y

    def conv_input(self, x: _Sym, m) -> str:
        """The fp32 tensor the Conv reads."""
        if self.target == "onnxruntime":
            if x.q is None:  # the image: quantized with the module's input parameters
                x = _Sym(self, self.quant(x.name, m.in_scale, m.in_zp, np.uint8), x.C, x.H, x.W,
                         (m.in_scale, m.in_zp, np.uint8))
            return self.dq(x)
        # tensorrt: symmetric int8 Q/DQ on the fp32 input, amax from lathe's u8 range
        lo, hi = (0 - m.in_zp) * m.in_scale, (255 - m.in_zp) * m.in_scale
        s = max(abs(lo), abs(hi)) / 127.0
        return self.node("DequantizeLinear", [self.quant(x.name, s, 0, np.int8), self.const(np.float32(s), "s"),
                                              self.const(np.int8(0), "z")], "dq")

    def maxpool(self, x: _Sym, k: int, s: int, p: int) -> _Sym:
        """Max pooling on the u8 codes (max commutes with the monotonic quantization) or fp32."""
        y = self.node("MaxPool", [x.name], "maxpool", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
        return _Sym(self, y, x.C, (x.H + 2 * p - k) // s + 1, (x.W + 2 * p - k) // s + 1, x.q)

    def conv(self, m, x: _Sym, residual=None) -> _Sym:
        from lathe.models.convnet import conv_geometry

        pt, pl, OH, OW = conv_geometry(x.H, x.W, m.kernel_size, m.stride, m.padding)
        k, s = m.kernel_size, m.stride
        pb, pr = (OH - 1) * s + k - x.H - pt, (OW - 1) * s + k - x.W - pl
        wq = m.weight.permute(0, 3, 1, 2).contiguous().numpy()  # OIHW int8
        w = self.node("DequantizeLinear", [self.const(wq, "w"), self.const(m.weight_scale.numpy().astype(np.float32), "ws"),
                                           self.const(np.zeros(wq.shape[0], np.int8), "wz")], "wdq", axis=0)
        xin = self.conv_input(x, m)
        y = self.node("Conv", [xin, w, self.const(m.bias.numpy().astype(np.float32), "b")], "conv",
                      kernel_shape=[k, k], strides=[s, s], pads=[pt, pl, max(pb, 0), max(pr, 0)],
                      group=m.groups)
        if residual is not None:
            y = self.node("Add", [y, self.dq(residual)], "add")
        y = self.act(y, m.act)
        if self.target == "onnxruntime" and m.out_scale > 0:
            return _Sym(self, self.quant(y, m.out_scale, m.out_zp, np.uint8), m.out_channels, OH, OW,
                        (m.out_scale, m.out_zp, np.uint8))
        return _Sym(self, y, m.out_channels, OH, OW)

    def float_conv(self, m, x: _Sym, residual=None) -> _Sym:
        """A unit kept fp32: FloatConvAct (BN folded, u8 or fp32 out) or a ConvBNAct the recipe
        skipped (BN folded here, fp32 out)."""
        from lathe.compress.conv_quant import fold_bn
        from lathe.compress.fconv import FloatConvAct
        from lathe.models.convnet import conv_geometry

        if isinstance(m, FloatConvAct):
            k, s, groups, C = m.kernel_size, m.stride, m.groups, m.out_channels
            w, b = m.weight, m.bias
        else:
            k, s, groups, C = m.k, m.stride, m.conv.groups, m.conv.out_channels
            w, b = fold_bn(m.conv, m.bn)
        pt, pl, OH, OW = conv_geometry(x.H, x.W, k, s, m.padding)
        pb, pr = (OH - 1) * s + k - x.H - pt, (OW - 1) * s + k - x.W - pl
        y = self.node("Conv", [self.dq(x), self.const(w.detach().numpy().astype(np.float32), "w"),
                               self.const(b.detach().numpy().astype(np.float32), "b")], "conv",
                      kernel_shape=[k, k], strides=[s, s], pads=[pt, pl, max(pb, 0), max(pr, 0)],
                      group=groups)
        if residual is not None:
            y = self.node("Add", [y, self.dq(residual)], "add")
        y = self.act(y, m.act)
        if self.target == "onnxruntime" and getattr(m, "out_scale", 0) > 0:
            return _Sym(self, self.quant(y, m.out_scale, m.out_zp, np.uint8), C, OH, OW,
                        (m.out_scale, m.out_zp, np.uint8))
        return _Sym(self, y, C, OH, OW)


def export_int8(model, out: Path, target: str = "onnxruntime", size: int = 224, opset: int = 18) -> Path:
    """model: a lathe int8 CNN (QConv2dInt8 units, QLinearW8A8 or nn.Linear classifier)."""
    import onnx
    from onnx import TensorProto, helper

    from lathe.compress import qconv
    from lathe.io import atomic_file
    from lathe.compress.formats import Int8PerChannel, format_of

    g = _Graph(target)
    x = _Sym(g, "pixel_values", 3, size, size)
    from lathe.models.convnet import ConvBNAct

    prev = qconv.GRAPH_HOOK
    from lathe.compress.fconv import FloatConvAct

    qconv.GRAPH_HOOK = lambda m, a, res: g.float_conv(m, a, res) if isinstance(m, FloatConvAct) else g.conv(m, a, res)
    floats = [m for m in model.modules() if isinstance(m, ConvBNAct)]  # units a recipe's skip kept
    for m in floats:
        m.forward = lambda a, residual=None, m=m: g.float_conv(m, a, residual)
    try:
        h = model.features(x)
    finally:
        qconv.GRAPH_HOOK = prev
        for m in floats:
            del m.forward  # back to the class's forward
    pooled = g.node("GlobalAveragePool", [g.dq(h)], "pool")
    flat = g.node("Flatten", [pooled], "flat", axis=1)
    cls = model.classifier
    if getattr(format_of(cls), "name", None) == Int8PerChannel.name:  # activations float (weight-only DQ)
        wq = cls.weight.numpy()
        w = g.node("DequantizeLinear", [g.const(wq, "fcw"), g.const(cls.weight_scale.numpy(), "fcs"),
                                        g.const(np.zeros(wq.shape[0], np.int8), "fcz")], "fcdq", axis=0)
        b = cls.bias
    else:
        w, b = g.const(cls.weight.detach().numpy(), "fcw"), cls.bias
    y = g.node("Gemm", [flat, w, g.const(b.detach().numpy().astype(np.float32), "fcb")], "fc", transB=1)
    g.nodes.append(helper.make_node("Identity", [y], ["logits"], name="logits"))
    graph = helper.make_graph(
        g.nodes, "lathe_int8_cnn",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cls.out_features])], g.inits)
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lathe")
    onnx.checker.check_model(mp)
    with atomic_file(Path(out)) as tmp:
        onnx.save(mp, str(tmp))
    return Path(out)


def validate(path, model, target: str, images: torch.Tensor) -> dict:
    """ONNX on onnxruntime vs lathe's PyTorch int8 model; ValidationFailed (exit 3) below the bar."""
    from lathe import vision
    from lathe.export.validate import ort_session

    sess = ort_session(path)
    got = torch.cat([torch.from_numpy(sess.run(None, {"pixel_values": images[i:i + 16].numpy()})[0])
                     for i in range(0, len(images), 16)])
    ref = vision.logits(model, images, 16)
    q = vision.quality(ref, got)
    agree, cos = BARS[target]
    q.update(target=target, bar_top1=agree, bar_cosine=cos)
    if q["nan"] or q["top1_agreement"] < agree or q["cosine_mean"] < cos:
        raise ValidationFailed(f"{path}: onnxruntime vs lathe int8: top-1 agreement {q['top1_agreement']:.3f} "
                               f"(needs {agree}), mean cosine {q['cosine_mean']:.4f} (needs {cos})")
    return q


def export(src, out, target: str = "onnxruntime", validate_: bool = True, n_images: int = 32):
    """lathe export for CNN checkpoints: fp32 -> plain ONNX; lathe int8 -> QDQ (target)."""
    import lathe
    from lathe import images, vision
    from lathe.compress.qconv import QConv2dInt8
    from lathe.source import open_source

    source = open_source(src)
    model = lathe.load(source.path)
    size = vision.image_size(source)
    quantized = any(isinstance(m, QConv2dInt8) for m in model.modules())
    if not quantized and target == "tensorrt":
        raise BadInput(f"{src} is not quantized: compress it with --recipe int8 first for a TensorRT QDQ export")
    path = export_int8(model, out, target, size) if quantized else export_fp32(model, out, size)
    report = None
    if validate_:
        x = images.image_set(n_images, size, seed=2)
        if quantized:
            report = validate(path, model, target, x)
        else:
            from lathe.export.validate import ort_session
            got = torch.from_numpy(ort_session(path).run(None, {"pixel_values": x.numpy()})[0])
            report = vision.quality(vision.logits(model, x), got)
            if report["cosine_min"] < 0.9999:
                raise ValidationFailed(f"{path}: fp32 ONNX differs from PyTorch (min cosine {report['cosine_min']:.5f})")
    return path, report
