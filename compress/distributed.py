"""torch.distributed in lathe, kept small: every helper is a no-op in a single process, so the
compress passes call them unconditionally and stay bit-identical without torchrun.

Launch: `torchrun --nproc_per_node N -m lathe compress ...` (torchrun sets RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK); `init_from_env()` joins the group (gloo on CPU, nccl
when CUDA is present)."""
from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or no torch.distributed): the process that writes outputs."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment; True when distributed.
    Does nothing outside torchrun (WORLD_SIZE unset or 1) or when already initialised."""
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_distributed()


def _reduce_(t: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return t
    dist = _dist()
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # nccl reduces GPU tensors only
        tmp = t.cuda()
        dist.all_reduce(tmp, op=op)
        t.copy_(tmp.to(t.device))
    else:
        dist.all_reduce(t, op=op)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (unchanged in a single process)."""
    return _reduce_(t, _dist().ReduceOp.SUM) if is_distributed() else t


def all_reduce_count(n: float) -> float:
    """The sum of a per-rank count over ranks (n itself in a single process)."""
    if not is_distributed():
        return n
    return float(all_reduce_sum_(torch.tensor([float(n)], dtype=torch.float64)))


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise max over ranks (unchanged in a single process)."""
    return _reduce_(t, _dist().ReduceOp.MAX) if is_distributed() else t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [n_r, ...] concatenated in rank order (the same tensor on every
    rank); ranks may hold different row counts, even 0, but the same trailing shape."""
    if not is_distributed():
        return t
    dist = _dist()
    n = torch.zeros(world(), dtype=torch.long)
    n[rank()] = t.shape[0]
    all_reduce_sum_(n)
    pad = torch.zeros((int(n.max()),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(world())]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:int(k)] for p, k in zip(parts, n.tolist())])


def barrier():
    if is_distributed():
        _dist().barrier()


def shard_range(n: int, r: int | None = None, w: int | None = None) -> range:
    """This rank's contiguous share of n items (sizes differ by at most one)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return range(r * n // w, (r + 1) * n // w)


def shard(items):
    """This rank's contiguous share of a sequence (all of it in a single process)."""
    s = shard_range(len(items))
    return items[s.start:s.stop]


__all__ = ["is_distributed", "rank", "world", "is_main", "init_from_env", "all_reduce_sum_", "all_reduce_count",
           "all_reduce_max_", "all_gather_rows", "barrier", "shard", "shard_range"]
