"""torch.distributed helpers: initialise from ``torchrun``'s environment, rank/world queries,
collectives that are no-ops in a single process, and the work split of the evaluation stages.
No module state beyond torch.distributed's own.

Evaluation work is split in fixed-size batches of a range ``[0, n)`` (``shard_batches``): rank r
takes a contiguous, balanced block of batch indices, so a batch holds the same images whatever
the world size and concatenating the ranks' outputs in rank order restores index order.
"""
from __future__ import annotations

import atexit
import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Returns whether
    the run is distributed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
    return True


def _destroy() -> None:
    """Tear the process group down before the interpreter exits: a gloo group left to the C++
    destructors can abort the process ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a copy; ``x`` itself is unchanged)."""
    if not is_distributed():
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def shard_batches(n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``(batch index, start, stop)`` of this rank's batches of ``[0, n)`` in batches of ``batch_size``:
    a contiguous block of batch indices, balanced to within one batch (a rank may get none)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num = -(-n // batch_size)
    w, r = world(), rank()
    return [(k, k * batch_size, min(n, (k + 1) * batch_size)) for k in range(num * r // w, num * (r + 1) // w)]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints and strings): the same parts give the same seed on every
    rank and machine, different parts give independent streams."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_same_config(digest: str) -> None:
    """Raise UserError on every rank when the ranks were started with different configs (each
    rank passes the hash of its resolved config)."""
    from .errors import UserError

    digests = all_gather_object(digest)
    if len(set(digests)) <= 1:
        return
    groups: dict[str, list[int]] = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    ref = digests[0]
    differing = [r for r, d in enumerate(digests) if d != ref]
    detail = "; ".join(f"ranks {v} have config {k[:12]}" for k, v in groups.items())
    raise UserError(
        f"the ranks disagree on the run config: ranks {differing} differ from rank 0 ({detail}); "
        "start every node with the same command, preset, --config file and --set values"
    )


def per_device_batch(global_batch: int, grad_accum: int, what: str) -> int:
    """The per-device micro-batch of a training stage: global batch / (world size x accumulation
    steps); UserError naming the config keys when it does not divide."""
    from .errors import UserError

    w = world()
    if grad_accum < 1:
        raise UserError(f"{what}.grad_accum must be >= 1, got {grad_accum}")
    if global_batch <= 0 or global_batch % (w * grad_accum):
        raise UserError(
            f"{what}.batch_size={global_batch} (the global batch) is not divisible by world size {w} x "
            f"{what}.grad_accum={grad_accum}; set {what}.batch_size to a multiple of {w * grad_accum} or change {what}.grad_accum"
        )
    return global_batch // (w * grad_accum)
