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
