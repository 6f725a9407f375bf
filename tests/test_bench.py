"""Every CPU backend of `lathe bench` on MiniLM at a small count, isolation, and the
statistics and schema the reports rely on."""
import json

import pytest

from lathe import benchflow
from lathe.bench.report import table, validate_schema, write_all


@pytest.fixture(scope="module")
def small_doc(minilm_int8, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return benchflow.run(minilm_int8, out, benchflow.ALL, batches=(1, 2), seq=16, min_runs=3,
                         min_seconds=0.0, log=lambda *_: None), out


def test_every_cpu_backend_runs_with_quality(small_doc):
    doc, _ = small_doc
    validate_schema(doc)
    names = {r["backend"] for r in doc["results"]}
    assert names == {"torch fp32", "torch.compile lathe int8", "lathe int8", "lathe fp32 (uncompressed)",
                     "onnxruntime fp32", "onnxruntime int8 (quantize_dynamic)",
                     "onnxruntime int8 per-channel (quantize_dynamic)",
                     "lathe int8 ONNX on onnxruntime", "lathe int8 ONNX fast on onnxruntime",
                     "lathe int8 ONNX hybrid on onnxruntime", "lathe int8 ONNX exact on onnxruntime"}
    for r in doc["results"]:
        assert r["n"] >= 3 and len(r["times_ms"]) == r["n"] and r["p50_ms"] > 0
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    q = doc["quality"]
    assert q["torch fp32"]["min_cos"] == pytest.approx(1.0)
    assert q["onnxruntime fp32"]["min_cos"] > 0.9999
    assert q["lathe int8"]["min_cos"] > 0.98
    assert q["lathe fp32 (uncompressed)"]["min_cos"] > 0.9999
    # the default (fused) and exact lowerings are the kernel's own integer math: lathe's quality;
    # fast trades quality for per-tensor DynamicQuantizeMatMul and must still beat quantize_dynamic
    lathe_q, fused = q["lathe int8"]["min_cos"], q["lathe int8 ONNX on onnxruntime"]["min_cos"]
    assert abs(fused - lathe_q) < 0.002 and q["lathe int8 ONNX exact on onnxruntime"]["min_cos"] > 0.98
    assert fused > q["onnxruntime int8 per-channel (quantize_dynamic)"]["min_cos"]
    assert q["lathe int8 ONNX hybrid on onnxruntime"]["min_cos"] > 0.95
    assert q["lathe int8 ONNX fast on onnxruntime"]["min_cos"] > q["onnxruntime int8 (quantize_dynamic)"]["min_cos"]
    assert "lathe int8" in table(doc)


def test_reports_written(small_doc, tmp_path):
    doc, _ = small_doc
    paths = write_all(doc, tmp_path)
    assert json.loads(paths["report.json"].read_text())["schema_version"] == 1
    assert paths["report.png"].read_bytes()[:4] == b"\x89PNG"
    assert "| lathe int8 |" in paths["report.md"].read_text()
    assert paths["report.csv"].read_text().splitlines()[0].startswith("backend,batch,seq")


def test_isolated_backend_and_onnx_target(small_doc, minilm):
    _, out = small_doc
    doc = benchflow.run(out / "model-ort-int8.onnx", out, batches=(1,), seq=8, min_runs=2,
                        min_seconds=0.0, isolate=True, model_dir=minilm, log=lambda *_: None)
    validate_schema(doc)
    assert doc["config"]["isolate"] and doc["results"][0]["backend"].startswith("onnxruntime")


def test_bad_target(tmp_path):
    from lathe.errors import BadInput

    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BadInput, match="expected a model directory"):
        benchflow.run(tmp_path / "x.txt", tmp_path, log=lambda *_: None)
    with pytest.raises(BadInput, match="unknown backend"):
        benchflow.run(tmp_path, tmp_path, ("tensorflow",), log=lambda *_: None)


def test_decoder_scenario(tmp_path):
    """Prefill, per-token decode and tokens/s on the shipped decoder, perplexity beside them."""
    from pathlib import Path

    import lathe
    from lathe.bench import decoder

    src = Path(lathe.__file__).parent / "data" / "decoder-lm"
    q = lathe.compress_checkpoint(src, "int8-dynamic", tmp_path / "dec-int8")
    doc = decoder.run(q, batches=(1,), prompt_len=16, gen_len=4, min_runs=2, min_seconds=0.0,
                      log=lambda *_: None)
    assert {r["backend"] for r in doc["results"]} == {"lathe fp32", "lathe int8-dynamic"}
    for r in doc["results"]:
        assert r["decode_per_token"]["n"] >= 4 and r["prefill"]["p50_ms"] > 0
    fp32, int8 = (doc["quality"][k]["perplexity"] for k in ("lathe fp32", "lathe int8-dynamic"))
    assert int8 < fp32 * 1.05  # int8 W8A8 costs little perplexity on this model
    assert "decode tok/s" in decoder.table(doc)


def test_paired_ratio_of_a_model_to_itself(minilm):
    from lathe.bench.paired import paired

    r = paired(minilm, minilm, batch=1, seq=16, pairs=6, warmup=1)
    assert r["pairs"] == 6 and r["a_p50_ms"] > 0 and r["b_p50_ms"] > 0
    assert r["ratio_q25"] <= r["ratio_median"] <= r["ratio_q75"]
    assert 0.2 < r["ratio_median"] < 5  # the same model: a ratio near 1, whatever the noise
