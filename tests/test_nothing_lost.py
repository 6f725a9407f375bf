"""Nothing lost (#14): every bad input exits 2 with one line and touches nothing; lathe never
replaces what it did not write; interrupted and concurrent runs recover; outputs honour the
umask; `bench compare` catches broken runs."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lathe
from lathe import io
from lathe.cli import main
from lathe.errors import BadInput

DECODER = Path(lathe.__path__[0]) / "data" / "decoder-lm"


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, size and mtime (nothing may appear or change)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def src_copy(tmp: Path, name="src") -> Path:
    dst = tmp / name
    shutil.copytree(DECODER, dst)
    return dst


def rewrite_tensors(src: Path, fn):
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def edit_config(src: Path, **kw):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(kw)
    (src / "config.json").write_text(json.dumps(cfg))


def write_header(src: Path, header: bytes):
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


def recipe(tmp: Path, text: str) -> str:
    p = tmp / "r.yaml"
    p.write_text(text)
    return str(p)


def bench_json(results=None, quality=None) -> dict:
    r = {"backend": "lathe int8", "batch": 1, "seq": 128, "n": 10, **{k: 1.0 for k in (
        "min_ms", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "stdev_ms", "cv",
        "throughput_per_s")}}
    return {"schema_version": 1, "machine": {}, "results": [r] if results is None else results,
            "quality": quality or {}}


def compress(tmp, src, *extra, recipe_name="int8-dynamic"):
    return ["compress", str(src), "--recipe", recipe_name, "--no-summary", "-o", str(tmp / "out"), *extra]


# ----------------------------------------------------------------------------- the table
# Each case prepares tmp (cwd) and returns the argv. All must exit 2, print one line, leave tmp
# exactly as it was.


def _user_file(t):
    (t / "notes.txt").write_text("mine")
    return ["compress", str(src_copy(t)), "--recipe", "int8", "-o", str(t / "notes.txt")]


def _user_folder(t):
    (t / "mine").mkdir()
    (t / "mine" / "a.txt").write_text("mine")
    return ["compress", str(src_copy(t)), "--recipe", "int8", "-o", str(t / "mine")]


def _fifo_weights(t):
    s = src_copy(t)
    (s / "model.safetensors").unlink()
    os.mkfifo(s / "model.safetensors")
    return compress(t, s)


def _fifo_recipe(t):
    os.mkfifo(t / "r.yaml")
    return ["compress", str(src_copy(t)), "--recipe", str(t / "r.yaml"), "-o", str(t / "out")]


def _bad_utf8(name):
    def case(t):
        s = src_copy(t)
        (s / name).write_bytes(b'{"model_type": "llama\xff\xfe"}')
        return compress(t, s)
    return case


def _tensors(fn):
    def case(t):
        s = src_copy(t)
        rewrite_tensors(s, fn)
        return compress(t, s)
    return case


def _config(**kw):
    def case(t):
        s = src_copy(t)
        edit_config(s, **kw)
        return compress(t, s)
    return case


def _header(h: bytes):
    def case(t):
        s = src_copy(t)
        write_header(s, h)
        return compress(t, s)
    return case


def _recipe(text):
    def case(t):
        return ["compress", str(src_copy(t)), "--recipe", recipe(t, text), "-o", str(t / "out")]
    return case


def _set(name, value):
    def fn(sd):
        sd[name] = value(sd[name])
    return fn


def _nan_at(name, v=float("nan")):
    def value(x):
        x = x.clone()
        x.view(-1)[0] = v
        return x
    return _set(name, value)


def _extra_layer(sd):
    for k in list(sd):
        if k.startswith("model.layers.3."):
            sd[k.replace("layers.3.", "layers.4.")] = sd[k].clone()


def _compare(a_bytes, extra=()):
    def case(t):
        (t / "a.json").write_text(json.dumps(bench_json()))
        p = t / "b.json"
        if a_bytes == "folder":
            p.mkdir()
        else:
            p.write_bytes(a_bytes)
        return ["bench", "compare", str(t / "a.json"), str(p), *extra]
    return case


def _bench_decoder(*flags):
    def case(t):
        return ["bench", str(DECODER), "--out", str(t / "o"), *flags]
    return case


def _bench_file(name, data):
    def case(t):
        (t / name).write_bytes(data)
        return ["bench", str(t / name), "--out", str(t / "o")]
    return case


def _export(out_fn, *flags):
    def case(t):
        s = src_copy(t)
        return ["export", str(s), "-o", str(out_fn(t, s)), *flags]
    return case


def _mkdir(p):
    p.mkdir()
    return p


def _file(p, data=b"mine"):
    p.write_bytes(data)
    return p


def _parent_of_src(t):
    proj = t / "proj"
    proj.mkdir()
    (proj / "README").write_text("mine")
    return ["compress", str(src_copy(proj, "model")), "--recipe", "int8", "-o", str(proj)]


def _nan_eps(t):
    s = src_copy(t)
    cfg = (s / "config.json").read_text()
    (s / "config.json").write_text(cfg.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    return compress(t, s)


CASES = {
    # output paths (issue #14 section 1)
    "compress -o user file": _user_file,
    "compress -o user folder": _user_folder,
    "compress -o SRC/model.safetensors": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "-o",
                                                    str(t / "src" / "model.safetensors")],
    "compress -o under a source file": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "-o",
                                                  str(t / "src" / "model.safetensors" / "x")],
    "compress -o SRC/config.json --force": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "--force",
                                                      "-o", str(t / "src" / "config.json")],
    "compress -o parent of SRC": lambda t: _parent_of_src(t),
    "compress -o parent of SRC --force": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "--force",
                                                    "-o", str(t)],
    "compress -o SRC": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "-o", str(t / "src")],
    "compress -o .": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "-o", "."],
    "compress --vllm-export onto a user file": lambda t: compress(t, src_copy(t), "--vllm-export",
                                                                  str(_file(t / "v.txt"))),
    "compress -o under a file": lambda t: ["compress", str(src_copy(t)), "--recipe", "int8", "-o",
                                           str(_file(t / "f") / "out")],
    # checkpoint checks (section 3)
    "config 2 layers, weights 4": _config(num_hidden_layers=2),
    "extra tensors": _tensors(_extra_layer),
    "I32 tensor where floats belong": _tensors(_set("model.norm.weight", lambda x: x.to(torch.int32))),
    "I64 tensor where floats belong": _tensors(_set("model.embed_tokens.weight", lambda x: x.to(torch.int64))),
    "BOOL tensor where floats belong": _tensors(_set("model.norm.weight", lambda x: x > 0)),
    "NaN in the embeddings": _tensors(_nan_at("model.embed_tokens.weight")),
    "Inf in a norm": _tensors(_nan_at("model.norm.weight", float("inf"))),
    "NaN in a linear": _tensors(_nan_at("model.layers.0.mlp.up_proj.weight")),
    "non-UTF-8 config.json": _bad_utf8("config.json"),
    "non-UTF-8 tokenizer.json": _bad_utf8("tokenizer.json"),
    "non-UTF-8 recipe": lambda t: ["compress", str(src_copy(t)), "--recipe",
                                   str(_file(t / "r.yaml", b"name: \xff\xfe\n")), "-o", str(t / "out")],
    "non-UTF-8 calibration file": lambda t: compress(t, src_copy(t), "--calib", str(_file(t / "c.txt", b"\xff\xfe"))),
    "header entry not an object": _header(b'{"a": 5}'),
    "header is a list": _header(b"[1, 2]"),
    "header nested 100k deep": _header(b"[" * 100_000 + b"]" * 100_000),
    "header entry with a bad dtype": _header(b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}'),
    "header offsets past the end": _header(b'{"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'),
    "vocab_size -5": _config(vocab_size=-5),
    "hidden_size \"256\"": _config(hidden_size="256"),
    "rms_norm_eps NaN": _nan_eps,
    "FIFO weights": _fifo_weights,
    "FIFO recipe": _fifo_recipe,
    "recipe skip [1, 2]": _recipe("steps:\n  - method: int8\n    skip: [1, 2]\n"),
    "recipe method [int4]": _recipe("steps:\n  - method: [int4]\n"),
    "recipe int4 then int8": _recipe("steps:\n  - method: int4\n  - method: int8\n"),
    "recipe int8 twice": _recipe("steps:\n  - method: int8\n  - method: int8\n"),
    "recipe distill.steps 1e20": _recipe("steps:\n  - method: distill\n    steps: 1e20\n"),
    "recipe distill.steps 10**20": _recipe("steps:\n  - method: distill\n    steps: 100000000000000000000\n"),
    # export
    "export -o existing folder": _export(lambda t, s: _mkdir(t / "m.onnx")),
    "export -o SRC/model.safetensors": _export(lambda t, s: s / "model.safetensors"),
    "export -o SRC/model.safetensors --force": _export(lambda t, s: s / "model.safetensors", "--force"),
    "export -o user file": _export(lambda t, s: _file(t / "m.onnx")),
    "export --opset 99": _export(lambda t, s: t / "m.onnx", "--opset", "99"),
    "export -o .": _export(lambda t, s: Path(".")),
    "export --to tensorrt without TensorRT": _export(lambda t, s: t / "m.engine", "--to", "tensorrt"),
    # bench (section 5)
    "bench random-bytes .onnx": _bench_file("m.onnx", os.urandom(512)),
    "bench empty .onnx": _bench_file("m.onnx", b""),
    "bench random .engine without TensorRT": _bench_file("m.engine", os.urandom(512)),
    "bench compare binary": _compare(b"\x00\xff\xfe" * 10),
    "bench compare null": _compare(b"null"),
    "bench compare folder": _compare("folder"),
    "bench compare empty object": _compare(b"{}"),
    "bench compare --threshold nan": _compare(json.dumps(bench_json()).encode(), ("--threshold", "nan")),
    "bench compare --threshold -1": _compare(json.dumps(bench_json()).encode(), ("--threshold", "-1")),
    "bench compare --quality-threshold inf": _compare(json.dumps(bench_json()).encode(),
                                                      ("--quality-threshold", "inf")),
    "bench decoder --prompt-len 0": _bench_decoder("--prompt-len", "0"),
    "bench decoder --gen-len 0": _bench_decoder("--gen-len", "0"),
    "bench decoder beyond max positions": _bench_decoder("--prompt-len", "250", "--gen-len", "32"),
    "bench decoder --device cuda": _bench_decoder("--device", "cuda"),
    "bench --out onto a file": lambda t: ["bench", str(DECODER), "--out", str(_file(t / "o"))],
    "bench --json onto a user file": lambda t: ["bench", str(DECODER), "--out", str(t / "o"), "--json",
                                                str(_file(t / "r.json", b"mine"))],
    "bench pruned missing model": lambda t: ["bench", "pruned", str(t / "nope"), str(t / "nope2")],
    # demo
    "demo -o onto a file": lambda t: ["demo", "-o", str(_file(t / "d"))],
    "demo -o .": lambda t: ["demo", "-o", "."],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is honoured")
def test_bench_device_cuda_without_gpu(tmp_path, minilm, capsys):
    assert main(["bench", str(minilm), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("lathe: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    assert snapshot(tmp_path) == before  # nothing created, removed or changed, at or beside the output


# ----------------------------------------------------------------------------- writer and recovery


def test_atomic_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with io.atomic_dir(tmp_path / "d") as t:
            (t / "f").write_text("x")
        with io.atomic_file(tmp_path / "f.json") as t:
            t.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_keeps_the_previous_output_on_failure(tmp_path):
    out = tmp_path / "o"
    with io.atomic_dir(out) as t:
        (t / "v").write_text("1")
    with pytest.raises(RuntimeError), io.atomic_dir(out) as t:
        (t / "v").write_text("2")
        raise RuntimeError
    assert (out / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_recover_restores_old_and_removes_stale_temps(tmp_path):
    out = tmp_path / "out"
    pid = _dead_pid()
    old = tmp_path / f".out.old-{pid}"
    old.mkdir()
    (old / io.MANIFEST).write_text("{}")
    tmp = tmp_path / f".out.tmp-{pid}-deadbeef"
    tmp.mkdir()
    (tmp / "half").write_text("x")
    live = tmp_path / f".out.tmp-{os.getpid()}-cafe0000"  # ours: alive, kept
    live.mkdir()
    done = io.recover(out)
    assert (out / io.MANIFEST).is_file() and not old.exists() and not tmp.exists() and live.exists()
    assert any("restored" in d for d in done)


def test_second_run_on_a_locked_output_exits_2_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    with io.output_lock(out):
        rc = main(["compress", str(DECODER), "--recipe", "int8", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"is being written by pid {os.getpid()}" in err
    assert not out.exists() and not io.lock_path(out).exists()


def test_compress_replaces_its_own_output_and_recovers(tmp_path, monkeypatch, capsys):
    """A previous lathe output is replaced; an interrupted run's leftovers are recovered;
    a Ctrl-C once the output is complete exits 0; outputs are 0755/0644 under umask 022."""
    out = tmp_path / "out"
    pid = _dead_pid()
    old = tmp_path / f".out.old-{pid}"  # a crash between the two renames of an earlier run
    old.mkdir()
    (old / io.MANIFEST).write_text("{}")
    (tmp_path / f".out.tmp-{pid}-0123abcd").mkdir()
    from lathe import summary

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(summary, "summarize", interrupt)
    prev = os.umask(0o022)
    try:
        rc = main(["compress", str(DECODER), "--recipe", "int8-weight-only", "-o", str(out)])
    finally:
        os.umask(prev)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "complete" in err
    assert json.loads((out / io.MANIFEST).read_text())["recipe"]["name"] == "int8-weight-only"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old, .tmp or lock left
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_force_replaces_a_user_folder_but_never_a_source(tmp_path):
    from lathe.io import check_output

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a").write_text("x")
    with pytest.raises(BadInput, match="--force"):
        check_output(tmp_path / "mine", "compressed", [DECODER])
    check_output(tmp_path / "mine", "compressed", [DECODER], force=True)
    with pytest.raises(BadInput, match="contains the source"):
        check_output(DECODER.parent, "compressed", [DECODER], force=True)


def test_export_and_bench_make_missing_parents(tmp_path, minilm_int8):
    from lathe.io import check_output, check_report_dir

    assert check_output(tmp_path / "a" / "b" / "m.onnx", "onnx", [minilm_int8], is_dir=False)
    assert check_report_dir(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    with io.atomic_file(tmp_path / "p" / "q" / "r.json") as t:
        t.write_text("{}")
    assert (tmp_path / "p" / "q" / "r.json").is_file()


def test_disk_full_is_bad_input(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(BadInput, match="No space left"), io.atomic_dir(tmp_path / "o") as t:
        full()
    assert list(tmp_path.iterdir()) == []
    from lathe.cli import user_error
    assert "disk full" in user_error(OSError(errno.ENOSPC, "No space left on device"))

    class SafetensorError(Exception):
        pass
    assert user_error(SafetensorError("Error while serializing: IoError(No space left)")) is not None
    assert user_error(KeyError("x")) is None  # lathe's own bugs stay "internal error"


def test_internal_error_asks_for_a_report(monkeypatch, capsys):
    import lathe.cli as cli

    def boom(a):
        raise KeyError("oops")
    monkeypatch.setattr(cli, "_demo", boom)
    monkeypatch.delenv("LATHE_DEBUG", raising=False)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "report" in err


# ----------------------------------------------------------------------------- checkpoints


def test_mixed_float_dtypes_are_cast_and_said(tmp_path, caplog):
    s = src_copy(tmp_path)
    rewrite_tensors(s, _set("model.norm.weight", lambda x: x.half()))
    with caplog.at_level("WARNING"):
        m = lathe.load(s)
    assert m.model.norm.weight.dtype == torch.float32
    assert "cast 1 tensor(s) to float32" in caplog.text
    out = m(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out).all()


def test_recipe_order_checked_before_any_model_is_loaded(monkeypatch, tmp_path):
    from lathe.compress import checkpoint

    def never(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(checkpoint, "build_model", never)
    with pytest.raises(BadInput, match="quantization must be the last step"):
        lathe.compress_checkpoint(DECODER, recipe(tmp_path, "steps:\n  - method: int4\n  - method: int8\n"),
                                  tmp_path / "o")


# ----------------------------------------------------------------------------- bench compare


def _cmp(a, b, **kw):
    from lathe.bench.report import compare
    return compare(a, b, **kw)


def test_compare_flags_broken_runs():
    good = bench_json(quality={"lathe int8": {"min_cos": 0.994}})
    assert not _cmp(good, good)[1]
    nan = bench_json()
    nan["results"][0]["p50_ms"] = float("nan")
    assert _cmp(good, nan)[1]
    assert _cmp(good, bench_json(results=[]))[1]
    renamed = bench_json()
    renamed["results"][0]["backend"] = "other"
    text, bad = _cmp(good, renamed)
    assert bad and "missing from B" in text
    worse = bench_json(quality={"lathe int8": {"min_cos": 0.5}})
    assert _cmp(good, worse)[1]
    slight = bench_json(quality={"lathe int8": {"min_cos": 0.991}})
    assert not _cmp(good, slight)[1] and _cmp(good, slight, quality_threshold=0.001)[1]
    ppl = bench_json(quality={"lathe int8": {"perplexity": 80.0}})
    assert _cmp(ppl, bench_json(quality={"lathe int8": {"perplexity": 81.0}}))[1]  # +1.25%
    assert not _cmp(ppl, bench_json(quality={"lathe int8": {"perplexity": 80.5}}))[1]
    assert _cmp(ppl, bench_json(quality={"lathe int8": {"perplexity": float("nan")}}))[1]


def test_compare_cli_regression_exits_1(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(bench_json(quality={"lathe int8": {"min_cos": 0.994}})))
    (tmp_path / "b.json").write_text(json.dumps(bench_json(quality={"lathe int8": {"min_cos": 0.5}})))
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert "REGRESSION" in capsys.readouterr().out
