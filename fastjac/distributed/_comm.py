"""The few torch.distributed primitives fastjac's parallel modes use: group resolution, shard bounds, a ring pass
(isend/irecv overlapped with compute), all-reduce/all-gather on the backend's device, and byte counters.

Nothing here is a transport of its own: everything goes through ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

# Bytes this process handed to torch.distributed since the last reset_stats() (payload only, per collective call:
# a ring send counts its tensor once; an all-reduce / all-gather counts this rank's input tensor once). The
# benchmark reads them; an algorithm's true wire traffic (e.g. 2(P-1)/P for a ring all-reduce) is in the docs.
STATS: Dict[str, int] = {"p2p_bytes": 0, "allreduce_bytes": 0, "allgather_bytes": 0, "calls": 0}


def reset_stats() -> None:
    for key in STATS:
        STATS[key] = 0


def resolve_group(group=None, *, what: str = "parallel"):
    """The process group to use: ``group``, or the default one; a ValueError naming the argument if none exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{what}: needs an initialised torch.distributed process group "
            f"(torch.distributed.init_process_group, e.g. under torchrun); none is initialised"
        )
    return dist.group.WORLD if group is None else group


def rank_and_size(group) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, r: int) -> int:
    return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)


def shard_bounds(n: int, P: int, r: int) -> Tuple[int, int]:
    """The contiguous block [lo, hi) of n items that rank r of P holds: the first n % P ranks get one more."""
    base, rem = divmod(n, P)
    lo = r * base + min(r, rem)
    return lo, lo + base + (1 if r < rem else 0)


def all_bounds(n: int, P: int) -> List[Tuple[int, int]]:
    return [shard_bounds(n, P, r) for r in range(P)]


def comm_device(group, like: Tensor) -> torch.device:
    """Where a collective's tensors must live: CUDA for NCCL, the CPU for gloo (which takes CPU tensors)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """Sum of t over the ranks, returned on t's device (every rank gets the same bytes)."""
    dev = comm_device(group, t)
    buf = t.detach().to(dev).contiguous().clone()
    STATS["allreduce_bytes"] += buf.numel() * buf.element_size()
    STATS["calls"] += 1
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def all_reduce(t: Tensor, op: str, group) -> Tensor:
    """t reduced over the ranks with op "sum", "min" or "max", returned on t's device."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dev = comm_device(group, t)
    buf = t.detach().to(dev).contiguous().clone()
    STATS["allreduce_bytes"] += buf.numel() * buf.element_size()
    STATS["calls"] += 1
    dist.all_reduce(buf, op=ops[op], group=group)
    return buf.to(t.device)


def all_gather_padded(t: Tensor, sizes: Sequence[int], group, dim: int = 0) -> List[Tensor]:
    """Gather tensors that differ only in the size along ``dim`` (rank p's is ``sizes[p]``): padded to the largest,
    gathered, trimmed. Returns the P tensors in rank order, on t's device."""
    dev = comm_device(group, t)
    big = max(sizes)
    pad_shape = list(t.shape)
    pad_shape[dim] = big
    buf = torch.zeros(pad_shape, dtype=t.dtype, device=dev)
    buf.narrow(dim, 0, t.shape[dim]).copy_(t)
    outs = [torch.empty_like(buf) for _ in sizes]
    STATS["allgather_bytes"] += buf.numel() * buf.element_size()
    STATS["calls"] += 1
    dist.all_gather(outs, buf, group=group)
    return [o.narrow(dim, 0, s).to(t.device) for o, s in zip(outs, sizes)]


def ring_pass(
    local: Tensor, shape_of: Callable[[int], Sequence[int]], compute: Callable[[int, Tensor], None], group
) -> None:
    """Visit every rank's block: ``compute(src, block)`` for src = r, r-1, ..., r-P+1 (mod P), own block first.

    While a block is being computed on, it is already on its way to rank r+1 and the next one is arriving from
    rank r-1 (``isend``/``irecv``), so communication overlaps the per-block work. ``shape_of(src)`` is the shape of
    rank src's block (blocks may differ in size: uneven shards).
    """
    r, P = rank_and_size(group)
    dev = comm_device(group, local)
    to_dev = dev != local.device
    cur, src = local.contiguous(), r
    if to_dev:
        cur = cur.to(dev)
    nxt_rank, prv_rank = global_rank(group, (r + 1) % P), global_rank(group, (r - 1) % P)
    for t in range(P):
        reqs = []
        if t < P - 1:
            nsrc = (r - t - 1) % P
            buf = torch.empty(tuple(shape_of(nsrc)), dtype=local.dtype, device=dev)
            STATS["p2p_bytes"] += cur.numel() * cur.element_size()
            STATS["calls"] += 1
            reqs = [dist.isend(cur, nxt_rank, group=group), dist.irecv(buf, prv_rank, group=group)]
        compute(src, cur.to(local.device) if to_dev else cur)
        for q in reqs:
            q.wait()
        if t < P - 1:
            cur, src = buf, nsrc


def gather_objects(obj, group) -> list:
    """all_gather_object: every rank gets every rank's (picklable) object, in rank order."""
    P = dist.get_world_size(group)
    out: list = [None] * P
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group) -> None:
    dist.barrier(group=group)
