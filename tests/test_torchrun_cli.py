"""`torchrun -m lathe compress` end to end: two gloo ranks distil together (DDP, or FSDP with
the student sharded) and one of them writes the output and reports it."""
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
RECIPE = """name: tiny-ddp
steps:
  - method: prune-structured
    ffn: 0.25
  - method: distill
    steps: 3
    batch_size: 4
    seq_len: 32
    save_every: 2
    fsdp: {fsdp}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_compress_two_ranks(tmp_path, parallel):
    (tmp_path / "r.yaml").write_text(RECIPE.format(fsdp=str(parallel == "fsdp").lower()))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "lathe", "compress", str(DECODER),
                        "--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "--no-summary"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("wrote") == 1, p.stdout
    m = json.loads((out / "lathe_manifest.json").read_text())
    d = m["report"]["steps"][1]
    assert d["method"] == "distill" and d["world"] == 2 and d["steps_run"] == 3
    assert d["parallel"] == parallel
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 528
    assert not (tmp_path / ".out.work").exists()  # the resume state is removed once complete
    ids = torch.randint(1, 4096, (1, 12))
    with torch.no_grad():  # the gathered weights load and run
        assert torch.isfinite(lathe.load(out)(input_ids=ids)).all()
