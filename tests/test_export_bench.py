"""ONNX export + validation on onnxruntime, the validation failure path, the bench statistics
and report, and the end-to-end demo."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lathe.bench.stats import percentile, summarize
from lathe.errors import ValidationFailed


def test_percentiles_match_numpy():
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    s = sorted(xs)
    for p in (0, 50, 90, 95, 99, 100):
        assert percentile(s, p) == pytest.approx(float(np.percentile(xs, p)))
    st = summarize(xs)
    assert st["p50_ms"] == 5.0 and st["min_ms"] == 1.0 and st["max_ms"] == 9.0
    assert st["stdev_ms"] == pytest.approx(float(np.std(xs, ddof=1)))


def test_export_int8_validates_and_wrong_graph_is_caught(minilm_int8, tmp_path):
    import onnx
    from onnx import numpy_helper

    import lathe
    from lathe.export.validate import validate_onnx

    out, rep = lathe.export_onnx(minilm_int8, tmp_path / "m.onnx", int8_mode="exact")
    assert rep.passed and rep.min_cos > 0.999
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops
    # corrupt one weight: validation must fail with the numbers
    m = onnx.load(str(out))
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 1 and init.dims[0] == 384:
            arr = numpy_helper.to_array(init).copy() * 5.0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ValidationFailed, match="min cosine"):
        validate_onnx(bad, lathe.load(minilm_int8), minilm_int8, quantized=True)


def test_export_cli_exit_code_3_on_failed_validation(minilm_int8, tmp_path, monkeypatch):
    from lathe import cli
    from lathe.export import validate

    monkeypatch.setitem(validate.TOLERANCE, "int8", {"min_cos": 1.01, "max_rel": 0.0})  # the default fused mode
    assert cli.main(["export", str(minilm_int8), "-o", str(tmp_path / "m.onnx")]) == 3


def test_demo_end_to_end(tmp_path):
    """The main job, at a small count: table printed, reports written."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "lathe", "demo", "-o", str(out), "--min-runs", "3",
                        "--min-seconds", "0"], capture_output=True, text=True, timeout=900,
                       cwd=tmp_path)  # not the repository root: its kernels/ would shadow the PyPI package
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lathe int8" in r.stdout and "onnxruntime int8" in r.stdout
    doc = json.loads((out / "report.json").read_text())
    from lathe.bench.report import validate_schema
    validate_schema(doc)
    backends = {x["backend"] for x in doc["results"]}
    assert {"torch fp32", "lathe int8", "onnxruntime fp32", "onnxruntime int8 (quantize_dynamic)"} <= backends
    assert {x["batch"] for x in doc["results"]} == {1, 8}
    assert doc["quality"]["lathe int8"]["n_sentences"] >= 256
    assert doc["quality"]["lathe int8"]["min_cos"] > 0.98
    assert (out / "report.png").stat().st_size > 10_000 and (out / "report.md").is_file()
