"""TensorRT readiness lint (lathe.export.trt_lint) on small hand-built graphs, one per problem,
and on lathe's own exports: the onnxruntime int8 graph (MatMulInteger) is refused, the
tensorrt-target graph (symmetric static QDQ) is clean and validates on onnxruntime. Also the
opset-23 Attention lowering."""
import contextlib
import io
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from lathe.export.trt_lint import Findings, lint

F = T.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 9
    return m


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _find(findings, code, node):
    hits = [f for f in findings if f.code == code and f.node == node]
    assert hits, f"no {code} finding for {node}; got:\n{findings.summary()}"
    return hits[0]


def test_clean_graph_has_no_findings():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                helper.make_node("Add", ["h", "b"], ["a"], name="add"),
                helper.make_node("Relu", ["a"], ["y"], name="relu")],
               [_vi("x", F, [2, 4])], [_vi("y", F, [2, 3])], [w, b])
    out = lint(m)
    assert isinstance(out, Findings) and list(out) == []
    assert "0 error(s)" in out.summary()


def test_asymmetric_qdq_is_an_error_symmetric_is_not():
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp_bad = numpy_helper.from_array(np.array(3, np.int8), "zp_bad")
    zp_ok = numpy_helper.from_array(np.array(0, np.int8), "zp_ok")
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp_bad"], ["q"], name="q_asym"),
                helper.make_node("DequantizeLinear", ["q", "s", "zp_bad"], ["d"], name="dq_asym"),
                helper.make_node("QuantizeLinear", ["d", "s", "zp_ok"], ["q2"], name="q_sym"),
                helper.make_node("DequantizeLinear", ["q2", "s", "zp_ok"], ["y"], name="dq_sym")],
               [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])], [s, zp_bad, zp_ok])
    out = lint(m)
    f = _find(out, "asymmetric-qdq", "q_asym")
    assert f.severity == "error" and f.op_type == "QuantizeLinear" and "zero point" in f.message
    _find(out, "asymmetric-qdq", "dq_asym")
    assert not [x for x in out if x.node in ("q_sym", "dq_sym")]


def test_uint8_qdq_is_an_error():
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q_u8"),
                helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq_u8")],
               [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])], [s, zp])
    assert _find(lint(m), "qdq-uint8", "q_u8").severity == "error"


def test_matmul_integer_is_unsupported():
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    m = _model([helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="mmi")],
               [_vi("x", T.UINT8, [2, 4])], [_vi("y", T.INT32, [2, 3])], [w])
    f = _find(lint(m), "unsupported-op", "mmi")
    assert f.severity == "error" and f.op_type == "MatMulInteger" and "QDQ" in f.message


def test_contrib_op_is_an_error():
    b = numpy_helper.from_array(np.zeros((3, 1, 16), np.uint8), "b")
    s = numpy_helper.from_array(np.ones((3, 1), np.float32), "sc")
    node = helper.make_node("MatMulNBits", ["x", "b", "sc"], ["y"], name="mnb", domain="com.microsoft",
                            K=32, N=3, bits=4, block_size=32)
    m = _model([node], [_vi("x", F, [2, 32])], [_vi("y", F, [2, 3])], [b, s],
               extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    f = _find(lint(m), "contrib-op", "mnb")
    assert f.severity == "error" and f.op_type == "com.microsoft.MatMulNBits"


def test_nonzero_feeding_reshape_is_a_data_dependent_shape():
    m = _model([helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
                helper.make_node("Shape", ["nz"], ["shp"], name="shape_of_nz"),
                helper.make_node("Reshape", ["data", "shp"], ["y"], name="reshape_dds")],
               [_vi("x", F, [8]), _vi("data", F, [8])], [_vi("y", F, None)])
    out = lint(m)
    f = _find(out, "data-dependent-shape", "reshape_dds")
    assert f.severity == "error" and "nonzero" in f.message and "NonZero" in f.message
    assert _find(out, "data-dependent-output", "nonzero").severity == "warning"


def test_dynamic_dims_need_a_profile():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
               [_vi("x", F, ["batch", 4])], [_vi("y", F, ["batch", 4])])
    f = _find(lint(m), "dynamic-shape-no-profile", "x")
    assert f.severity == "warning" and f.op_type == "graph-input"
    assert lint(m, profiles={"x": ((1, 4), (8, 4), (32, 4))}) == []
    bad = lint(m, profiles={"x": ((1, 2), (8, 4), (32, 4))})  # varies the static axis
    assert _find(bad, "bad-profile", "x").severity == "error"
    assert _find(lint(m, profiles={"y": ((1, 4),) * 3}), "profile-missing-input", "x").severity == "error"


