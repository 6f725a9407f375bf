"""Importing lathe never initialises CUDA and never needs a GPU, TensorRT or _C_cuda."""
import subprocess
import sys

CODE = r"""
import sys
# None in sys.modules makes any import of these raise ImportError, as if not installed.
for name in ('tensorrt', 'modelopt', 'lathe._C_cuda'):
    sys.modules[name] = None
import lathe
assert 'torch' not in sys.modules, 'import lathe pulled in torch'
import torch
import lathe.kernels, lathe.compress, lathe.export, lathe.bench, lathe.cli
from lathe import _ext
assert _ext.cuda() is None
assert not torch.cuda.is_initialized()
print('ok')
"""


def test_import_lathe_without_cuda():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
