"""What the ONNX lowerings share: constants, onnxruntime contrib-op schemas, the epilogue, and
the model's buffers and per-module tables by every name the exporter gives a tensor."""
from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

_MSFT = Opset("com.microsoft", 1)
_ANY = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(uint8)", "tensor(int8)",
        "tensor(int32)", "tensor(int64)"]
FLOAT, INT32, UINT8 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.UINT8


def msft(name: str, inputs: int | list = 1, attrs: tuple = ()):
    """An onnxruntime contrib op (com.microsoft; target onnxruntime only). The onnx package has
    no schemas for them and the exporter needs one, so a minimal schema is made here:
    `inputs` names (a trailing "?" marks an optional one), INT attributes `attrs`."""
    from onnx.defs import OpSchema

    names = inputs if isinstance(inputs, list) else [f"X{i}" for i in range(inputs)]
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    params = [OpSchema.FormalParameter(n.rstrip("?"), f"T{i}", param_option=opt if n.endswith("?") else single)
              for i, n in enumerate(names)]
    schema = OpSchema(name, "com.microsoft", 1, inputs=params,
                      outputs=[OpSchema.FormalParameter("Y", "TY")],
                      type_constraints=[(f"T{i}", _ANY, "") for i in range(len(names))] + [("TY", _ANY, "")],
                      attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=False) for a in attrs])
    return Op(_MSFT, name, schema)


def const(v, dtype=torch.float32):
    return op.Constant(value=ir.tensor(torch.tensor(v, dtype=dtype)))


def tensor(a):
    """A constant from a numpy array or torch tensor (int4/uint4 numpy arrays included)."""
    return op.Constant(value=ir.tensor(a))


def _gelu(y):
    return op.Mul(op.Mul(y, const(0.5)), op.Add(const(1.0), op.Erf(op.Mul(y, const(0.7071067811865476)))))


def epilogue(y, bias, act: str = "none", ort: bool = False):
    """The kernel epilogue after dequantization: bias, then the fused activation. ort: GELU as
    onnxruntime's one-pass com.microsoft.Gelu instead of five elementwise ops."""
    if bias is not None:
        y = op.Add(y, bias)
    if act == "gelu":
        return msft("Gelu")(y) if ort else _gelu(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    return y


def names_of(fqn: str):
    """Every name the exporter gives the tensor `fqn`: `<fqn>` in the saved graph,
    `b_<fqn with . as _>` (buffers) or `p_...` (parameters) while tracing."""
    flat = fqn.replace(".", "_")
    return (fqn, flat, "b_" + flat, "p_" + flat)


def by_graph_name(table: dict | None) -> dict:
    """{fqn: value} answering to every graph name of each fqn (names_of)."""
    return {key: v for k, v in (table or {}).items() for key in names_of(k)}


class Buffers:
    """The model's buffers by every name the exporter gives them (the exporter passes the
    lowerings symbolic tensors only; the int4 ones read the packed weights)."""

    def __init__(self, model):
        self.table = by_graph_name(dict(model.named_buffers()))

    def __call__(self, sym) -> torch.Tensor:
        t = self.table.get(str(sym.name))
        if t is None:
            raise ValueError(f"no buffer named {sym.name} in the model being exported")
        return t.detach().cpu()
