"""Every lathe Triton kernel, with every autotune config it can pick, compiles ahead of time
for sm_80, sm_89 and sm_90 (FP8 on 89/90) with triton's bundled ptxas: catches lowering errors
the interpreter cannot see (the W8A8 int8 dot that triton 3.6 rejected), on machines without a
GPU. The harness is tests/triton_aot.py; it runs in a fresh process per arch so that the kernel
modules import with their full config lists. LATHE_AOT_PYTHON names another interpreter to
run it with (e.g. a venv holding the triton of the GPU image)."""
import json
import os
import subprocess
import sys

import pytest

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot.py")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["all", "fixed"])
@pytest.mark.parametrize("arch", [80, 89, 90])
def test_every_kernel_and_config_compiles(arch, mode):
    """all: every autotune config compiles (and at least one per kernel fits the arch's shared
    memory); fixed: the one config each kernel runs with LATHE_TRITON_AUTOTUNE=0 fits."""
    pytest.importorskip("triton", exc_type=ImportError)
    python = os.environ.get("LATHE_AOT_PYTHON", sys.executable)
    extra = ["--fixed"] if mode == "fixed" else []
    r = subprocess.run([python, HARNESS, "--arch", str(arch), *extra], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    if r.returncode == 77:
        pytest.skip(json.loads(r.stdout)["skip"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["compiled"] > 0
    msgs = [f"{f['case']} {f['config']}: {f['error'][-300:]}" for f in report["failed"]]
    assert not msgs, f"{len(msgs)} of {report['compiled'] + len(msgs)} failed on sm_{arch}:\n" + "\n".join(msgs[:5])
