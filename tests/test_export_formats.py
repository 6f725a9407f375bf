"""ONNX export of lathe's weight-only and FP8 formats, external data, onnxslim, the fast int8
lowering: each validated on onnxruntime against PyTorch, and each validation shown to catch a
deliberately wrong graph."""
import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lathe
import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.errors import BadInput, ValidationFailed
from lathe.export.validate import validate_onnx


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, minilm):
    """MiniLM compressed with a recipe, made once per module per recipe (seconds each)."""
    made = {}

    def get(recipe):
        if recipe not in made:
            made[recipe] = lathe.compress_checkpoint(minilm, recipe, tmp_path_factory.mktemp("c") / recipe)
        return made[recipe]

    return get


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _corrupt(path, out, op_type, index, factor):
    """Copy of the graph with the constant feeding input `index` of the first `op_type` node
    (an initializer or a Constant) multiplied by `factor`: a wrong graph."""
    m = onnx.load(str(path))
    name = next(n.input[index] for n in m.graph.node if n.op_type == op_type)
    tensors = list(m.graph.initializer) + [a.t for n in m.graph.node if n.op_type == "Constant"
                                           and n.output[0] == name for a in n.attribute if a.name == "value"]
    t = next(t for t in tensors if t.name == name or not t.name)
    arr = numpy_helper.to_array(t).copy() * factor
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(m, str(out))
    return out


def _reference_model(src):
    return lathe.load(src)


def test_int4_matmulnbits_validates_and_catches_a_wrong_graph(ckpt, tmp_path):
    src = ckpt("int4-rtn")
    out, rep = lathe.export_onnx(src, tmp_path / "m.onnx", accuracy_level=0)
    assert rep.passed and rep.precision == "weight-only"
    ops = _ops(out)
    assert ops["MatMulNBits"] == 36 and "DequantizeLinear" not in ops
    node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 128 and attrs["accuracy_level"] == 0
    # the scales are the MatMulNBits 1-D block scales: scaling them all changes the output
    bad = _corrupt(out, tmp_path / "bad.onnx", "MatMulNBits", 2, 0.5)  # one module's scales
    with pytest.raises(ValidationFailed, match="min cosine"):
        validate_onnx(bad, _reference_model(src), src, True, precision="weight-only",
                      reference_ops=("linear_w4a16",))


def test_int4_tensorrt_blocked_dq_opset21_runs_on_ort_and_passes_lint(ckpt, tmp_path):
    from lathe.export.trt_lint import lint

    src = ckpt("int4-rtn")
    out, rep = lathe.export_onnx(src, tmp_path / "m.onnx", target="tensorrt")
    assert rep.passed and rep.max_rel < 1e-4  # exact: the zero point correction included
    m = onnx.load(str(out))
    assert {o.domain: o.version for o in m.opset_import}[""] >= 21
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all({a.name: a.i for a in n.attribute}.get("block_size") == 128 for n in dq)
    assert "MatMulNBits" not in _ops(out)
    names = [i.name for i in m.graph.input]
    findings = lint(out, {n: ((1, 1), (8, 128), (32, 512)) for n in names})
    assert not findings.errors, findings.summary()


def test_int8_weight_only_and_fp8_validate_and_catch_wrong_graphs(ckpt, tmp_path):
    if not hasattr(torch.ops.lathe, "linear_w8a16") or not hasattr(torch.ops.lathe, "linear_fp8"):
        pytest.skip("linear_w8a16 / linear_fp8 ops are not registered")
    src = ckpt("int8-weight-only")
    out, rep = lathe.export_onnx(src, tmp_path / "w8.onnx")
    assert rep.passed and rep.precision == "weight-only"
    assert _ops(out)["DequantizeLinear"] == 36
    bad = _corrupt(out, tmp_path / "w8bad.onnx", "DequantizeLinear", 1, 3.0)
    with pytest.raises(ValidationFailed):
        validate_onnx(bad, _reference_model(src), src, True, precision="weight-only")

    src = ckpt("fp8")
    out, rep = lathe.export_onnx(src, tmp_path / "fp8.onnx")
    assert rep.passed and rep.precision == "fp8"
    m = onnx.load(str(out))
    assert {o.domain: o.version for o in m.opset_import}[""] >= 19
    assert any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in m.graph.initializer)
    assert _ops(out)["QuantizeLinear"] == 24
    bad = _corrupt(out, tmp_path / "fp8bad.onnx", "DequantizeLinear", 1, 3.0)
    with pytest.raises(ValidationFailed):
        validate_onnx(bad, _reference_model(src), src, True, precision="fp8")


def test_w8a16_grouped_and_fp8_per_tensor_lowerings(tmp_path):
    """The lowerings' other variants on one small module each, through the real exporter."""
    if not hasattr(torch.ops.lathe, "linear_w8a16") or not hasattr(torch.ops.lathe, "linear_fp8"):
        pytest.skip("linear_w8a16 / linear_fp8 ops are not registered")
    from lathe.compress.modules import QLinearFP8, QLinearW8A16
    from lathe.export.onnx import export_model
    from lathe.export.validate import ort_session
    from lathe.export.lowerings import needs_opset

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    for mod in (QLinearW8A16.from_linear(lin, group_size=32),
                QLinearFP8.from_linear(lin, granularity="per_tensor", act_granularity="per_tensor")):
        path = tmp_path / f"{type(mod).__name__}.onnx"
        export_model(mod, {"x": x}, path, opset=needs_opset(mod, "onnxruntime"), output_names=("y",))
        got = ort_session(path).run(None, {"x": x.numpy()})[0]
        with torch.inference_mode():
            ref = mod(x).numpy()
        # same math; the fp32 sums run in another order
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5, type(mod).__name__


