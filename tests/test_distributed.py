"""torch.distributed: 2 CPU processes (gloo, launched by torchrun) give the single-process
result: the same distillation loss curve for the same global batch (DDP, and FSDP with its
sharded parameters, masks and checkpoints), the same calibration amax, the same GPTQ Hessian.
Run as a script, this file is the torchrun worker."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lathe

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"
CFG = dict(steps=4, batch_size=4, seq_len=32, lr=1e-3, warmup=1, seed=5, save_every=0)


def corpus(path: Path) -> str:
    import lathe.compress.pipeline

    files = (Path(lathe.compress.pipeline.__file__), Path(lathe.__file__).parent / "text.py")
    path.write_text("\n".join(f.read_text() for f in files))
    return str(path)


def calib_batches():
    """1536 tokens: more than the widest Linear input (704), so the Hessians SparseGPT and
    the refit solve are full rank and their solutions well conditioned."""
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 4096, (4, 96), generator=g)} for _ in range(4)]


def hessian_inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 64, generator=g) for n in (5, 9, 3, 7)]


def run_all(data: str, fsdp: bool = False, work_dir: str | None = None) -> dict:
    """Distill, calibrate, accumulate a Hessian: each rank on its share of the data. With a
    work_dir, distil again afterwards from the same start: that run resumes from the first
    one's last checkpoint and must end on the same weights."""
    from lathe.compress import distributed as dist
    from lathe.compress.calibration import observe_inputs
    from lathe.compress.checkpoint import build_model
    from lathe.compress.context import StepContext
    from lathe.compress.distill import DistillConfig, handler
    from lathe.compress.gptq import HessianAccumulator
    from lathe.source import open_source

    src = open_source(DECODER)

    def fresh():
        m = build_model(src)
        del m.model.layers[2]
        with torch.no_grad():  # a pruned layer: distillation must keep its zeros
            m.model.layers[1].mlp.up_proj.weight[:, ::2] = 0
        return m

    cfg = DistillConfig(data=data, fsdp=fsdp, **{**CFG, "save_every": 2 if work_dir else 0})
    ctx = lambda: StepContext(source=src, work_dir=Path(work_dir) if work_dir else None)  # noqa: E731
    student = fresh()
    r = handler(student, cfg, None, None, ctx())
    resumed = None
    if work_dir:
        again = fresh()
        r2 = handler(again, cfg, None, None, ctx())
        resumed = {"steps_run": r2["steps_run"], "resumed_from": r2["resumed_from"],
                   "same": all(torch.equal(a, b) for a, b in
                               zip(again.state_dict().values(), student.state_dict().values()))}
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    amax = observe_inputs(build_model(src), names, dist.shard(calib_batches()))
    acc = HessianAccumulator(64)
    for x in dist.shard(hessian_inputs()):
        acc.update(x)
    up = student.model.layers[1].mlp.up_proj.weight
    return {"compressed": {k: compressed(src, c, Path(OUT_DIR[0]) / f"{k}.safetensors")
                           for k, c in COMPRESS.items()},"losses": r["loss_curve"], "world": r["world"], "parallel": r["parallel"],
            "zeros_kept": bool((up[:, ::2] == 0).all()), "resumed": resumed,
            "amax": {n: a.tolist() for n, a in amax.items()}, "H": acc.H.tolist(), "n": acc.n,
            "weight": student.model.layers[0].mlp.down_proj.weight[:4, :4].tolist()}


def compress_configs() -> dict:
    """The calibrating passes whose statistics are reduced across ranks. (SparseGPT is left
    out: its sequential N:M solve is chaotic under rounding, even reordering the batches of one
    process moves its weights by 5-40%; its Hessian reduction is HessianAccumulator's, checked
    below.)"""
    from lathe.compress.config import Int4Config
    from lathe.compress.lowrank import LowRankConfig
    from lathe.compress.prune import PruneConfig
    from lathe.compress.structured import StructuredPruneConfig

    return {"structured": StructuredPruneConfig(heads=0.5, ffn=0.5),
            "structured-grad": StructuredPruneConfig(ffn=0.25, importance="gradient"),
            "wanda": PruneConfig(algo="wanda", sparsity=0.5),
            "lowrank": LowRankConfig(rank=16, whiten=True),
            "awq": Int4Config(algo="awq", awq_grid=5)}


