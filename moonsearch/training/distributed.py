"""The spatial negatives: product embeddings gathered from every rank (torch.distributed).

``all_gather_with_grad(x)`` returns the concatenation over ranks in rank order; the local slice keeps
its gradient (the others are constants), so each rank's loss sees every rank's products as negatives.
Works with NCCL on GPUs and gloo on CPUs; without an initialised process group it returns ``x``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_elems: int = 25_000_000) -> None:
    """Average gradients over ranks with the SAME collectives on every rank, whichever parameters got a
    gradient here: a missing gradient (an expert that received no tokens on this rank) counts as zeros.
    Parameters are reduced in flat buckets of at most ``bucket_elems`` elements (one all-reduce each)
    plus one all-reduce of "had a gradient" flags; a parameter that no rank touched keeps ``grad=None``,
    so the optimiser leaves it alone exactly as a single process would."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = list(params)
    if not params:
        return
    device = params[0].device
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(had)
    bucket: list[torch.nn.Parameter] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in bucket])
        dist.all_reduce(flat)
        flat /= world
        off = 0
        for p in bucket:
            g = flat[off:off + p.numel()].view_as(p).to(p.dtype)
            off += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        bucket.clear()

    for p, h in zip(params, had.tolist()):
        if h == 0:  # no rank produced a gradient: leave it None everywhere
            continue
        if size + p.numel() > bucket_elems:
            flush()
            size = 0
        bucket.append(p)
        size += p.numel()
    flush()
