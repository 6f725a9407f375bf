"""From the command line, on small random checkpoints of three families (a decoder, an
encoder, a vision model): compress, bench, export to an Optimum-style ONNX folder; and a
compressed output whose source moved is still benched (found by hash beside it)."""
import json
import shutil
import subprocess
import sys

import pytest

from hf_tiny import write

pytestmark = pytest.mark.filterwarnings("ignore")


def lathe_cli(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "lathe", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return r


@pytest.mark.parametrize("family", ["qwen2", "roberta", "vit"])
def test_compress_bench_export(family, tmp_path):
    write(family, tmp_path / family)
    r = lathe_cli("compress", family, "--recipe", "int8", "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "min cos" in r.stdout or "ppl" in r.stdout  # the summary table
    bench = (["--prompt-len", "16", "--gen-len", "2"] if family == "qwen2"
             else ["--backend", "torch,lathe", "--batch", "1", "--seq", "16"])
    if family == "vit":
        bench = None  # lathe bench times text models (tokenizer); vision is covered by compress's summary
    if bench:
        r = lathe_cli("bench", "out", *bench, "--min-runs", "3", "--min-seconds", "0.1", "--out", "b", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((tmp_path / "b" / "report.json").read_text())["results"]
    r = lathe_cli("export", "out", "--to", "onnx", "-o", "onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation PASS" in r.stdout
    folder = tmp_path / "onnx"
    assert (folder / "model.onnx").is_file() and (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    if family != "vit":
        assert (folder / "tokenizer.json").is_file()
        _optimum_style_load(folder, family)


def _optimum_style_load(folder, family):
    """What Optimum's ORTModel* classes do with the folder (optimum-onnx itself pins
    transformers < 4.58 and cannot be installed beside transformers 5): config and tokenizer
    through transformers' Auto classes, the graph on onnxruntime, inputs named as the
    tokenizer names them."""
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(folder))
    assert cfg.model_type == family
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(["hello onnx", "a longer sentence for the folder"], padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {k: enc[k].astype("int64") for k in names if k in enc}
    if "token_type_ids" in names and "token_type_ids" not in enc:  # Optimum fills zeros, so do we
        feed["token_type_ids"] = 0 * feed["input_ids"]
    assert set(feed) == names, names
    out = sess.run(None, feed)[0]
    assert out.shape[:2] == enc["input_ids"].shape
    if family == "qwen2":
        assert out.shape[-1] == cfg.vocab_size


def test_moved_source_found_by_hash(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    write("roberta", proj / "src")
    r = lathe_cli("compress", "src", "--recipe", "int8-weight-only", "-o", "out", "--no-summary", cwd=proj)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((proj / "out" / "lathe_manifest.json").read_text())
    assert man["source"]["path"] == str((proj / "src").resolve())
    moved = tmp_path / "moved"
    shutil.move(proj, moved)
    from lathe.source import open_source, recorded_source
    assert recorded_source(open_source(moved / "out")).path == moved / "src"
    shutil.rmtree(moved / "src")
    r = lathe_cli("bench", moved / "out", "--backend", "lathe", "--batch", "1", "--seq", "8", "--min-runs", "2",
                  "--min-seconds", "0.1", "--out", "b", cwd=tmp_path)
    assert r.returncode == 2 and "source model" in r.stderr and "missing or changed" in r.stderr
