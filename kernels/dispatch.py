"""One dispatcher: which implementation runs an op on a device.

Per op and device the candidate backends are tried in order and the first available one wins:
  cuda device: cuda (lathe._C_cuda) -> triton -> reference
  cpu device:  cpu (lathe._C, C++ with run-time ISA choice) -> reference
Override with the environment (LATHE_BACKEND=reference, or LATHE_BACKEND_<OP>=..., e.g.
LATHE_BACKEND_ATTENTION=reference) or in code with `use_backend(...)`.

Each backend's implementations register with `@impl(op, backend, when=...)`; `call(op, device,
*args)` runs the first implementation of the chosen backend whose condition (dtype, M,
capability, ...) holds for these arguments, else the op's reference. The op bodies in
lathe.kernels.ops hold no rules of their own: the table below and the registrations are all.
"""
from __future__ import annotations

import contextlib
import os
import threading

from lathe import _ext
from lathe.errors import BadInput

# op -> device type -> ordered candidates. "reference" is always last and always available.
CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    # torch: lathe's activation quantization around torch._int_mm / torch._scaled_mm
    # (lathe.kernels.torch_mm); first on CUDA, where it beats the Triton GEMM for prefill;
    # on the CPU only when forced (tests run the GPU path's code there).
    "linear_w8a8": {"cpu": ("cpu", "reference", "torch"), "cuda": ("torch", "triton", "reference")},
    "linear_w4a16": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    "linear_w8a16": {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
    # no CPU FP8 units: the reference simulates it; Triton needs sm_89+ (checked by the op)
    "linear_fp8": {"cpu": ("reference", "torch"), "cuda": ("torch", "triton", "reference")},
    "conv2d_int8": {"cpu": ("cpu", "reference"), "cuda": ("reference",)},
    "attention": {"cpu": ("cpu", "sdpa", "reference"), "cuda": ("triton", "sdpa", "reference")},
}

_local = threading.local()

# op -> backend -> [(when, fn)] in registration order; when(*args) -> bool, None = always.
IMPLS: dict[str, dict[str, list]] = {}


def impl(op: str, backend: str, when=None):
    """Register the decorated function as an implementation of `op` on `backend`, used when
    `when(*args)` holds (the op's arguments, positionally)."""
    def deco(fn):
        IMPLS.setdefault(op, {}).setdefault(backend, []).append((when, fn))
        return fn
    return deco


def call(op: str, device, *args):
    """Run `op` on `args` with the implementation the table picks for `device`."""
    impls = IMPLS[op]
    for when, fn in impls.get(backend_for(op, device), ()):
        if when is None or when(*args):
            return fn(*args)
    return impls["reference"][0][1](*args)


def _available(backend: str) -> bool:
    if backend in ("reference", "sdpa", "torch"):
        return True
    if backend == "cpu":
        return _ext.cpu() is not None
    if backend == "cuda":
        return _ext.cuda() is not None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


_ENV_KEYS: dict = {}


def _override(op: str) -> str | None:
    stack = getattr(_local, "stack", None)
    if stack:
        for want_op, backend in reversed(stack):
            if want_op in (op, None):
                return backend
    key = _ENV_KEYS.get(op)
    if key is None:  # the formatted name, made once an op (this runs on every op call)
        key = _ENV_KEYS[op] = f"LATHE_BACKEND_{op.upper()}"
    env = os.environ
    return env.get(key) or env.get("LATHE_BACKEND")


_cache: dict = {}


def backend_for(op: str, device) -> str:
    """The implementation that `torch.ops.lathe.<op>` uses for tensors on `device`."""
    dev = getattr(device, "type", None) or str(device).split(":")[0]
    forced = _override(op)
    key = (op, dev, forced)
    hit = _cache.get(key)  # on the hot path: every lathe op call asks
    if hit is None:
        hit = _cache[key] = _choose(op, dev, forced)
    return hit


def _choose(op: str, dev: str, forced: str | None) -> str:
    if op not in CANDIDATES:
        raise BadInput(f"unknown lathe op {op!r}: expected one of {sorted(CANDIDATES)}")
    candidates = CANDIDATES[op].get(dev, ("reference",))
    if forced:
        if forced not in candidates:
            raise BadInput(
                f"backend {forced!r} cannot run {op} on {dev}: choose one of {list(candidates)}")
        if not _available(forced):
            raise RuntimeError(f"backend {forced!r} for {op} is not available on this machine")
        return forced
    for b in candidates:
        if _available(b):
            return b
    return "reference"


@contextlib.contextmanager
def use_backend(backend: str, op: str | None = None):
    """Force `backend` for `op` (or for every op) inside the block, in this thread."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((op, backend))
    try:
        yield
    finally:
        stack.pop()


def kernel_for(op: str, device, **shape) -> str:
    """backend_for, plus on a GPU the kernel that runs for this shape (rows, n, dtype,
    group_size, asym: see lathe.kernels.gpu.kernel_for), e.g. 'cuda:w4a16_gemv' or
    'triton:dequant+cublas'. Bench reports name kernels with it."""
    backend = backend_for(op, device)
    dev = getattr(device, "type", None) or str(device).split(":")[0]
    if dev != "cuda":
        return backend
    from lathe.kernels.gpu import kernel_for as gpu_kernel

    return gpu_kernel(op, backend, device=device, **shape)