def test_int64_input_double_and_overflowing_constants():
    big = numpy_helper.from_array(np.array([2 ** 40], np.int64), "big")
    m = _model([helper.make_node("Add", ["ids", "big"], ["s"], name="add_big"),
                helper.make_node("Cast", ["s"], ["y"], name="to_double", to=T.DOUBLE)],
               [_vi("ids", T.INT64, [2, 8])], [_vi("y", T.DOUBLE, [2, 8])], [big])
    out = lint(m)
    f = _find(out, "int64-input", "ids")
    assert f.severity == "warning" and f.op_type == "graph-input"
    assert _find(out, "int64-overflow", "add_big").severity == "warning"
    assert _find(out, "double", "y").severity == "error"  # a double graph output
    assert _find(out, "double", "to_double").op_type == "Cast"


@pytest.mark.parametrize("case", ["resize", "sequence", "unique", "loop", "string"])
def test_other_refusals(case):
    if case == "resize":
        roi = numpy_helper.from_array(np.zeros(8, np.float32), "roi")
        sc = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")
        node = helper.make_node("Resize", ["x", "roi", "sc"], ["y"], name="rsz", mode="linear",
                                coordinate_transformation_mode="tf_crop_and_resize")
        m = _model([node], [_vi("x", F, [1, 1, 4, 4])], [_vi("y", F, [1, 1, 8, 8])], [roi, sc])
        code, node_name = "unsupported-attribute", "rsz"
    elif case == "sequence":
        m = _model([helper.make_node("SequenceConstruct", ["x", "x"], ["s"], name="seq"),
                    helper.make_node("SequenceAt", ["s", "i"], ["y"], name="seq_at")],
                   [_vi("x", F, [2]), _vi("i", T.INT64, [])], [_vi("y", F, [2])])
        code, node_name = "sequence-op", "seq"
    elif case == "unique":
        m = _model([helper.make_node("Unique", ["x"], ["y"], name="uniq")],
                   [_vi("x", F, [8])], [_vi("y", F, None)])
        code, node_name = "unsupported-op", "uniq"
    elif case == "loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
            "body", [_vi("i", T.INT64, []), _vi("c_in", T.BOOL, []), _vi("v_in", F, [2])],
            [_vi("c_out", T.BOOL, []), _vi("v_out", F, [2])])
        m = _model([helper.make_node("ReduceMax", ["n"], ["trip"], name="trip_from_values", keepdims=0),
                    helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop_dd", body=body)],
                   [_vi("n", T.INT64, [3]), _vi("x", F, [2])], [_vi("y", F, [2])])
        code, node_name = "data-dependent-loop", "loop_dd"
    else:
        m = _model([helper.make_node("StringNormalizer", ["x"], ["y"], name="strnorm")],
                   [_vi("x", T.STRING, [3])], [_vi("y", T.STRING, [3])])
        code, node_name = "unsupported-op", "strnorm"
        assert _find(lint(m), "string-tensor", "x").severity == "error"
    assert _find(lint(m), code, node_name).severity == "error"


# ----------------------------------------------------------------------------- lathe exports


@pytest.fixture(scope="session")
def trt_int8_export(tmp_path_factory, minilm_int8):
    """The tensorrt-target export of the int8 checkpoint, validated on onnxruntime."""
    import lathe

    out = tmp_path_factory.mktemp("trt") / "minilm-int8-trt.onnx"
    path, report = lathe.export_onnx(minilm_int8, out, target="tensorrt")
    return path, report


def test_lathe_onnxruntime_int8_export_is_flagged_by_the_cli(minilm_int8, tmp_path):
    from lathe import cli

    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        # exact: standard-op MatMulInteger (the default fused mode is flagged as a contrib op)
        rc = cli.main(["export", str(minilm_int8), "--lint", "tensorrt", "--int8-mode", "exact",
                       "-o", str(tmp_path / "ort.onnx")])
    text = buf.getvalue()
    assert rc == 3, err.getvalue()
    assert "validation PASS" in text and "[unsupported-op]" in text and "(MatMulInteger)" in text
    lathe_lines = [l for l in err.getvalue().splitlines() if l.startswith("lathe:")]
    assert len(lathe_lines) == 1 and "TensorRT lint" in lathe_lines[0]  # one line, exit 3
    findings = lint(tmp_path / "ort.onnx")
    mmi = [f for f in findings.errors if f.op_type == "MatMulInteger"]
    nodes = {n.name for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node if n.op_type == "MatMulInteger"}
    assert len(mmi) == 24 and {f.node for f in mmi} == nodes


def test_lathe_tensorrt_export_is_clean_and_validates(trt_int8_export):
    path, report = trt_int8_export
    # a different (static, symmetric) quantization from lathe's kernel: looser tolerance
    assert report.passed and report.precision == "int8-static" and report.min_cos >= 0.98, report.summary()
    print(report.summary())
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert "MatMulInteger" not in ops and ops.count("QuantizeLinear") >= 12 and ops.count("DequantizeLinear") == 24 + ops.count("QuantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()
    findings = lint(path)
    assert findings.errors == [], findings.summary()
    assert {f.code for f in findings} <= {"dynamic-shape-no-profile", "int64-input"}
    prof = {n: ((1, 1), (8, 128), (32, 512)) for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert {f.code for f in lint(path, prof)} <= {"int64-input"}


def test_lint_cli_on_tensorrt_target_exits_0(trt_int8_export, minilm_int8, tmp_path, monkeypatch):
    """`--target tensorrt --lint tensorrt` through the CLI (export reused: export_onnx is stubbed)."""
    import shutil

    from lathe import cli
    from lathe.export import onnx as onnx_mod

    def fake_export(src, out, target, opset, validate=True, **kw):
        assert target == "tensorrt"
        shutil.copy(trt_int8_export[0], out)
        return out, trt_int8_export[1]

    monkeypatch.setattr(onnx_mod, "export_onnx", fake_export)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["export", str(minilm_int8), "--target", "tensorrt", "--lint", "tensorrt",
                       "--min-shapes", "input_ids:1x1,attention_mask:1x1,token_type_ids:1x1",
                       "--opt-shapes", "input_ids:8x128,attention_mask:8x128,token_type_ids:8x128",
                       "--max-shapes", "input_ids:32x512,attention_mask:32x512,token_type_ids:32x512",
                       "-o", str(tmp_path / "t.onnx")])
    assert rc == 0, buf.getvalue()
    assert re.search(r"TensorRT lint: 0 error\(s\)", buf.getvalue())


def test_opset23_lowers_attention_to_the_standard_op(minilm, tmp_path):
    """onnxruntime 1.32 runs opset-23 Attention on CPU (its mask must be [B, 1, Sq, Sk])."""
    import lathe

    path, report = lathe.export_onnx(minilm, tmp_path / "m23.onnx", opset=23)
    assert report.passed and report.min_cos > 0.9999, report.summary()
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 23
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Attention") == 6 and "Softmax" not in ops
    recent = [f for f in lint(m) if f.code == "recent-op"]
    assert len(recent) == 6 and all(f.severity == "warning" for f in recent)