def test_external_data_and_slim(ckpt, tmp_path):
    src = ckpt("int4-rtn")
    out, rep = lathe.export_onnx(src, tmp_path / "m.onnx", external_data=True, slim=True,
                                 accuracy_level=4)
    data = tmp_path / "m.onnx.data"
    assert rep.passed and rep.precision == "int4-a8" and data.is_file()
    assert out.stat().st_size < data.stat().st_size / 10  # the weights live in the data file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    # the graph references its data file by name: loading it without the file fails
    data.rename(tmp_path / "moved.data")
    with pytest.raises(Exception):
        validate_onnx(out, _reference_model(src), src, True, precision="int4-a8")


def test_slim_without_onnxslim_is_bad_input(monkeypatch, minilm, tmp_path):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "onnxslim":
            raise ImportError("no onnxslim")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(BadInput, match="pip install onnxslim"):
        lathe.export_onnx(minilm, tmp_path / "m.onnx", slim=True)


def test_int8_fast_fuses_for_onnxruntime_and_beats_its_anchor_quality(minilm_int8, tmp_path):
    """int8_mode fast: DynamicQuantizeMatMul after onnxruntime's optimizer, quality above ORT
    quantize_dynamic's on the same sentences; hybrid: the calibrated outlier layers exact."""
    import onnxruntime as ort

    from lathe.bench.backends import ort_quantize_dynamic
    from lathe.bench.quality import cosine_stats, embeddings
    from lathe.export.validate import ort_session
    from lathe.source import default_checkpoint
    from lathe.text import Tokenizer, eval_sentences

    out, rep = lathe.export_onnx(minilm_int8, tmp_path / "fast.onnx", int8_mode="fast")
    assert rep.passed and rep.precision == "int8-fast"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    fused = _ops(tmp_path / "opt.onnx")
    assert fused["DynamicQuantizeMatMul"] == 24 and fused["Gelu"] == 6
    hybrid, rep = lathe.export_onnx(minilm_int8, tmp_path / "hybrid.onnx", int8_mode="hybrid")
    assert rep.passed and rep.precision == "int8-hybrid" and rep.min_cos > 0.99
    assert 0 < _ops(hybrid)["QuantizeLinear"] < 24  # some modules per token, most fused
    fp32, _ = lathe.export_onnx(default_checkpoint(), tmp_path / "fp32.onnx", validate=False)
    anchor = ort_quantize_dynamic(fp32, tmp_path / "ortq.onnx")
    assert _ops(anchor)["DynamicQuantizeLinear"] and _ops(ort_quantize_dynamic(fp32, tmp_path / "pc.onnx", "ort-int8-pc"))["MatMulInteger"]
    tok = Tokenizer(default_checkpoint())
    sents = eval_sentences()[:96]

    def emb(path):
        s = ort_session(path)
        names = {i.name for i in s.get_inputs()}
        return embeddings(lambda b: torch.from_numpy(s.run(None, {k: v.numpy() for k, v in b.items()
                                                                    if k in names})[0]), tok, sents)

    ref = emb(fp32)
    fast, hyb, ortq = (cosine_stats(ref, emb(p))["min_cos"] for p in (out, hybrid, anchor))
    assert hyb > fast > ortq


def test_tensorrt_export_reads_the_recorded_activation_scales(minilm_int8, capsys):
    """The int8 recipe records each group's static activation scale (from SmoothQuant's pass);
    export uses them (BERT's fused qkv takes its query/key/value scale) and calibrates only
    when they are missing, saying so."""
    import copy
    import dataclasses

    from lathe.compress.checkpoint import load
    from lathe.compress.formats import quantized_modules
    from lathe.export.onnx import calibrate_act_scales, recorded_act_scales, static_act_scales
    from lathe.source import open_source

    src = open_source(minilm_int8)
    model = load(minilm_int8)
    rec, why = recorded_act_scales(src.manifest, model)
    assert rec is not None, why
    steps = src.manifest["report"]["steps"]
    query = next(n for n in steps[0]["act_scales"] if n.endswith("attention.self.query"))
    assert rec[query.rpartition(".")[0] + ".qkv"] == steps[0]["act_scales"][query]
    inf = float("inf")
    used = calibrate_act_scales(model, minilm_int8, max_act_error=inf, recorded=rec)
    assert used == {f"{n}.weight": s for n, s in rec.items()}
    assert used.keys() == {f"{n}.weight" for n, _ in quantized_modules(model)}
    static_act_scales(model, src)
    assert "note:" not in capsys.readouterr().err
    bare = copy.deepcopy(src.manifest)
    for s in bare["report"]["steps"]:
        s.pop("act_scales", None)
    assert recorded_act_scales(bare, model)[0] is None
    assert recorded_act_scales(src.manifest, model, "percentile")[0] is None  # observed otherwise
    static_act_scales(model, dataclasses.replace(src, manifest=bare))
    assert "records no activation scales" in capsys.readouterr().err