COMPRESS = {}
OUT_DIR = []  # where compressed() writes (one folder per process kind)



def compressed(src, cfg, path: Path) -> str:
    """The model after one pass on this rank's share of the calibration data, saved to path."""
    from safetensors.torch import save_file

    from lathe.compress import distributed as dist
    from lathe.compress.checkpoint import build_model
    from lathe.compress.context import StepContext
    from lathe.compress.quantize import quantize

    m = build_model(src)
    quantize(m, cfg, dist.shard(calib_batches()), None, StepContext(source=src))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the whole global batch (FSDP is a no-op without torchrun)."""
    COMPRESS.update(compress_configs())
    OUT_DIR[:] = [str(tmp_path_factory.mktemp("single"))]
    data = corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    return data, run_all(data)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(tmp_path, single, parallel):
    from safetensors.torch import load_file

    data, want = single
    out = tmp_path / "rank0.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, data, str(out),
           parallel, str(tmp_path / "work")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # a rare abort of a gloo rank at process teardown (1 in ~12 runs here): run once more,
        # from scratch; any other failure, or the same one twice, fails the test
        cmd[cmd.index("--master_port") + 1] = str(free_port())
        cmd[-1] = str(tmp_path / "work-retry")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and want["world"] == 1
    assert got["parallel"] == parallel and want["parallel"] is None
    assert got["zeros_kept"] and want["zeros_kept"]
    # the second run resumed from the first one's final (full, gathered) checkpoint
    assert got["resumed"] == {"steps_run": 0, "resumed_from": CFG["steps"], "same": True}
    ckpts = list((tmp_path / "work").glob("distill-*.pt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)  # full tensors, not shards
    assert state["model"]["model.layers.1.mlp.up_proj.weight"].shape == \
        build_student_shape(), "checkpoint holds shards, not full weights"
    # fp32 sums over a different split of the batch: rounding differences of ~1e-7 relative,
    # grown by a few optimizer steps; 1e-4 relative leaves margin and still catches a wrong
    # batch split or gradient scale (those change the loss at the 1e-2 level)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(got["weight"]), torch.tensor(want["weight"]),
                               rtol=1e-3, atol=1e-5)
    # the calibrating passes run once, in the ddp worker
    assert set(got["compressed"]) == (set(want["compressed"]) if parallel == "ddp" else set())
    for name in got["compressed"]:  # the same cut / scales / factors from the reduced statistics
        w, g = (load_file(d["compressed"][name]) for d in (want, got))
        assert w.keys() == g.keys(), name
        for k in w:
            assert w[k].shape == g[k].shape, (name, k)  # the same heads / neurons / ranks kept
            a, b = w[k].double(), g[k].double()
            err = float((a - b).norm() / b.norm().clamp(min=1e-12))
            assert err <= 1e-4, (name, k, err)
    for n in want["amax"]:  # max is exact in any order
        assert torch.equal(torch.tensor(got["amax"][n]), torch.tensor(want["amax"][n])), n
    assert got["n"] == want["n"] == 24
    torch.testing.assert_close(torch.tensor(got["H"]), torch.tensor(want["H"]), rtol=1e-5, atol=1e-6)


def test_helpers_single_process():
    from lathe.compress import distributed as dist

    assert not dist.is_distributed() and dist.rank() == 0 and dist.world() == 1 and dist.is_main()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.shard([1, 2, 3]) == [1, 2, 3]
    # shares of 5 items over 2 ranks cover everything once
    assert [list(dist.shard_range(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]


def build_student_shape():
    from lathe.compress.checkpoint import build_model
    from lathe.source import open_source

    return build_model(open_source(DECODER)).model.layers[1].mlp.up_proj.weight.shape


if __name__ == "__main__":  # the torchrun worker: corpus, output json, ddp | fsdp, work dir
    from lathe.compress import distributed as dist

    assert dist.init_from_env("gloo"), "run under torchrun with 2 processes"
    COMPRESS.update(compress_configs() if sys.argv[3] == "ddp" else {})
    OUT_DIR[:] = [str(Path(sys.argv[2]).parent)]
    result = run_all(sys.argv[1], fsdp=sys.argv[3] == "fsdp", work_dir=sys.argv[4])
    if dist.is_main():
        Path(sys.argv[2]).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
