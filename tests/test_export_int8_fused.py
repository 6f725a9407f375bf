"""The default int8 lowering for onnxruntime (int8_mode "fused"): lathe's per-token math in
com.microsoft.MatMulIntegerToFloat, the zero point carried by padded columns; and the graph
pass that keeps LayerNormalization out of onnxruntime's slow SkipLayerNormalization."""
import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import lathe
import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.compress.modules import QLinearW8A8
from lathe.errors import ValidationFailed
from lathe.export.validate import ort_session, validate_onnx
from testkit import One


def _truth(m, x):
    """fp64 result of the kernel's integer math: per-token u8 codes from the reference, exact
    integer dot products, scales applied in float64."""
    from lathe.kernels.reference import apply_act, quantize_rows_u8

    xs = x.float() * m.smooth if m.smooth is not None else x.float()
    q, s, zp = quantize_rows_u8(xs.reshape(-1, xs.shape[-1]), m.act_asym)
    acc = (q.double() - zp.double().reshape(-1, 1)) @ m.weight.double().t()
    y = acc * s.double().reshape(-1, 1) * m.weight_scale.double()
    if m.bias is not None:
        y = y + m.bias.double()
    return apply_act(y, m.act).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("opset", [18, 21])  # flattened rows / blocked QuantizeLinear in place
@pytest.mark.parametrize("asym,smooth,bias,act", [(True, True, True, "gelu"), (True, False, False, "none"),
                                                  (False, True, True, "none")])
def test_fused_linear_matches_the_kernels_math(tmp_path, asym, smooth, bias, act, opset):
    from lathe.export.onnx import export_model, zero_point_table

    torch.manual_seed(0)
    K, N = 33, 17
    lin = torch.nn.Linear(K, N, bias=bias)
    sm = torch.rand(K) + 0.5 if smooth else None
    model = One(QLinearW8A8.from_linear(lin, act=act, smooth=sm, act_asym=asym)).eval()
    J = zero_point_table(model)["lin.weight"]
    assert J == max(1, -(-int(model.lin.weight.int().sum(1).abs().max()) // 127))
    out = export_model(model, {"x": torch.randn(2, 3, K)}, tmp_path / "m.onnx", opset=opset, output_names=("y",))
    ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["MatMulIntegerToFloat"] == 1 and "MatMulInteger" not in ops
    sess = ort_session(out)
    for M in (1, 3, 17, 257):
        x = torch.randn(1, M, K) * 3 + 0.5  # off-centre, so the zero point matters
        x[0, 0] = 0.0  # an all-zero row
        got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).double()
        truth = _truth(model.lin, x)
        with torch.inference_mode():
            ref = model(x).double()  # lathe's kernel
        err, ref_err = (got - truth).abs().max(), (ref - truth).abs().max()
        assert err <= 2 * ref_err + 1e-5 * truth.abs().max(), (M, float(err), float(ref_err))
        assert torch.all(got[0, 0] == truth[0, 0].float().double()) or bias or act != "none"


def test_fused_is_the_default_exact_and_keeps_layernorm_fast(minilm_int8, tmp_path):
    import onnxruntime as ort

    out, rep = lathe.export_onnx(minilm_int8, tmp_path / "m.onnx")
    assert rep.passed and rep.precision == "int8" and rep.min_cos > 0.999
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 21  # rows quantized in place
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == 24 and ops["BiasGelu"] == 6
    assert ops["LayerNormalization"] == 13 and "SkipLayerNormalization" not in ops
    # a wrong zero-point column (the padded rows of one weight) is caught
    m = onnx.load(str(out))
    scale = next(i for i in m.graph.initializer if i.name.endswith("qkv.weight_scale"))
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ValidationFailed, match="min cosine"):
        validate_onnx(tmp_path / "bad.onnx", lathe.load(minilm_int8), minilm_int8, quantized=True)


def test_sum_pass_keeps_layernorm_unfused_and_exact(tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from lathe.export.ort_graph import keep_layernorm_unfused

    H = 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(H).astype(np.float32), n) for n in ("bias", "g", "b")]
    x, r = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["B", "S", H]) for n in ("x", "r"))
    g = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["xb"]), helper.make_node("Add", ["xb", "r"], ["s"]),
                           helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], epsilon=1e-12)],
                          "g", [x, r], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "S", H])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.from_proto(proto)
    assert keep_layernorm_unfused(model) == 1
    assert [n.op_type for n in model.graph] == ["Sum", "LayerNormalization"]
    assert len(next(iter(model.graph)).inputs) == 3  # x, bias, r in one pass
    feeds = {"x": rng.standard_normal((2, 3, H)).astype(np.float32), "r": rng.standard_normal((2, 3, H)).astype(np.float32)}
    outs = {}
    for name, p in (("before", proto), ("after", ir.to_proto(model))):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        sess = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs[name] = sess.run(None, feeds)[0]
        fused = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
        assert ("SkipLayerNormalization" in fused) == (name == "before")
    np.testing.assert_allclose(outs["after"], outs["before"], rtol=1e-5, atol=1e-5)
