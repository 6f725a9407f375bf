"""scripts/gpu_check.sh and lathe.bench.gpu_kernels on a machine without a GPU: the script's
--help and --dry-run (which checks the files its steps need), and the benchmark's report
writer on synthetic rows (the timings themselves need a GPU)."""
import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_help_lists_the_steps():
    r = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for step in ("build", "tests", "bench", "e2e", "--dry-run"):
        assert step in r.stdout


@needs_bash
def test_dry_run_checks_files_and_runs_nothing(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run ok" in r.stdout and "MISSING" not in r.stdout
    assert "LATHE_CUDA_ARCHS=90" in r.stdout and "--no-index" in r.stdout
    assert "tests/test_triton_qmatmul.py" in r.stdout and "tests/test_cuda_kernels.py" in r.stdout
    assert "lathe.bench.gpu_kernels" in r.stdout
    assert not out.exists()  # nothing written


@needs_bash
def test_unknown_argument_is_rejected():
    r = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


def test_bench_report_names_kernels_and_targets(tmp_path):
    from lathe.bench import gpu_kernels as G

    rows = [{"op": "copy", "bytes": 1 << 30, "kernel": "torch copy_", "ms": 0.5, "gbps": 4294.9},
            G._row("w4a16", {"M": 1, "K": 4096, "N": 4096}, "triton:gemv", "fp16 cuBLAS", 0.006,
                   0.019, 3.0, weight_gbps=1466.0, copy_fraction=0.34),
            G._row("w4a16", {"M": 16, "K": 4096, "N": 4096}, "cuda:w4a16_gemv", "fp16 cuBLAS", 0.0146,
                   0.0189, 3.0)]
    assert rows[1]["meets"] and not rows[2]["meets"]
    meta = {"device": "NVIDIA H200", "device_slug": "nvidia-h200", "torch": "2.11", "triton": "3.6",
            "cuda": "13.0", "seconds": 100.0}
    G.write(rows, meta, tmp_path)
    md = (tmp_path / "gpu-nvidia-h200.md").read_text()
    assert "triton:gemv" in md and "cuda:w4a16_gemv" in md and "**no**" in md
    assert "1 of 2 rows miss their target" in md
    doc = json.loads((tmp_path / "gpu-nvidia-h200.json").read_text())
    assert doc["records"][1]["kernel"] == "triton:gemv"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bench_without_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from lathe.bench import gpu_kernels as G

    assert G.main(["--quick"]) == 2
