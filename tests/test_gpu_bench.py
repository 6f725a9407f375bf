"""The GPU benchmarks without a GPU: `--device cuda` is a one-line BadInput (exit 2), the
end-to-end script's dry run goes through its whole flow on the CPU with tiny shapes and
writes its report, and the per-op overhead benchmark runs."""
import json
from pathlib import Path

import pytest
import torch

import lathe
from lathe import cli

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")


@no_gpu
def test_bench_device_cuda_without_a_gpu_is_exit_2(capsys, minilm):
    for target in (DECODER, minilm):
        assert cli.main(["bench", str(target), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no usable CUDA GPU" in err[0]


@no_gpu
def test_gpu_e2e_without_dry_run_is_exit_2(tmp_path):
    from lathe.bench import gpu_e2e

    assert gpu_e2e.main(["--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_gpu_e2e_dry_run(tmp_path):
    from lathe.bench import gpu_e2e

    doc = gpu_e2e.run(tmp_path, dry=True, log=lambda *a: None)
    js, md = tmp_path / "gpu-e2e-cpu-dry-run.json", tmp_path / "gpu-e2e-cpu-dry-run.md"
    assert json.loads(js.read_text())["dry_run"] is True and "DRY RUN" in md.read_text()
    labels = [r["backend"] for r in doc["speed"]]
    assert labels == ["torch fp32", "lathe fp32"] + [f"lathe {r}" for r in gpu_e2e.RECIPES]
    for r in doc["speed"]:
        assert r["decode_per_token"]["p50_ms"] > 0 and r["prefill"]["p50_ms"] > 0 and r["load_s"] > 0
    q = {x["model"]: x for x in doc["quality"]}
    assert q["decoder-lm fp32"]["logits_cosine_vs_fp32"] == pytest.approx(1.0, abs=1e-6)
    for r in gpu_e2e.RECIPES:  # the trained model compressed: close to its fp32 self
        assert q[f"decoder-lm {r}"]["logits_cosine_vs_fp32"] > 0.98
        assert q[f"decoder-lm {r}"]["perplexity"] < 1.2 * q["decoder-lm fp32"]["perplexity"]
    enc = doc["encoder"]["results"]
    assert [r["backend"] for r in enc] == ["torch fp32", "lathe int8-dynamic"]
    assert enc[1]["min_cosine_vs_fp32"] > 0.95
    assert len(doc["targets"]) == len(gpu_e2e.TARGETS)
    assert all(t["got"] is not None for t in doc["targets"])


def test_static_decode_of_the_baseline_equals_lathe():
    """The plain-PyTorch baseline computes the same model as lathe's adapter."""
    from lathe.bench.torch_llama import TorchLlama
    from lathe.models.static_cache import generate_static

    base, m = TorchLlama.load(DECODER, "cpu", torch.float32), lathe.load(DECODER)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(ids).double(), m(ids).double()
    # both fp32: the gap is accumulation order, far below the logits' scale
    assert (a - b).norm() / b.norm() < 1e-5
    base.setup_static_cache(2, 28)
    m.setup_static_cache(2, 28)
    assert torch.equal(generate_static(base, ids, 12), generate_static(m, ids, 12))


def test_overhead_bench_runs(capsys):
    from lathe.bench import overhead

    assert cli.main(["bench", "overhead", "--blocks", "2", "--calls", "3"]) == 0
    out = capsys.readouterr().out
    for op in ("linear_w8a8", "linear_w4a16", "linear_w8a16", "linear_fp8", "attention"):
        assert op in out
    rows = overhead.measure(blocks=2, calls=3)
    assert all(r["op_us"] > 0 and r["torch_add_us"] > 0 for r in rows)
