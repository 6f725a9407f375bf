"""The CLI: help with examples, and every bad input as a one-line error with exit code 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lathe.cli import main

LATHE = [sys.executable, "-m", "lathe"]


@pytest.mark.parametrize("cmd", ["compress", "export", "bench", "demo"])
def test_help_has_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_top_level_help_and_entry_point():
    r = subprocess.run(LATHE + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "compress" in r.stdout and "demo" in r.stdout


def _run(args):
    r = subprocess.run(LATHE + args, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def _one_line_error(rc, err, code=2):
    assert rc == code, err
    assert len(err.splitlines()) == 1 and err.startswith("lathe: error:"), err
    assert "Traceback" not in err


def test_missing_path(tmp_path):
    rc, err = _run(["compress", str(tmp_path / "nope"), "--recipe", "int8", "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "no such file" in err and not (tmp_path / "o").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "d").mkdir()
    rc, err = _run(["compress", str(tmp_path / "d"), "--recipe", "int8", "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "config.json" in err and not (tmp_path / "o").exists()


def test_truncated_safetensors(tiny_copy, tmp_path):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, err = _run(["compress", str(tiny_copy), "--recipe", "int8", "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "truncated safetensors" in err and not (tmp_path / "o").exists()


def test_corrupt_safetensors_header(tiny_copy, tmp_path):
    f = tiny_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    rc, err = _run(["export", str(tiny_copy), "-o", str(tmp_path / "m.onnx")])
    _one_line_error(rc, err)
    assert "corrupt safetensors" in err and not (tmp_path / "m.onnx").exists()


def test_unknown_recipe(minilm, tmp_path):
    rc, err = _run(["compress", str(minilm), "--recipe", "int7", "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "unknown recipe 'int7'" in err


def test_recipe_unknown_field(minilm, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\nsteps:\n  - method: int8\n    alpah: 0.5\n")
    rc, err = _run(["compress", str(minilm), "--recipe", str(r), "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "unknown field 'alpah'" in err and not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_non_root(minilm, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rc, err = _run(["compress", str(minilm), "--recipe", "int8", "-o", str(ro / "o")])
    _one_line_error(rc, err)


def test_unwritable_output(minilm, tmp_path):
    # a path under a regular file can never be created, even by root
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = _run(["compress", str(minilm), "--recipe", "int8", "-o", str(f / "sub" / "o")])
    _one_line_error(rc, err)
    assert "cannot write" in err


def test_nan_in_weights(tiny_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    f = tiny_copy / "model.safetensors"
    sd = load_file(str(f))
    sd["encoder.layer.0.intermediate.dense.weight"][0, 0] = float("nan")
    save_file(sd, str(f))
    rc, err = _run(["compress", str(tiny_copy), "--recipe", "int8-dynamic", "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "NaN" in err and not (tmp_path / "o").exists()


def test_empty_calibration_file(minilm, tmp_path):
    c = tmp_path / "calib.txt"
    c.write_text("\n\n")
    rc, err = _run(["compress", str(minilm), "--recipe", "int8", "--calib", str(c), "-o", str(tmp_path / "o")])
    _one_line_error(rc, err)
    assert "empty" in err


def test_bench_compare_detects_regression(tmp_path):
    import json

    from lathe.bench.machine import describe

    def doc(p50):
        r = {"backend": "x", "batch": 1, "seq": 8, "n": 3, "min_ms": p50, "mean_ms": p50, "p50_ms": p50,
             "p90_ms": p50, "p95_ms": p50, "p99_ms": p50, "max_ms": p50, "stdev_ms": 0, "cv": 0,
             "throughput_per_s": 1}
        return {"schema_version": 1, "machine": describe(), "results": [r]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc(10.0)))
    b.write_text(json.dumps(doc(13.0)))
    assert main(["bench", "compare", str(a), str(b)]) == 1
    assert main(["bench", "compare", str(a), str(a)]) == 0
    assert main(["bench", "compare", str(a), str(tmp_path / "missing.json")]) == 2
