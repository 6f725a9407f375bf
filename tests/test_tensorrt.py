"""TensorRT: the gate (exit code 2 and one line naming tensorrt when it is missing), the
profile-shape parser, the fp16 cast pass (on CPU, through onnxruntime), and - marked
`tensorrt`, skipped without the package or a GPU - the real engine build and run vs PyTorch."""
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from lathe.errors import BadInput
from lathe.export.tensorrt import FP32_OPS, cast_fp16, parse_profiles, parse_shapes


def _has_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_trt = pytest.mark.skipif(not _has_tensorrt(), reason="needs the tensorrt package and an NVIDIA GPU")


@pytest.fixture(scope="session")
def fp32_onnx(tmp_path_factory, minilm):
    import lathe

    path, _ = lathe.export_onnx(minilm, tmp_path_factory.mktemp("fp32") / "minilm.onnx", validate=False)
    return path


# ----------------------------------------------------------------------------- the gate


def test_cli_without_tensorrt_exits_2_with_one_line(minilm, tmp_path, monkeypatch, capsys):
    from lathe import cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    rc = cli.main(["export", str(minilm), "--to", "tensorrt", "-o", str(tmp_path / "m.engine")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "tensorrt" in err.lower()
    assert "pip install tensorrt --extra-index-url https://pypi.nvidia.com" in err and "GPU" in err
    assert not (tmp_path / "m.engine").exists()


def test_python_api_without_tensorrt_raises_badinput(tmp_path, monkeypatch):
    from lathe.export.tensorrt import TrtRunner, build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BadInput, match="tensorrt"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "x:1x1")
    with pytest.raises(BadInput, match="tensorrt"):
        TrtRunner(tmp_path / "m.engine")


# ----------------------------------------------------------------------------- shapes


def test_parse_shapes():
    assert parse_shapes("input_ids:1x16,attention_mask:1x16") == {"input_ids": (1, 16), "attention_mask": (1, 16)}
    assert parse_shapes(" x : 8X128 , y:4 ") == {"x": (8, 128), "y": (4,)}
    assert parse_shapes(None) == {} and parse_shapes({"x": [1, 2]}) == {"x": (1, 2)}
    prof = parse_profiles("x:1x1", "x:8x128", "x:32x512")
    assert prof == {"x": ((1, 1), (8, 128), (32, 512))}
    assert parse_profiles(None, "x:4x8", None) == {"x": ((4, 8),) * 3}  # trtexec --shapes style
    assert parse_profiles() is None


@pytest.mark.parametrize("bad", ["", "input_ids", "input_ids:", "input_ids:1x", "input_ids:axb", ":1x2",
                                 "a:1x2,a:1x2", "a:1x2;b:1x2", "a:1x-2", "a:1x2,"])
def test_parse_shapes_rejects(bad):
    with pytest.raises(BadInput):
        parse_shapes(bad)


@pytest.mark.parametrize("mn,op,mx", [("x:8x1", "x:4x1", "x:16x1"), ("x:1x1", "x:1x1x1", "x:2x2"),
                                      ("x:0x1", "x:1x1", "x:2x2")])
def test_parse_profiles_rejects(mn, op, mx):
    with pytest.raises(BadInput):
        parse_profiles(mn, op, mx)


# ----------------------------------------------------------------------------- fp16 cast pass


def _types(m):
    g = onnx.shape_inference.infer_shapes(m).graph
    ty = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    ty.update({t.name: t.data_type for t in m.graph.initializer})
    return ty


def test_cast_pass_keeps_sensitive_paths_in_fp32():
    """A decomposed LayerNorm + GELU: the listed ops and the elementwise ops between them
    (the variance path) stay fp32, the rest turns fp16, I/O stays fp32."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    c = {k: numpy_helper.from_array(np.array(v, np.float32), k)
         for k, v in (("two", 2.0), ("eps", 1e-5), ("half", 0.5), ("one", 1.0), ("rs2", 0.70710678), ("big", -1e30))}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceMean", ["h", "ax"], ["mu"], name="mean"),
             helper.make_node("Sub", ["h", "mu"], ["d"], name="sub"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
             helper.make_node("ReduceMean", ["d2", "ax"], ["var"], name="var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
             helper.make_node("Div", ["d", "sd"], ["n"], name="div"),
             helper.make_node("Mul", ["n", "rs2"], ["nr"], name="mul_rs2"),
             helper.make_node("Erf", ["nr"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="add_one"),
             helper.make_node("Mul", ["n", "half"], ["nh"], name="mul_half"),
             helper.make_node("Mul", ["nh", "e1"], ["g"], name="gelu"),
             helper.make_node("Mul", ["g", "big"], ["gb"], name="mul_big"),
             helper.make_node("Softmax", ["gb"], ["y"], name="softmax", axis=-1)]
    ax = numpy_helper.from_array(np.array([-1], np.int64), "ax")
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                                            [helper.make_tensor_value_info("y", T.FLOAT, [2, 8])],
                                            initializer=[w, ax, *c.values()]),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    out = cast_fp16(m)
    onnx.checker.check_model(out, full_check=True)
    ty = _types(out)
    by_name = {n.name: n for n in out.graph.node}
    fp32 = {"mean", "pow", "var", "add_eps", "sqrt", "erf", "softmax"}
    for name in fp32:
        assert all(ty[o] == T.FLOAT for o in by_name[name].output), name
    for name in ("mm", "sub", "div", "mul_half", "gelu", "mul_big"):
        assert all(ty[o] == T.FLOAT16 for o in by_name[name].output), name
    assert out.graph.input[0].type.tensor_type.elem_type == T.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == T.FLOAT
    # the -1e30 constant read in fp16 is clamped to a finite value
    big16 = [numpy_helper.to_array(t) for t in out.graph.initializer if t.name.startswith("big")]
    assert big16 and all(np.isfinite(a).all() for a in big16)
    import onnxruntime as ort
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    run = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref, got = run(m), run(out)
    assert np.isfinite(got).all() and np.abs(ref - got).max() < 2e-2


def test_cast_pass_on_minilm_runs_on_onnxruntime(fp32_onnx, tmp_path, minilm):
    from lathe.export.validate import ort_session
    from lathe.models.bert import mean_pool
    from lathe.text import Tokenizer, eval_sentences

    m16 = cast_fp16(onnx.load(str(fp32_onnx)))
    onnx.checker.check_model(m16)
    ty = _types(m16)
    kept = [n for n in m16.graph.node if n.op_type in FP32_OPS & {"LayerNormalization", "Softmax", "Erf"}]
    assert len(kept) == 13 + 6 + 6
    for n in kept:
        assert all(ty[x] == T.FLOAT for x in n.output) and all(ty[x] == T.FLOAT for x in n.input if x), n.name
    mm = [n for n in m16.graph.node if n.op_type == "MatMul"]
    assert mm and all(ty[n.output[0]] == T.FLOAT16 for n in mm)
    assert sum(t.data_type == T.FLOAT16 for t in m16.graph.initializer) >= 36
    p16 = tmp_path / "minilm-fp16.onnx"
    onnx.save(m16, str(p16))
    tok = Tokenizer(minilm)
    b = tok(eval_sentences()[:16], seq_len=64)  # padded: exercises the -1e30 mask in fp16
    feed = {k: v.numpy() for k, v in b.items()}
    ref = torch.from_numpy(ort_session(fp32_onnx).run(None, feed)[0])
    got = torch.from_numpy(ort_session(p16).run(None, feed)[0])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(mean_pool(got, b["attention_mask"]), mean_pool(ref, b["attention_mask"]))
    assert float(cos.min()) >= 0.999, float(cos.min())


def test_atomic_write(tmp_path):
    from lathe.export.tensorrt import _atomic_write

    p = tmp_path / "sub" / "m.engine"
    _atomic_write(p, b"abc")
    _atomic_write(p, b"defg")
    assert p.read_bytes() == b"defg" and sorted(x.name for x in p.parent.iterdir()) == ["m.engine"]


# ----------------------------------------------------------------------------- real TensorRT


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_engine_build_and_run_vs_pytorch(kind, fp32_onnx, minilm, minilm_int8, tmp_path):
    import lathe
    from lathe.export.tensorrt import TrtRunner, build_engine
    from lathe.models.bert import mean_pool
    from lathe.text import Tokenizer, eval_sentences

    src = minilm_int8 if kind == "int8" else minilm
    if kind == "int8":
        onnx_path, _ = lathe.export_onnx(minilm_int8, tmp_path / "int8-trt.onnx", target="tensorrt")
    else:
        onnx_path = fp32_onnx
    names = "input_ids,attention_mask,token_type_ids".split(",")
    shp = lambda s: ",".join(f"{n}:{s}" for n in names)
    cache = tmp_path / "timing.cache"
    eng = build_engine(onnx_path, tmp_path / f"{kind}.engine", shp("1x1"), shp("8x64"), shp("16x128"),
                       fp16=kind == "fp16", workspace_gb=2, timing_cache=cache)
    assert eng.stat().st_size > 0 and cache.stat().st_size > 0
    runner = TrtRunner(eng)
    model = lathe.load(src)
    tok = Tokenizer(src)
    b = tok(eval_sentences()[:8], seq_len=64)
    with torch.inference_mode():
        ref = model(**b).float()
    out = runner(**{k: v.cuda() for k, v in b.items()})
    torch.cuda.synchronize()
    got = next(iter(out.values())).float().cpu()
    cos = torch.nn.functional.cosine_similarity(mean_pool(got, b["attention_mask"]), mean_pool(ref, b["attention_mask"]))
    assert float(cos.min()) >= {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}[kind], float(cos.min())
