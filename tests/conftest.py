import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GPU tests run each Triton kernel with one fixed config: no autotuning sweep per test case
# (real runs keep autotuning, with triton's on-disk cache).
os.environ.setdefault("LATHE_TRITON_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def minilm():
    from lathe.source import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def minilm_int8(tmp_path_factory, minilm):
    """The int8 recipe's output, made once per session (about 5 s)."""
    import lathe

    out = tmp_path_factory.mktemp("ckpt") / "minilm-int8"
    return lathe.compress_checkpoint(minilm, "int8", out)


@pytest.fixture
def tiny_copy(tmp_path, minilm):
    """A writable copy of the MiniLM checkpoint (for corrupting)."""
    dst = tmp_path / "minilm"
    shutil.copytree(minilm, dst)
    return Path(dst)
